"""Quick start: the device-variation model, the shared noise stream and the perturb op.

bash tools/setup_env.sh && .venv/bin/python examples/quickstart.py
"""

import torch

import nft_cuda
from nft_cuda import Variation

info = nft_cuda.backend_info()
print("backends:", {op: b["cpu"] for op, b in info["ops"].items()}, "| CUDA compiled:", info["cuda_compiled"])

# A weight and the variation of an 8-bit weight stored on four 2-bit FeFET cells at σ_d = 0.1.
torch.manual_seed(0)
weight = torch.randn(256, 512)
variation = Variation(0.1, device_model="FeFET2")
print(variation, f"scale={variation.scale:.6f}", f"state factor={variation.state_factor:g}")

# Four chips' worth of noisy weights from one (seed, offset): sample t uses stream offset + t.
noisy = nft_cuda.ops.perturb(weight, variation, seed=2024, offset=0, samples=4)
z = (noisy - weight) / variation.sigma_w(weight)
print(f"perturb -> {tuple(noisy.shape)}; (W_noisy - W)/σ_w: mean {z.mean():+.4f}, std {z.std():.4f}")

# The same noise whatever computes it: the compiled kernel and the pure-PyTorch oracle agree.
rng = torch.tensor([2024, 0])
oracle = nft_cuda.reference.perturb(weight, rng, torch.full((4,), 0.1), variation.scale, variation.state_factor)
print(f"max |kernel - pure PyTorch| = {(noisy - oracle).abs().max():.2e}")

# Per-sample σ_d: a sweep in one call, and the straight-through gradient (Σ over samples).
w = weight.clone().requires_grad_()
sweep = nft_cuda.ops.perturb(w, variation, seed=1, samples=3, sigmas=[0.0, 0.2, 0.4])
sweep.sum().backward()
print(
    "σ_d = 0 leaves W exact:",
    torch.equal(sweep[0].detach(), weight),
    "| dL/dW = 3 everywhere:",
    bool((w.grad == 3).all()),
)
