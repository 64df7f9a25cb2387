"""`python -m moshivis.server`: the streaming server (the package `moshivis.serve`; see its `cli`)."""
from __future__ import annotations

import sys

from .serve.main import main

if __name__ == "__main__":
    sys.exit(main())
