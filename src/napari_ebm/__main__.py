"""Run the command line with ``python -m napari_ebm``, the same as the ``napari-ebm`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
