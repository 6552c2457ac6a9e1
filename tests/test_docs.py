"""The documentation runs: every ```python block of README.md and docs/ executes (a document's blocks in
order, in one process), and every dotted
``nft_cuda.…`` name the docs mention resolves by attribute access after a bare ``import nft_cuda`` (as a
reader would type it)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_DOTTED = re.compile(r"\bnft_cuda(?:\.[A-Za-z_]\w*)+")


def _documents() -> list:
    """One param per document with Python blocks: its blocks in order, run as one session (a later block may
    use what an earlier one defined, as a reader going down the page would)."""
    out = []
    for doc in DOCS:
        blocks = _BLOCK.findall(doc.read_text(encoding="utf-8"))
        if blocks:
            code = "\n".join(f"# --- block {i} of {doc.name}\n{b}" for i, b in enumerate(blocks))
            out.append(pytest.param(code, id=str(doc.relative_to(ROOT))))
    return out


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "NFT_DATA_DIR": str(cwd / "data")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_has_python_blocks():
    assert any(p.id == "README.md" for p in _documents()), "no ```python block in README.md: has the API section moved?"


@pytest.mark.parametrize("code", _documents())
def test_python_blocks_run(code, tmp_path):
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, f"snippet failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"


def _dotted_names() -> list[str]:
    names = set()
    for doc in DOCS:
        for span in _CODE_SPAN.findall(doc.read_text(encoding="utf-8")):
            names.update(_DOTTED.findall(span))
    return sorted(names)


def test_dotted_names_resolve_after_a_bare_import(tmp_path):
    names = _dotted_names()
    assert "nft_cuda.eval.monte_carlo" in names  # the scan finds what the README names
    code = (
        "import functools, nft_cuda\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for name in names:\n"
        "    try:\n"
        "        functools.reduce(getattr, name.split('.')[1:], nft_cuda)\n"
        "    except AttributeError as e:\n"
        "        bad.append(f'{name}: {e}')\n"
        "print('\\n'.join(bad))\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"names in the docs that do not resolve:\n{proc.stdout}"
