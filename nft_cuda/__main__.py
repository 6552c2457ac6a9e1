"""``python -m nft_cuda ...``: the ``nft`` command line (see :mod:`nft_cuda.cli`)."""

import sys

from nft_cuda.cli import main

if __name__ == "__main__":
    sys.exit(main())
