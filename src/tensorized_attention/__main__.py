"""``python -m tensorized_attention``: the same as the ``tensorized-attention`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
