"""``python -m manyheads``: the command line (see :mod:`manyheads.cli`), also under torchrun.

python -m manyheads train examples/utkface.yaml
"""

import sys

from manyheads.cli import main

if __name__ == "__main__":
    sys.exit(main())
