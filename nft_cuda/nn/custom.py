"""Custom models in the library's tools: the output adapter and import paths (docs/custom-models.md).

The tools that need a model's logits (the training methods, :func:`nft_cuda.eval.monte_carlo`,
:func:`nft_cuda.nn.calibrate_mvm`, ``nft train`` / ``nft eval``) take ``output=``, which says where
the logits are in what the model returns. A Hugging Face model returns a ``ModelOutput``
(``output="logits"``), a model with auxiliary heads a tuple (``output=0``). :func:`resolve_output` is the
one place that turns ``output=`` into a function of the raw output, so every tool accepts the same
values and gives the same errors:

* ``None``: the output itself, which must be a tensor (today's behaviour of every tool);
* a str: an attribute or key of the output (``"logits"``); a str ``"package.module:function"`` is the
  import path of a callable;
* an int: an element of a tuple or list output;
* a callable: called with the raw output, returns the logits tensor.

A model factory (``TrainConfig(model_factory=...)``) and a callable ``output`` are recorded in checkpoints
and exported models as import paths (:func:`import_path_of`), so ``nft eval`` and ``--resume`` import
the same function again (:func:`import_object`): a file stores names, never code.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping

import torch

__all__ = ["import_object", "import_path_of", "recordable_output", "resolve_output"]

#: What ``output=`` may be (see the module docstring).
OutputSpec = None | str | int | Callable


def import_object(path: str, what: str):
    """The object an import path ``"package.module:name"`` (``name`` may be dotted: ``Class.method``)
    points at. ``what`` names the setting in the errors: ValueError when the path is malformed, the
    module cannot be imported or lacks the name."""
    if not isinstance(path, str):
        raise TypeError(f"{what} must be an import path 'package.module:function', got {type(path).__name__}")
    module_name, sep, attr = path.strip().partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} must be an import path 'package.module:function', got {path!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"{what} {path!r}: cannot import module {module_name!r} ({exc}); is its folder on PYTHONPATH?"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def import_path_of(obj, what: str) -> str:
    """The import path ``"module:qualname"`` of a module-level function or class, checked to import back
    to ``obj``; ValueError for a lambda, a local function, a partial or anything defined in ``__main__``
    (a file records the name, and another process must find it)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname or module == "__main__":
        raise ValueError(
            f"{what} {obj!r} cannot be recorded for rebuilding: give a module-level function or class of an "
            "importable module (not a lambda, a local function, a partial or one defined in __main__), "
            "or its import path 'package.module:function'"
        )
    path = f"{module}:{qualname}"
    if import_object(path, what) is not obj:
        raise ValueError(f"{what} {obj!r}: its import path {path!r} leads to another object")
    return path


def _fields(out) -> list[str]:
    """The names a str ``output=`` could take on ``out``: keys, named-tuple or dataclass fields, or public
    attributes."""
    if isinstance(out, Mapping):
        return [str(k) for k in out.keys()]
    if isinstance(out, tuple) and hasattr(type(out), "_fields"):
        return list(type(out)._fields)
    if dataclasses.is_dataclass(out):
        return [f.name for f in dataclasses.fields(out)]
    return sorted(n for n in getattr(out, "__dict__", {}) if not n.startswith("_"))


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor {list(out.shape)}"
    if isinstance(out, (tuple, list)) and not hasattr(type(out), "_fields"):
        return f"a {type(out).__name__} of {len(out)}"
    fields = _fields(out)
    return f"a {type(out).__name__}" + (f" (fields: {', '.join(fields)})" if fields else "")


def _as_logits(value, out, how: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{how} gave {_describe(value)}, not a tensor of logits; the model returned {_describe(out)}")
    return value


def _itself(out) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model returned {_describe(out)}, not a tensor of logits: pass output= (an attribute or key "
            "such as 'logits', an index of a tuple, or a callable; docs/custom-models.md)"
        )
    return out


def _field(name: str):
    def pick(out) -> torch.Tensor:
        if isinstance(out, Mapping) and name in out:
            value = out[name]
        elif not isinstance(out, (torch.Tensor, Mapping)) and hasattr(out, name):
            value = getattr(out, name)
        else:
            fields = _fields(out) if not isinstance(out, torch.Tensor) else []
            raise ValueError(
                f"output={name!r}: the model's output, a {type(out).__name__}, has no field {name!r}; "
                + (f"its fields: {', '.join(fields)}" if fields else "it has no named fields")
            )
        return _as_logits(value, out, f"output={name!r}")

    return pick


def _element(index: int):
    def pick(out) -> torch.Tensor:
        if not isinstance(out, (tuple, list)):
            raise ValueError(f"output={index}: an index applies to a tuple or list output, the model returned "
                             f"{_describe(out)}")  # fmt: skip
        if not -len(out) <= index < len(out):
            raise ValueError(f"output={index}: the model returned {_describe(out)}")
        return _as_logits(out[index], out, f"output={index}")

    return pick


def _called(fn: Callable, name: str):
    def pick(out) -> torch.Tensor:
        return _as_logits(fn(out), out, f"output={name}")

    return pick


def resolve_output(output: OutputSpec = None) -> Callable[[object], torch.Tensor]:
    """The function taking a model's raw output to its logits tensor, for ``output=`` (see the module
    docstring). Bad ``output`` values raise at once (TypeError / ValueError naming ``output``); an output
    the adapter does not fit raises when it is applied, naming the output's type and its fields."""
    if output is None:
        return _itself
    if isinstance(output, bool):
        raise TypeError("output must be None, an attribute name, an index, an import path or a callable, got bool")
    if isinstance(output, int):
        return _element(output)
    if isinstance(output, str):
        text = output.strip()
        if ":" in text:
            fn = import_object(text, "output")
            if not callable(fn):
                raise TypeError(f"output {text!r} is a {type(fn).__name__}, not a callable")
            return _called(fn, repr(text))
        if not text.isidentifier():
            raise ValueError(
                f"output must be an attribute or key name (such as 'logits') or an import path "
                f"'package.module:function', got {output!r}"
            )
        return _field(text)
    if callable(output):
        return _called(output, getattr(output, "__qualname__", type(output).__name__))
    raise TypeError(
        f"output must be None, an attribute name, an index, an import path or a callable, got {type(output).__name__}"
    )


def recordable_output(output: OutputSpec) -> str | int | None:
    """``output`` as a file can keep it (None, a name, an index, or a callable's import path), checked by
    :func:`resolve_output`."""
    if callable(output) and not isinstance(output, (str, int)):
        output = import_path_of(output, "output")
    resolve_output(output)
    return output.strip() if isinstance(output, str) else output
