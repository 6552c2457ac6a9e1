"""Benchmarks of nft_cuda against the reference way of the paper's code, torch.compile and the clean floor."""
