"""Structure rules of the Python package, checked on its source (no imports of the checked modules).

* Encapsulation: no module writes another object's underscore attributes or calls its underscore
  methods (nn's private ``_conv_forward`` included); objects change their own private state, others
  go through public methods (e.g. ``NoisyModule.noise_state`` / ``restore_noise_state``). Private
  names of torch's own namespaces (``torch._check``, ``torch.ops.aten._…``, ``torch._C``) are torch's
  documented extension points and allowed.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nft_cuda"
CHECKED = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "studies").glob("*.py"))

#: Receivers whose private members a module may touch: itself, and torch's own namespaces.
_OWN = {"self", "cls", "ctx"}
_TORCH_ROOTS = {"torch"}


def _root(node: ast.AST) -> str | None:
    """The leftmost name of a dotted expression (``torch.ops.aten._x`` → ``torch``), or None."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _foreign_private(node: ast.AST) -> bool:
    """Whether ``node`` is ``x._name`` with x neither the object itself nor a torch namespace."""
    if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
        return False
    receiver = node.value
    if isinstance(receiver, ast.Name) and receiver.id in _OWN:
        return False  # self._x: the object's own state
    if isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "super":
        return False  # super()._x: the object's own (inherited) state
    return _root(receiver) not in _TORCH_ROOTS


def _violations(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            while isinstance(target, ast.Subscript):  # x._buffers["k"] = ... writes x._buffers
                target = target.value
            if _foreign_private(target):
                out.append(f"{name}:{node.lineno}: writes {ast.unparse(target)}")
        if isinstance(node, ast.Call) and _foreign_private(node.func):
            out.append(f"{name}:{node.lineno}: calls {ast.unparse(node.func)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "_conv_forward":
            out.append(f"{name}:{node.lineno}: calls nn's private _conv_forward")
    return out


def test_the_rules_catch_what_they_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("layer._mode = 'off'\nlayer._buffers['_instance_rng'] = b\nlayer._conv_forward(x, w, b)\n"
                   "self._base._conv_forward(self, x)\n")
    found = _violations(bad)
    assert [v.split(":")[1] for v in found] == ["1", "2", "3", "3", "4", "4"], found
    good = tmp_path / "good.py"
    good.write_text("self._mode = 'off'\ntorch._check(True)\ntorch.ops.aten._adaptive_avg_pool2d_backward(g, x)\n"
                    "super()._init(x)\n")
    assert _violations(good) == []


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_touches_another_objects_private_state(path):
    assert _violations(path) == []
