"""langops: a labelled text dataset in, a validated, fine-tuned, compressed, gated and served classifier out."""

import os

# OpenMP threads (torch's intra-op pool) sleep while they wait instead of spinning: beside another job on
# the same cores, spinning threads take the cores the others need (langops/cpu_share.py). OpenMP reads this
# once, when torch is loaded, so it is set on the package's import; a value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
