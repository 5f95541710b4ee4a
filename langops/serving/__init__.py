"""Serve a compressed langops classifier over HTTP, following its registry alias.

``registry`` resolves what to serve, ``app`` builds the ASGI app (``create_app``), ``server`` runs it
(``serve``, what ``langops serve`` calls) and ``python -m langops.serving`` is its command line. Nothing
is imported here, so the pipeline can use ``registry`` without loading the web stack.
"""
