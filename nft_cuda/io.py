"""Saving and loading exported models (backbone + noisy-layer variations), safely.

An exported model file is a plain dict of tensors, numbers and strings written atomically
(temp file + fsync + rename) and read with ``torch.load(weights_only=True)``: no pickle of code.

    {"format": "nft_cuda.model/1",
     "model": {"name", "in_channels", "num_classes", "input_size", "width"},   # nft_cuda.models.build_model
              or {"name": "custom", "factory": "pkg.mod:fn", "kwargs", ...},   # a model factory
              (+ "output": the output adapter, when the model needs one)       # nft_cuda.models.build_from_spec
     "variation": DeviceModel.to_dict() of every noisy layer's device model:  # {"kind", "sigma", ...}
                  {"kind": "bitsliced-gaussian", "sigma", "device_model", "weight_bits", "device_bits", "mvm"}
                  or another model's fields; a dict without "kind" (files before device models) is a Variation
     "noisy": [names of the noisy layers],                                    # convert(include=...)
     "noise_stream": 2,                 # the noise stream version of the layer keys (absent: 1, DESIGN §2)
     "layer_keys": [ℓ of each noisy layer, in "noisy" order],                 # absent in older files
     "state_dict": {...},                                                     # backbone only, no IRS heads
     "meta": {...}}                                                           # method, dataset, versions, ...

A loaded model's noisy layers carry the file's stream version and keys, so chip r of the loaded model is
chip r of the model that was saved.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from nft_cuda._files import atomic_save
from nft_cuda.devices import DeviceModel, device_model_from_dict
from nft_cuda.nn import NOISE_STREAM_VERSION, assign_layer_keys, check_stream_version, convert, noisy_layers

__all__ = ["MODEL_FILE", "MODEL_FORMAT", "atomic_save", "load_model", "resolve_model_path", "save_model", "safe_load"]

MODEL_FORMAT = "nft_cuda.model/1"
#: The exported model's file name in a run folder of ``nft train``.
MODEL_FILE = "model.pt"


def safe_load(path: str, map_location="cpu"):
    """torch.load with weights_only=True and clear errors for missing or unreadable files."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError / EOFError for bad files
        raise ValueError(
            f"{path} is not a readable nft_cuda file (corrupt, truncated, or not weights-only "
            f"safe): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def save_model(path: str, model: nn.Module, *, spec: dict, variation: DeviceModel, meta: dict | None = None) -> None:
    """Export ``model`` (a backbone with noisy layers) with its architecture ``spec`` (what
    :func:`nft_cuda.models.build_from_spec` rebuilds it from: the keyword arguments of
    nft_cuda.models.build_model plus "name", or a model factory's import path and kwargs; plus "output"
    when its logits need an output adapter) and ``variation`` (any device model)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    layers = assign_layer_keys(model)  # keys of the model's own version (layers keyed already keep theirs)
    payload = {
        "format": MODEL_FORMAT,
        "model": dict(spec),
        "variation": variation.to_dict(),
        "noisy": [name for name, _ in noisy_layers(model)],
        "noise_stream": layers[0].stream_version if layers else NOISE_STREAM_VERSION,
        "layer_keys": [layer.layer_index for layer in layers],
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    atomic_save(payload, path)


def resolve_model_path(path) -> str:
    """The exported model file meant by ``path``: the file itself, or ``path/model.pt`` when ``path`` is a
    run folder of ``nft train``. Raises FileNotFoundError naming what is missing."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, MODEL_FILE)
        if os.path.isfile(candidate):
            return candidate
        raise FileNotFoundError(
            f"{path} is a folder without {MODEL_FILE}: give a run folder of `nft train` "
            "(it holds the exported model.pt) or an exported model file"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path} (checkpoint not found)")
    return path


def _not_a_model(path: str, payload) -> ValueError:
    what = payload.get("format") if isinstance(payload, dict) else None
    beside = os.path.join(os.path.dirname(path), MODEL_FILE)
    if isinstance(what, str) and what.startswith("nft_cuda.checkpoint"):
        hint = f"it is the resume state of a training run; evaluate the exported model {beside}"
        if not os.path.isfile(beside):
            hint += " (not written yet: the run has not finished an epoch)"
    else:
        hint = "export one with `nft train` or nft_cuda.io.save_model"
    return ValueError(f"{path} is not an exported nft_cuda model (format {MODEL_FORMAT!r}): {hint}")


def _rebuild(path: str, spec: dict) -> nn.Module:
    """The plain model of ``spec``; a model factory that cannot be imported or called says so (the file is
    fine: the process lacks the factory's module, e.g. its folder is not on PYTHONPATH)."""
    from nft_cuda.models import build_from_spec

    if "factory" not in spec:
        try:
            return build_from_spec(spec)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path} is a malformed exported nft_cuda model: {str(exc).splitlines()[0]}") from None
    try:
        return build_from_spec(spec)
    except Exception as exc:
        raise ValueError(
            f"{path}: cannot rebuild its model from the model factory {spec['factory']!r}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _restore_keys(model: nn.Module, keys, version: int) -> None:
    """Give the loaded noisy layers the saved keys (version 2; version 1 keys are positions, renumbered
    wherever they are used). The names of a rebuilt model give the same keys; the file is the record."""
    if keys is None or version == 1:
        return
    layers = [layer for _, layer in noisy_layers(model)]
    if len(keys) != len(layers) or len(set(keys)) != len(keys):
        raise ValueError(f"layer_keys must hold one distinct key per noisy layer ({len(layers)}), got {len(keys)}")
    for layer, key in zip(layers, keys):
        layer.layer_index = int(key)


def load_model(path, device="cpu") -> tuple[nn.Module, dict]:
    """(model, payload): the exported backbone rebuilt with its noisy layers (mode train) on ``device``.
    ``path`` is a model file or a run folder of ``nft train`` (its model.pt). A model made by a model
    factory is rebuilt by importing the factory again (ValueError naming it when that fails)."""
    path = resolve_model_path(path)
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise _not_a_model(path, payload)
    spec = payload.get("model")
    for entry, holder in (("model", payload), ("name", spec if isinstance(spec, dict) else {})):
        if entry not in holder:
            raise ValueError(f"{path} is a malformed exported nft_cuda model: missing entry {entry!r}")
    name = spec.get("factory", spec["name"])
    model = _rebuild(path, dict(spec))
    try:  # a file of the right format but with missing or bad entries: one clear error naming the file
        variation = device_model_from_dict(dict(payload["variation"]))
        noisy = list(payload["noisy"])
        version = check_stream_version(payload.get("noise_stream", 1), "noise_stream")
        if noisy:  # exactly the listed layers, embeddings too
            convert(model, variation, include=noisy, embeddings=True, stream_version=version)
            _restore_keys(model, payload.get("layer_keys"), version)
        state = payload["state_dict"]
    except KeyError as exc:
        raise ValueError(f"{path} is a malformed exported nft_cuda model: missing entry {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} is a malformed exported nft_cuda model: {str(exc).splitlines()[0]}") from None
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: the weights do not match model '{name}': {str(exc).splitlines()[0]}") from None
    return model.to(device), payload
