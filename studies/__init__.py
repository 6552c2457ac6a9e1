"""Experiments built on nft_cuda (not part of the installed package): ``python -m studies.reproduce``."""
