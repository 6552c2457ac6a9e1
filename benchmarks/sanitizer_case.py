"""A small CUDA workload for compute-sanitizer (memcheck/racecheck): every kernel, odd sizes."""

import torch

import nft_cuda

assert torch.cuda.is_available(), "needs a CUDA device"
dev = torch.device("cuda")
v = nft_cuda.Variation(0.2, "FeFET6")
for shape in [(1,), (3,), (5, 7), (33, 17, 3, 3), (0, 4)]:
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        w = torch.randn(shape, device=dev).to(dtype).requires_grad_()
        out = nft_cuda.ops.perturb(w, v, seed=1, offset=2, samples=3)
        out.sum().backward()
nft_cuda.rng.normal(1001, 3, 4, streams=3, device=dev)
counter = torch.randint(0, 2**32, (37, 4), device=dev)
nft_cuda.rng.philox4x32(counter, torch.tensor([1, 2], device=dev))
# fused variation-sampled matmul: every fused variant, forward and backward-input, odd tile edges
torch.backends.cuda.matmul.fp32_precision = "tf32"
for xdt, wdt in [
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float32, torch.float32),
]:
    for m, n, k in [(1, 7, 5), (65, 66, 35), (3, 130, 97)]:
        for shared in (True, False):
            x = torch.randn(*(() if shared else (3,)), m, k, device=dev, dtype=xdt, requires_grad=True)
            w = torch.randn(n, k, device=dev, dtype=wdt, requires_grad=True)
            b = torch.randn(n, device=dev, dtype=xdt, requires_grad=True)
            out = nft_cuda.ops.noisy_linear(x, w, b, v, seed=1, offset=2, samples=3, shared_input=shared)
            out.float().sum().backward()
# snapshot capture: pooling inside the A-tile loader, batches crossing the 64-row tile, uneven windows
for xdt in (torch.bfloat16, torch.float16, torch.float32):
    for b, c, h, w_, p in [(1, 2, 5, 3, 4), (70, 3, 7, 13, 6), (4, 8, 8, 8, 3)]:
        for shared in (True, False):
            act = torch.randn(*(() if shared else (2,)), b, c, h, w_, device=dev, dtype=xdt, requires_grad=True)
            w = torch.randn(9, c * p * p, device=dev, requires_grad=True)
            out = nft_cuda.ops.snapshot_linear(act, p, w, None, v, seed=3, offset=4, samples=2, shared_input=shared)
            out.float().sum().backward()
torch.cuda.synchronize()
print("sanitizer case done")
