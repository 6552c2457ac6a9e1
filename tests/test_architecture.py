"""Structure rules of the Python package, checked on its source (docs/architecture.md):

* encapsulation: no module writes another object's underscore attributes or calls its underscore
  methods (nn's private ``_conv_forward`` included), and no module imports another's private names;
  objects change their own private state, others go through public methods (e.g.
  ``NoisyModule.noise_state`` / ``restore_noise_state``). Private names of torch's own namespaces
  (``torch._check``, ``torch.ops.aten._…``, ``torch._C``) are torch's extension points and allowed;
* tiers: ops → nn → train / eval → cli; no import from a higher tier, no importlib plugin loading;
* no import circle in the package or in benchmarks/ (function-level imports count);
* size: no function longer than 80 lines (docstrings not counted) in nft_cuda/, benchmarks/ and studies/,
  and none with more than 8 positional parameters (a handful whose signature torch or compatibility
  dictates are listed, each with its reason);
* documentation: every "§N" cited in code and docs is a section of docs/design.md.
"""

from __future__ import annotations

import ast
import pathlib
import re

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
    bad.write_text(
        "layer._mode = 'off'\nlayer._buffers['_instance_rng'] = b\nlayer._conv_forward(x, w, b)\n"
        "self._base._conv_forward(self, x)\n"
    )
    found = _violations(bad)
    assert [v.split(":")[1] for v in found] == ["1", "2", "3", "3", "4", "4"], found
    good = tmp_path / "good.py"
    good.write_text(
        "self._mode = 'off'\ntorch._check(True)\ntorch.ops.aten._adaptive_avg_pool2d_backward(g, x)\nsuper()._init(x)\n"
    )
    assert _violations(good) == []


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_touches_another_objects_private_state(path):
    assert _violations(path) == []


# --------------------------------------------------------------------------------------------------
# Tiers: ops → nn → train / eval → cli (docs/architecture.md). A module may import its own tier or a
# lower one, never a higher one.
# --------------------------------------------------------------------------------------------------

#: Module (or package prefix) → tier. The longest matching prefix wins.
TIERS = {
    # 0 ops: the compiled ops, their Python face and the plumbing everything shares
    "nft_cuda._C": 0,
    "nft_cuda._ext": 0,
    "nft_cuda._args": 0,
    "nft_cuda._autograd": 0,
    "nft_cuda._registrations": 0,
    "nft_cuda._files": 0,
    "nft_cuda.distributed": 0,
    "nft_cuda.variation": 0,
    "nft_cuda.devices": 0,
    "nft_cuda.mvm_ops": 0,
    "nft_cuda.reference": 0,
    "nft_cuda.rng": 0,
    "nft_cuda.ops": 0,
    # 1 nn: noisy layers, conversion, sample axis, models and their files; the datasets
    "nft_cuda": 1,
    "nft_cuda.nn": 1,
    "nft_cuda.layers": 1,
    "nft_cuda.conversion": 1,
    "nft_cuda.sample_axis": 1,
    "nft_cuda.models": 1,
    "nft_cuda.io": 1,
    "nft_cuda.data": 1,
    # 2 train / eval
    "nft_cuda.train": 2,
    "nft_cuda.eval": 2,
    # 3 the command line
    "nft_cuda.cli": 3,
    "nft_cuda.__main__": 3,
    "nft_cuda.eval.cli": 3,
    "nft_cuda.eval.lm_cli": 3,
    "nft_cuda.demo": 3,
}


