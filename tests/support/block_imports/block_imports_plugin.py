"""pytest plugin (``-p block_imports_plugin``): keep the BLOCK_MODULES blocker of sitecustomize.py first
among the import finders, ahead of the assertion-rewriting hook pytest inserts after start-up."""

import sys

import sitecustomize


def pytest_configure(config):
    if sitecustomize.FINDER in sys.meta_path:
        sys.meta_path.remove(sitecustomize.FINDER)
    sys.meta_path.insert(0, sitecustomize.FINDER)
