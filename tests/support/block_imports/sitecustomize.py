"""Test aid: run with the optional packages named in BLOCK_MODULES made unimportable, as if not installed.

    BLOCK_MODULES=matplotlib,hypothesis PYTHONPATH=tests/support/block_imports:$PWD \
        python -m pytest -p block_imports_plugin -p no:hypothesispytest tests

Python imports this file at start-up (it is on PYTHONPATH), in the test process and in every subprocess a
test starts. ``block_imports_plugin`` keeps the blocker ahead of pytest's own import hook; ``-p
no:hypothesispytest`` drops hypothesis's pytest plugin, which an installation without hypothesis lacks.
"""

import importlib.abc
import importlib.machinery
import os
import sys

BLOCKED = {m for m in os.environ.get("BLOCK_MODULES", "").split(",") if m}


class Blocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a blocked module (a spec without origin: ``importlib.util.find_spec`` probes, e.g. torch's,
    see nothing to load) and fails to load it, as an import of a missing package fails."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named '{spec.name}' (blocked: BLOCK_MODULES)", name=spec.name)

    def exec_module(self, module):
        pass


FINDER = Blocker()
sys.meta_path.insert(0, FINDER)
