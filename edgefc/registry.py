"""The pass registry: passes are found by id (``"namespace::name"``) or by unique short name.

Built-in passes (``edgefc.passes``) and targets (``edgefc.targets``) are imported here, lazily,
the first time a lookup needs them; this is the only place core reaches into those packages.
User passes register themselves the same way the built-in ones do (``@edgefc.register_pass``),
typically from a ``--plugin`` file.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import uuid
from pathlib import Path
from typing import Callable

from edgefc.errors import PassError
from edgefc.pass_base import FunctionPass, Pass

_PASSES: dict[str, type[Pass]] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("edgefc.passes")


def register_pass(name: str | None = None, *, namespace: str = "user", replace: bool = False):
    """Decorator registering a :class:`Pass` subclass or a ``fn(graph, ctx) -> graph`` function.

    The id is ``namespace::name`` (``name`` defaults to the class/function name with ``_`` -> ``-``).
    Registering an id twice is an error unless ``replace=True``.

    >>> @register_pass("my-pass")
    ... def my_pass(graph, ctx):
    ...     return graph
    """

    def decorate(obj):
        short = name or getattr(obj, "name", None) or obj.__name__.replace("_", "-").lower()
        if inspect.isclass(obj) and issubclass(obj, Pass):
            cls = obj
        elif callable(obj):
            cls = type(obj.__name__, (FunctionPass,), {"fn": staticmethod(obj), "__doc__": obj.__doc__})
        else:
            raise PassError(f"register_pass expects a Pass subclass or a function, got {obj!r}")
        pid = f"{namespace}::{short}"
        if pid in _PASSES and not replace:
            raise PassError(f"a pass with id '{pid}' is already registered")
        cls.name, cls.namespace = short, namespace
        _PASSES[pid] = cls
        return obj

    return decorate


def unregister_pass(pass_id: str) -> None:
    """Remove a registered pass (mainly for tests and interactive sessions)."""
    _PASSES.pop(resolve_pass_id(pass_id), None)


def resolve_pass_id(name: str) -> str:
    """``"canonicalize"`` or ``"edgefc::canonicalize"`` -> the registered id; PassError if unknown/ambiguous."""
    _load_builtins()
    if name in _PASSES:
        return name
    matches = [pid for pid in _PASSES if pid.split("::", 1)[1] == name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise PassError(f"pass name '{name}' is ambiguous: use one of {', '.join(sorted(matches))}")
    known = ", ".join(sorted(pid.split("::", 1)[1] for pid in _PASSES))
    raise PassError(f"unknown pass '{name}' (registered: {known}; see `edgefc passes`)")


def get_pass(name: str, **options) -> Pass:
    """An instance of the pass registered under ``name`` (id or short name)."""
    return _PASSES[resolve_pass_id(name)](**options)


def list_passes() -> dict[str, type[Pass]]:
    """All registered passes, id -> class, sorted by id."""
    _load_builtins()
    return dict(sorted(_PASSES.items()))


def load_plugin(spec: str) -> None:
    """Import a user plugin (a ``.py`` file or an importable module name) that registers passes."""
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.exists():
            if not path.is_file():
                raise PassError(f"plugin file not found: {spec}")
            mod_name = f"edgefc_plugin_{path.stem}_{uuid.uuid4().hex[:8]}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except PassError:
        raise
    except ModuleNotFoundError as e:
        raise PassError(f"cannot import plugin '{spec}': {e}") from None
    except SyntaxError as e:
        raise PassError(f"plugin '{spec}' has a syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # a broken plugin is the user's error, reported in one line
        raise PassError(f"plugin '{spec}' failed to import: {type(e).__name__}: {e}") from None


def one_line_doc(obj: Callable | type) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
