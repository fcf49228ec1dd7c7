"""The pass registry: passes are found by id (``"namespace::name"``) or by unique short name;
pipelines are named lists of passes and pipelines (data), expanded to pass ids here.

Built-in pipelines: ``fuse`` (every fusion pass, in order; registered by ``passes/fusion.py``),
``default`` (what a target-free or host compile runs) and ``npu`` (what an NPU target runs).
A pipeline name may stand wherever a pass name may: ``--passes canonicalize,fuse`` runs the
eight fusion passes one by one, so ``--verify``, ``--dump-after``, timings and node counts name
each of them. :func:`insert_passes` places passes into a pipeline next to one of its passes
(``--insert-after fuse-epilogue=my-pass``), so a user pass joins ``npu`` without spelling it out.

The built-in passes (``edgefc.passes``) are imported here, lazily, the first time a lookup needs
them (as :mod:`edgefc.target` imports ``edgefc.targets``); core never imports them otherwise.
User passes register themselves the same way the built-in ones do (``@edgefc.register_pass``),
typically from a ``--plugin`` file.
"""

from __future__ import annotations

import dataclasses
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
_PIPELINES: dict[str, tuple[str, ...]] = {
    "default": ("canonicalize", "fuse"),
    "npu": ("canonicalize", "fuse", "quantize", "mlt"),
}


def load_builtins() -> None:
    """Import the built-in passes; every lookup calls it (after the first import, Python's module
    cache makes it a dictionary lookup)."""
    importlib.import_module("edgefc.passes")


def register_pipeline(name: str, passes, *, replace: bool = False) -> None:
    """Register a named pipeline: an ordered list of pass and pipeline names (data, expanded when
    a PassManager is built). A pipeline may not share a name with a pass; registering a name
    twice is an error unless ``replace=True``.

    >>> register_pipeline("npu-hardswish", ["npu", "fuse-hardswish"])
    """
    load_builtins()
    if isinstance(passes, str):
        raise PassError(f"pipeline '{name}': give a list of pass names, not the string {passes!r}")
    if name in _PIPELINES and not replace:
        raise PassError(f"a pipeline named '{name}' is already registered")
    if any(pid.split("::", 1)[1] == name for pid in _PASSES):
        raise PassError(f"'{name}' is already the name of a pass")
    _PIPELINES[name] = tuple(passes)


def list_pipelines() -> dict[str, tuple[str, ...]]:
    """Registered pipelines, name -> its list (not expanded)."""
    load_builtins()
    return dict(sorted(_PIPELINES.items()))


def is_pipeline(name: str) -> bool:
    load_builtins()
    return name in _PIPELINES


def is_known(name: str) -> bool:
    """Whether ``name`` is a registered pipeline or resolves to exactly one pass."""
    if is_pipeline(name):
        return True
    try:
        resolve_pass_id(name)
        return True
    except PassError:
        return False


def expand(names, _seen: tuple[str, ...] = ()) -> list[str]:
    """Pass ids of a list of pass and pipeline names, pipelines expanded in place; PassError for
    an unknown name (before any work is done)."""
    load_builtins()
    out: list[str] = []
    for name in names:
        if name in _PIPELINES:
            if name in _seen:
                raise PassError(f"pipeline '{name}' includes itself")
            out.extend(expand(_PIPELINES[name], _seen + (name,)))
        else:
            out.append(resolve_pass_id(name))
    return out


def _names(value) -> list[str]:
    """A pass name, a comma-separated string of them, or a list of names -> a list of names."""
    items = [value] if isinstance(value, str) else list(value)
    return [n.strip() for item in items for n in str(item).split(",") if n.strip()]


def insert_passes(names, *, after: dict | None = None, before: dict | None = None) -> list[str]:
    """The pass ids of ``names`` (pass and pipeline names, expanded) with more passes placed in:
    ``after`` / ``before`` map an *anchor* to the pass(es) to run right after / right before it
    (a name, a comma-separated string or a list; pipelines expand in place).

    An anchor is a pass (id or short name) or a pipeline (after: its last pass; before: its
    first) of ``names``; the first occurrence counts. PassError, before any work, for an anchor
    that is not in the pipeline or a pass that is not registered.

    >>> insert_passes(["npu"], after={"fuse-epilogue": "fuse-hardswish"})
    ['edgefc::canonicalize', ..., 'edgefc::fuse-epilogue', 'user::fuse-hardswish', 'edgefc::quantize', ...]
    """
    ids = expand(names)
    for where, table in (("after", after or {}), ("before", before or {})):
        for anchor, new in table.items():
            try:
                span = expand([anchor])
            except PassError:
                span = []
            at = [i for i, pid in enumerate(ids) if span and pid == (span[-1] if where == "after" else span[0])]
            if not at:
                shown = ", ".join(pid.split("::", 1)[1] for pid in ids)
                raise PassError(f"cannot insert {where} '{anchor}': no pass or pipeline of that name in the "
                                f"pipeline ({shown})")
            added = expand(_names(new))
            if not added:
                raise PassError(f"nothing to insert {where} '{anchor}'")
            pos = at[0] + 1 if where == "after" else at[0]
            ids[pos:pos] = added
    return ids


def pass_classes() -> dict[str, type[Pass]]:
    """Every registered pass class by id (loads the built-ins)."""
    load_builtins()
    return dict(_PASSES)


def register_pass(name: str | None = None, *, namespace: str = "user", replace: bool = False,
                  options: type | None = None):
    """Decorator registering a :class:`Pass` subclass or a ``fn(graph, ctx) -> graph`` function.

    The id is ``namespace::name`` (``name`` defaults to the class/function name with ``_`` -> ``-``).
    Registering an id twice is an error unless ``replace=True``. ``options``: the dataclass of
    options a function pass reads (a class declares ``Options`` itself).

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
        if options is not None:
            if not dataclasses.is_dataclass(options):
                raise PassError(f"register_pass({short!r}): options must be a dataclass, got {options!r}")
            cls.Options = options
        pid = f"{namespace}::{short}"
        if short in _PIPELINES:
            raise PassError(f"'{short}' is already the name of a pipeline")
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
    load_builtins()
    if name in _PASSES:
        return name
    matches = [pid for pid in _PASSES if pid.split("::", 1)[1] == name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise PassError(f"pass name '{name}' is ambiguous: use one of {', '.join(sorted(matches))}")
    known = ", ".join(sorted(pid.split("::", 1)[1] for pid in _PASSES))
    pipelines = ", ".join(sorted(_PIPELINES))
    raise PassError(f"unknown pass '{name}' (registered: {known}; pipelines: {pipelines}; see `edgefc passes`)")


def get_pass(name: str, **options) -> Pass:
    """An instance of the pass registered under ``name`` (id or short name), with ``options``
    checked against its declared ``Options`` (PassError naming the pass and the option)."""
    return _PASSES[resolve_pass_id(name)](**options)


def list_passes() -> dict[str, type[Pass]]:
    """All registered passes, id -> class, sorted by id."""
    load_builtins()
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
