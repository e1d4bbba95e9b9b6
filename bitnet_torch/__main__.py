"""``python -m bitnet_torch``: the same command line as the ``bitnet-torch`` console script.

The arguments are parsed before torch and Transformers are imported (see ``bitnet_torch/__init__.py``).
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