def _tier(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in TIERS:
            return TIERS[prefix]
    raise AssertionError(f"module {module} has no tier: add it to TIERS (and docs/architecture.md)")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _walk_skipping_lazy_getattr(tree: ast.AST):
    """ast.walk, minus the body of a module-level ``__getattr__`` (PEP 562): a package may offer a higher
    tier as a lazy attribute (``nft_cuda.eval``) without depending on it."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.Module) and isinstance(child, ast.FunctionDef) and child.name == "__getattr__":
                continue
            stack.append(child)


def _imports(path: pathlib.Path, package: str = "nft_cuda") -> list[tuple[int, str]]:
    """(line, module) of every import of ``package`` in a file, at any depth (function-level ones
    included); ``from nft_cuda import x`` counts as importing nft_cuda.x when that is a module, else
    nft_cuda."""
    out = []
    for node in _walk_skipping_lazy_getattr(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == package]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.split(".")[0] == package
        ):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                where = ROOT / sub.replace(".", "/")
                is_module = sub in TIERS or where.is_dir() or any(where.parent.glob(where.name + ".*"))
                out.append((node.lineno, sub if is_module else node.module))
    return out


PACKAGE_FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_from_a_higher_tier(path):
    me = _module_name(path)
    mine = _tier(me)
    upward = [
        f"{me} (tier {mine}) imports {mod} (tier {_tier(mod)}) at line {line}"
        for line, mod in _imports(path)
        if _tier(mod) > mine
    ]
    assert upward == []


def test_the_tier_check_sees_an_upward_import(tmp_path):
    probe = PACKAGE / "nn" / "base.py"
    assert _tier(_module_name(probe)) == 1
    fake = tmp_path / "x.py"
    fake.write_text(
        "def f():\n    from nft_cuda.eval.run import evaluate\ndef __getattr__(name):\n    from nft_cuda import train\n"
    )
    assert [mod for _, mod in _imports(fake)] == ["nft_cuda.eval.run"]
    assert _tier("nft_cuda.eval.run") == 2 > _tier("nft_cuda.nn.base")


# --------------------------------------------------------------------------------------------------
# No import circle: the files of the package (and of benchmarks/) import each other as a tree of floors,
# so each can be read, tested and changed standing on what is below it. An import inside a function
# counts: it only hides the circle from Python's loader, not from the reader.
# --------------------------------------------------------------------------------------------------


def _import_graph(files: list[pathlib.Path], package: str) -> dict[str, set[str]]:
    """Module → the modules of ``files`` it imports (a package's ``__init__`` is the package's name)."""
    names = {_module_name(p): p for p in files}
    return {me: {mod for _, mod in _imports(path, package) if mod in names and mod != me} for me, path in names.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted: every import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", ["nft_cuda", "benchmarks"])
def test_no_import_circle(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    assert _circles(_import_graph(files, package)) == []


def test_the_circle_check_sees_a_circle(tmp_path):
    pkg = tmp_path / "nft_cuda"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "nn" / "a.py").write_text("from nft_cuda.nn.b import f\n")
    (pkg / "nn" / "b.py").write_text("def f():\n    from nft_cuda.nn.c import g\n")
    (pkg / "nn" / "c.py").write_text("import nft_cuda.nn.a\n")
    (pkg / "nn" / "d.py").write_text("from nft_cuda.nn.a import x\n")
    graph = {f"nft_cuda.nn.{p.stem}": {mod for _, mod in _imports(p)} for p in sorted((pkg / "nn").glob("*.py"))}
    assert graph["nft_cuda.nn.b"] == {"nft_cuda.nn.c"}  # a function-level import counts
    assert _circles(graph) == [["nft_cuda.nn.a", "nft_cuda.nn.b", "nft_cuda.nn.c"]]
    del graph["nft_cuda.nn.c"], graph["nft_cuda.nn.b"]
    graph["nft_cuda.nn.a"] = set()
    assert _circles(graph) == []


def test_no_importlib_plugin_loading():
    """The command line wires its commands with plain imports (a lazy attribute of the package, which
    may use importlib to defer a heavy import, is not a plugin list)."""
    cli_tier = [p for p in PACKAGE_FILES if _tier(_module_name(p)) == 3]
    users = [str(p.relative_to(ROOT)) for p in cli_tier if "importlib" in p.read_text()]
    assert cli_tier and users == []


def test_no_private_name_is_imported_from_another_module():
    """Modules share public names (``checkpoint.write_checkpoint``), not each other's private helpers;
    private *modules* (``nft_cuda._args``) are shared plumbing and fine to import."""
    bad = []
    for path in CHECKED:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nft_cuda":
                for a in node.names:
                    where = ROOT / f"{node.module}.{a.name}".replace(".", "/")
                    is_module = where.is_dir() or any(where.parent.glob(where.name + ".*"))
                    if a.name.startswith("_") and not a.name.startswith("__") and not is_module:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {a.name}")
    assert bad == []


# --------------------------------------------------------------------------------------------------
# Size: every function fits on a screen.
# --------------------------------------------------------------------------------------------------

MAX_FUNCTION_LINES = 80


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its ``def`` to its end, not counting its docstring (documentation is
    not what makes a function hard to read)."""
    lines = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


#: Every Python file the size rules read: the package, the benchmarks and the studies.
SIZED = PACKAGE_FILES + sorted((ROOT / "benchmarks").rglob("*.py")) + sorted((ROOT / "studies").rglob("*.py"))


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function in ``tree``: ``Class.method``, ``outer.inner``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _functions(node, name + ".")
        else:
            yield from _functions(node, prefix)


def _long_functions(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [
        f"{name}:{fn.lineno}: {qual} has {_code_lines(fn)} lines"
        for qual, fn in _functions(tree)
        if _code_lines(fn) > MAX_FUNCTION_LINES
    ]


@pytest.mark.parametrize("path", SIZED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_is_longer_than_80_lines(path):
    assert _long_functions(path) == []


def test_the_length_rule_ignores_docstrings_only():
    doc = '    """' + "\n".join(["x"] * 100) + '"""\n'
    fn = ast.parse("def f():\n" + doc + "    return 1\n").body[0]
    assert _code_lines(fn) == 2
    fn = ast.parse("def g():\n" + "    a = 1\n" * 81).body[0]
    assert _code_lines(fn) == 82


MAX_POSITIONAL = 8

#: Functions allowed more than 8 positional parameters, by qualified name (robust to moving files), each
#: with the reason its signature is not ours to shorten.
POSITIONAL_ALLOWED = {
    "_noisy_linear_fake": "torch.library fake kernel of nft_cuda::noisy_linear: takes the op schema's "
    "arguments positionally, as the dispatcher passes them",
    "_snapshot_linear_fake": "torch.library fake kernel of nft_cuda::snapshot_linear: the op schema's arguments",
    "NoisyConvFn.forward": "torch.autograd.Function.forward: Function.apply passes the inputs positionally",
    "NoisyLinearFn.forward": "torch.autograd.Function.forward: Function.apply passes the inputs positionally",
    "_NoisyConvNd.__init__": "mirrors torch.nn.Conv1d/2d's constructor (positional kernel_size, stride, ...), "
    "so a noisy layer is built exactly as the plain one",
    "NoisyMultiheadAttention.__init__": "mirrors torch.nn.MultiheadAttention's constructor argument for argument",
    "eval_checkpoints": "public API whose 12 leading parameters callers pass positionally (kept for "
    "compatibility); it turns them into one EvalConfig at once",
}


def _positional(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The positional parameters of a function, ``self`` / ``cls`` of a method not counted."""
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    return len([n for n in names if n not in ("self", "cls")])


def _long_signatures(path: pathlib.Path) -> dict[str, str]:
    """qualified name → "file:line: ... positional parameters" of each function over the limit."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return {
        qual: f"{name}:{fn.lineno}: {qual} takes {_positional(fn)} positional parameters"
        for qual, fn in _functions(tree)
        if _positional(fn) > MAX_POSITIONAL
    }


def test_no_function_takes_more_than_8_positional_parameters():
    found = {}
    for path in SIZED:
        found.update(_long_signatures(path))
    assert sorted(v for k, v in found.items() if k not in POSITIONAL_ALLOWED) == []
    stale = sorted(set(POSITIONAL_ALLOWED) - set(found))
    assert stale == [], f"allowed signatures that no longer need it (remove them from POSITIONAL_ALLOWED): {stale}"


def test_the_size_rules_catch_what_they_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(a, b, c, d, e, f, g, h, i):\n    pass\n"
        "class C:\n    def m(self, a, b, c, d, e, f, g, h):\n        pass\n"
        "    def n(self, a, b, c, d, e, f, g, h, i=0):\n        pass\n"
        "def k(a, b, c, d, e, f, g, h, *, i, j):\n    pass\n"
        "def outer():\n    def long():\n" + "        x = 1\n" * 81
    )
    assert sorted(_long_signatures(bad)) == ["C.n", "f"]  # self is not counted, keyword-only ones neither
    assert [v.split(": ")[1] for v in _long_functions(bad)] == ["outer has 83 lines", "outer.long has 82 lines"]
    assert SIZED and any(p.parts[-2] == "benchmarks" for p in SIZED) and any(p.parts[-2] == "studies" for p in SIZED)


# --------------------------------------------------------------------------------------------------
# Documentation: every "§N" cited anywhere resolves to a section of docs/design.md.
# --------------------------------------------------------------------------------------------------

_CITING = ("nft_cuda", "csrc", "tests", "benchmarks", "studies", "docs", "tools", ".ci")
_SUFFIXES = {".py", ".md", ".h", ".cuh", ".cu", ".cpp", ".sh", ".toml", ".json", ".yaml", ".yml", ""}


def _design_sections() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    return set(re.findall(r"^#+ §(\d+(?:\.\d+)?) ", text, flags=re.M))


def _citations() -> dict[str, list[str]]:
    """§ number → files citing it (the design document itself excluded)."""
    files = [ROOT / "README.md"] + [
        p
        for top in _CITING
        if (ROOT / top).exists()
        for p in (ROOT / top).rglob("*")
        if p.is_file() and p.suffix in _SUFFIXES
    ]
    cited: dict[str, list[str]] = {}
    for path in files:
        if path == ROOT / "docs" / "design.md" or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for number in re.findall(r"§ ?(\d+(?:\.\d+)?)", text):
            cited.setdefault(number, []).append(str(path.relative_to(ROOT)))
    return cited


def test_design_document_has_numbered_sections():
    assert {str(n) for n in range(1, 10)} <= _design_sections()


def test_every_cited_section_exists():
    sections = _design_sections()
    cited = _citations()
    assert cited, "no § citations found: the scan is broken"
    missing = {n: sorted(set(files))[:3] for n, files in cited.items() if n not in sections}
    assert missing == {}


def test_the_instance_offset_is_computed_in_one_function():
    """(ℓ << 32) | r, the stream offset of a chip instance (design §2), is written only in
    nft_cuda.nn.base.instance_offset; everything else calls it."""
    places = []
    for path in PACKAGE_FILES:
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if (
                        isinstance(node, ast.BinOp)
                        and isinstance(node.op, ast.LShift)
                        and isinstance(node.right, ast.Constant)
                        and node.right.value == 32
                    ):
                        places.append(f"{path.relative_to(ROOT)}:{fn.name}")
    assert places == ["nft_cuda/nn/base.py:instance_offset"]


# --------------------------------------------------------------------------------------------------
# One of each: device-model names and default severities live in one table (nft_cuda/devices/catalog.py).
# --------------------------------------------------------------------------------------------------


def _name_lists(path: pathlib.Path, names: set[str]) -> list[str]:
    """Literal tuples, lists, sets and dict keys of a file that spell out two or more device-model names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) or not items:
            continue
        spelled = {i.value.lower() for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)} & names
        if len(spelled) >= 2:
            out.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{node.lineno}")
    return out


def test_device_model_names_are_listed_only_in_the_devices_table(tmp_path):
    from nft_cuda.devices import DEVICE_MODELS

    names = {spelling.lower() for row in DEVICE_MODELS for spelling in (row.name, *row.aliases)}
    elsewhere = [p for p in SIZED if not p.is_relative_to(PACKAGE / "devices")]
    assert [hit for p in elsewhere for hit in _name_lists(p, names)] == []
    bad = tmp_path / "bad.py"
    bad.write_text('UNIT = ("pcm", "stuck-at")\nOK = ("pcm", "adam")\nD = {"lognormal": 1, "RRAM1": 2}\n')
    assert [hit.split(":")[1] for hit in _name_lists(bad, names)] == ["1", "3"]


def _nn_imports(path: pathlib.Path) -> set[str]:
    """The nn/ modules a file of nft_cuda/nn imports (``from nft_cuda.nn.x import``, ``from nft_cuda.nn import x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("nft_cuda.nn."):
                names.add(node.module.split(".")[2])
            elif node.module == "nft_cuda.nn":
                names.update(alias.name for alias in node.names)
    return names


def test_the_nn_floors_of_the_architecture_doc_match_the_imports():
    """docs/architecture.md "Inside nn/": every file is on one floor, and imports only files on floors below."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Inside nn/")[1].split("\n## ")[0]
    floors = {}
    for floor, files in re.findall(r"^\| (\d) \| ([^|]+) \|", section, flags=re.M):
        for name in re.findall(r"`(\w+)\.py`", files):
            floors[name] = int(floor)
    modules = {p.stem for p in (ROOT / "nft_cuda" / "nn").glob("*.py") if p.stem != "__init__"}
    assert set(floors) == modules, f"files missing from / unknown to the table: {sorted(set(floors) ^ modules)}"
    bad = [
        f"{name} (floor {floors[name]}) imports {other} (floor {floors[other]})"
        for name in sorted(modules)
        for other in sorted(_nn_imports(ROOT / "nft_cuda" / "nn" / f"{name}.py") & modules)
        if floors[other] >= floors[name]
    ]
    assert bad == []
