"""JSON request bodies decoded so that hostile input is refused with a reason, never raised as a crash.

``json.loads`` raises more than ``JSONDecodeError``: ``RecursionError`` for arrays or objects nested past
the interpreter's recursion limit, and a plain ``ValueError`` for an integer literal longer than
``int()`` may convert from a string. Both come from bodies a client controls, so both are the client's error.
"""

from __future__ import annotations

import json
import sys
from typing import Any


class JsonTooComplex(ValueError):
    """Well-formed JSON the server will not decode: nested too deeply, or a number with too many digits."""


def load_json(body: str | bytes) -> Any:
    """``json.loads``, with the decoder's limits turned into ``JsonTooComplex`` with a message that names them.

    Raises:
        json.JSONDecodeError, UnicodeDecodeError: the body is not JSON.
        JsonTooComplex: nested too deeply, or an integer of more than ``sys.get_int_max_str_digits()`` digits.
    """
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):  # not JSON, or bytes that are not in a UTF encoding
        raise
    except RecursionError as exc:
        raise JsonTooComplex("JSON nested too deeply: arrays and objects are nested more than the "
                             f"decoder's limit of about {sys.getrecursionlimit()} levels") from exc
    except ValueError as exc:  # int() refusing a literal over the digit limit
        raise JsonTooComplex(f"a number in the JSON has more than {sys.get_int_max_str_digits()} digits") from exc
