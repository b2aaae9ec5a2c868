"""``python -m gpulora``: see :mod:`gpulora.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
