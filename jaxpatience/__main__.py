"""`python -m jaxpatience ...`: the same as the `jaxpatience` console script (for a venv without it on PATH)."""

import sys

from jaxpatience.cli import main

if __name__ == "__main__":
    sys.exit(main())
