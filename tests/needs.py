"""Markers for the tests that need the models extra (torch, diffusers, transformers): each such test
skips on its own when the package is missing, so the compiler's own tests run without it
(``.ci/run`` runs the suite once more with them hidden, ``.ci/no-torch``)."""

from __future__ import annotations

import importlib

import pytest


def installed(name: str) -> bool:
    """Whether ``import name`` works (an import, not a lookup: a package that is present but cannot
    be imported counts as missing)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _marker(*names: str):
    missing = [n for n in names if not installed(n)]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (pip install 'edgefc[models]')")


#: the test builds or runs a torch module (an export, training, the companion pipeline)
torch = _marker("torch")
#: ... and diffusers (their models and schedulers)
diffusers = _marker("torch", "diffusers")
#: ... transformers (the real CLIP tokenizer)
transformers = _marker("transformers")
