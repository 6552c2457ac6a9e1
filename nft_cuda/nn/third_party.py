"""Layer types of third-party model libraries that :func:`nft_cuda.convert` knows without being told.

Hugging Face transformers' ``pytorch_utils.Conv1D`` (GPT-2, GPT, and models derived from them) holds every
attention and MLP weight of those models: a linear layer whose weight is stored transposed, [in, out].
Without it a converted GPT-2 would be "analog" only in its LM head. It is registered here through the
public :func:`nft_cuda.register_noisy` mechanism, lazily: :func:`register_known` runs at the start of every
``convert`` and registers a type only when its package is already imported (a model built from it must
have imported it), so the library never imports transformers itself and has no dependency on it.

The noisy Conv1D perturbs its [in, out] weight element by element like any crossbar weight (flat index in
that logical shape, DESIGN §3) and computes ``bias + x @ W_noisy`` as transformers does.
"""

from __future__ import annotations

import sys

import torch

from nft_cuda.nn.generic import register_noisy
from nft_cuda.nn.registry import registered

__all__ = ["register_known"]


def _conv1d(module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """transformers' Conv1D forward with ``weight`` [nx, nf] in place of the parameter."""
    size_out = x.size()[:-1] + (module.nf,)
    return torch.addmm(module.bias, x.reshape(-1, x.size(-1)), weight).view(size_out)


#: (module name, class name, the crossbar weight, apply) of every known third-party type.
KNOWN = (("transformers.pytorch_utils", "Conv1D", "weight", _conv1d),)


def register_known() -> list[type]:
    """Register the known third-party layer types whose package is imported and that nobody registered
    yet (a user's own registration wins); returns the classes registered by this call."""
    done = []
    for module_name, class_name, weight, apply in KNOWN:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and registered(cls) is None:
            register_noisy(cls, weight, apply)
            done.append(cls)
    return done
