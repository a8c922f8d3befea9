"""``python -m geodino``: the same as the ``geodino`` console script."""

import sys

from geodino.cli import main

if __name__ == "__main__":
    sys.exit(main())
