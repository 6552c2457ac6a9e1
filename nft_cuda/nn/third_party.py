"""Layer types of third-party model libraries that :func:`nft_cuda.convert` knows without being told.

Hugging Face transformers' ``pytorch_utils.Conv1D`` (GPT-2, GPT, and models derived from them) holds every
attention and MLP weight of those models: a linear layer whose weight is stored transposed, [in, out].
Without it a converted GPT-2 would be "analog" only in its LM head. It is registered here through the
public :func:`nft_cuda.register_noisy` mechanism, lazily: :func:`register_known` runs at the start of every
``convert`` and registers a type only when its package is already imported (a model built from it must
have imported it), so the library never imports transformers itself and has no dependency on it.

The noisy Conv1D perturbs its [in, out] weight element by element like any crossbar weight (flat index in
that logical shape, DESIGN §3) and computes ``bias + x @ W_noisy`` as transformers does. Its forward is
NoisyLinear's autograd Function on the stored-transposed weight (the noisy weight drawn in forward, drawn
again in backward, never kept), rather than the generic checkpointed path of :func:`register_noisy`, which
would re-run the forward's GEMM in backward; the draws, and so the chips, are the same either way.
"""

from __future__ import annotations

import sys

import torch

from nft_cuda.nn import functions, stacked
from nft_cuda.nn.generic import register_noisy
from nft_cuda.nn.mvm import refuse_mvm_around_gemm
from nft_cuda.nn.registry import registered

__all__ = ["register_known"]


def _conv1d(module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """transformers' Conv1D forward with ``weight`` [nx, nf] in place of the parameter."""
    size_out = x.size()[:-1] + (module.nf,)
    return torch.addmm(module.bias, x.reshape(-1, x.size(-1)), weight).view(size_out)


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The noisy Conv1D's forward: mode off the plain one; drawn chip weights (a Monte-Carlo plan) applied
    as they are; otherwise NoisyLinearFn on the [in, out] weight (``transposed``)."""
    noise = self.forward_noise()
    if noise is None:
        return self._spec.cls.forward(self, x)
    refuse_mvm_around_gemm(self)
    if noise.weights is not None:
        return stacked.linear(x, noise.weights.transpose(1, 2), self.bias)
    rng, sigmas, _ = noise
    dtype = functions.autocast_dtype(x)
    return functions.NoisyLinearFn.apply(x, self.weight, self.bias, rng, sigmas, self._variation, dtype, True)


#: (module name, class name, the crossbar weight, apply, forward or None for the generic one) of every
#: known third-party type.
KNOWN = (("transformers.pytorch_utils", "Conv1D", "weight", _conv1d, _conv1d_forward),)


def register_known() -> list[type]:
    """Register the known third-party layer types whose package is imported and that nobody registered
    yet (a user's own registration wins); returns the classes registered by this call."""
    done = []
    for module_name, class_name, weight, apply, forward in KNOWN:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and registered(cls) is None:
            noisy = register_noisy(cls, weight, apply)
            if forward is not None:
                noisy.forward = forward
            done.append(cls)
    return done
