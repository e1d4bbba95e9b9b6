"""``python -m bitnet_torch``: the same command line as the ``bitnet-torch`` console script."""

import sys

from .cli import main

sys.exit(main())
