"""Old name of :mod:`nft_cuda.nn.layers`, kept so that existing imports keep working: importing it gives
the very same module object (so attribute reads and monkeypatching act on the real module)."""

import sys

from nft_cuda.nn import layers as _module

sys.modules[__name__] = _module
