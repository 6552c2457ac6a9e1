"""The benchmark suite of nft_cuda (``python -m benchmarks``; see README.md).

Importing any ``benchmarks`` module sets ``NFT_CUDA_STRICT=1`` (unless already set) before ``nft_cuda``
is imported, so a missing kernel is an error rather than a silently timed pure-PyTorch fallback.
"""

import os

os.environ.setdefault("NFT_CUDA_STRICT", "1")
