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
torch.cuda.synchronize()
print("sanitizer case done")
