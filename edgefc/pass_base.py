"""What a pass is: a named transformation ``Graph -> Graph`` run with a :class:`PassContext`,
with the options it takes declared as a dataclass (``Pass.Options``).

Typed options: a pass says which options it reads, their types and their defaults; a value
given through the CLI, ``edgefc.compile(options=...)`` or ``get_pass(name, **options)`` is
checked against that declaration, and an unknown or mistyped option is a :class:`PassError`
naming the pass and the option (DESIGN.md: bad input is one clear sentence)::

    @dataclass
    class Options:
        sram_budget: int | None = None        # None: the pass's own default
        rows: int = 128
        def __post_init__(self):              # further validation: raise ValueError
            if self.rows < 1:
                raise ValueError("rows must be at least 1")

    @register_pass("my-tiling")
    class MyTiling(Pass):
        Options = Options
        def run(self, graph, ctx):
            rows = ctx.option("rows")          # this pass's validated value
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from edgefc.errors import PassError


@dataclass
class NoOptions:
    """The options of a pass that takes none."""


#: Options every compile carries that belong to no pass: read by the compiler, the pass manager
#: or the target (``emit``), declared here so a mistyped one is still an error.
@dataclass
class CompileOptions:
    shapes: dict | None = None          # --shape: input name -> static shape (canonicalize applies them)
    source_model: str | None = None     # the ONNX file compiled (set by edgefc.compile)
    emit: tuple[str, ...] = ()          # --emit: extra artifacts the target writes (tvm)
    no_fuse: tuple[str, ...] = ()       # --no-fuse: fusion passes removed from the pipeline


@dataclass
class PassContext:
    """What a pass may read besides the graph, and where it reports what it did.

    ``target``  the hardware description (``edgefc.target.Target``) or None for a target-free run;
    ``options`` compile options by name (``precision``, ``sram_budget``, ``shapes`` ...), checked
                against the declarations of the passes (:func:`check_options`);
    ``report``  sections a pass adds to ``report.json`` (e.g. ``report["fusion"]``);
    ``pass_options`` the running pass's validated ``Options`` (set by the pass manager);
    ``artifacts`` files a pass adds to the build folder: file name -> a function that writes it to
    the path it is given (``quantize``'s ``precision.png``), called when the build is written.
    """

    target: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    pass_options: Any = None
    artifacts: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        """The running pass's value of ``name`` (its declared option), else the compile-wide one."""
        if self.pass_options is not None and name in _field_types(type(self.pass_options)):
            value = getattr(self.pass_options, name)
        else:
            value = self.options.get(name)
        return default if value is None else value


class Pass:
    """Base class of every pass. Subclasses implement :meth:`run` and carry a docstring whose first
    line says what the pass does, followed by what it matches, what it emits, and the paper section.

    ``Options``: a dataclass declaring the options the pass reads (default: none).
    ``verify_tolerance``: the relative error ``--verify`` accepts for this pass (exact passes keep
    the default; quantization sets its own).
    ``handles_subgraphs``: whether it rewrites inside control-flow bodies (default: no; it must
    then leave them intact, and ``report.json`` ``subgraphs`` lists it).
    """

    name: str = ""
    namespace: str = "user"
    verify_tolerance: float = 1e-4
    Options: ClassVar[type] = NoOptions
    #: whether the pass rewrites inside the bodies of If / Loop / Scan nodes; one that does not
    #: leaves them as they are, and the pass manager says so (``report.json`` ``subgraphs``)
    handles_subgraphs: ClassVar[bool] = False

    def __init__(self, **options):
        self.explicit = {k: v for k, v in options.items() if v is not None}
        self.options = make_options(type(self), self.explicit)

    def configure(self, shared: dict[str, Any]) -> None:
        """Take the compile-wide values of the options this pass declares (values given to the
        constructor win)."""
        values = {k: v for k, v in shared.items() if k in _field_types(self.Options) and v is not None}
        self.options = make_options(type(self), {**values, **self.explicit})

    @property
    def id(self) -> str:
        return f"{self.namespace}::{self.name}"

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        raise NotImplementedError

    def __call__(self, graph: gs.Graph, ctx: PassContext | None = None) -> gs.Graph:
        ctx = ctx or PassContext()
        previous, ctx.pass_options = ctx.pass_options, self.options
        try:
            return self.run(graph, ctx)
        finally:
            ctx.pass_options = previous

    def __repr__(self) -> str:
        return f"<pass {self.id}>"


class FunctionPass(Pass):
    """A pass made from a plain function ``fn(graph, ctx) -> graph`` by ``register_pass``."""

    fn = None

    def run(self, graph, ctx):
        result = type(self).fn(graph, ctx)
        return graph if result is None else result


# --- option checking ------------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> type of an options dataclass (string annotations resolved)."""
    cached = cls.__dict__.get("_edgefc_field_types")
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
        cls._edgefc_field_types = cached
    return cached


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to ``tp``) for the types options use: bool, int, float, str, Path,
    Literal, Optional/unions, tuples and lists of those, dict, Any."""
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        out = []
        for v in value:
            ok, c = _coerce(v, args[0])
            if not ok:
                return False, value
            out.append(c)
        return True, (tuple(out) if origin is tuple else out)
    if tp is bool:
        return isinstance(value, (bool,)), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), float(value) \
            if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if tp is Path:
        return isinstance(value, (str, Path)), Path(value) if isinstance(value, (str, Path)) else value
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def check_option(owner: str, cls: type, name: str, value: Any) -> Any:
    """``value`` converted to the declared type of option ``name`` of ``cls``; PassError naming
    ``owner`` (the pass) and the option when it is not declared or does not fit."""
    types_ = _field_types(cls)
    if name not in types_:
        known = ", ".join(types_) or "none"
        raise PassError(f"pass '{owner}' has no option '{name}' (its options: {known})")
    if value is None:
        return None
    ok, converted = _coerce(value, types_[name])
    if not ok:
        raise PassError(f"pass '{owner}' option '{name}' must be {_describe(types_[name])}, got {value!r}")
    return converted


def make_options(pass_cls: type, values: dict[str, Any]):
    """The validated ``Options`` instance of ``pass_cls`` for ``values``."""
    cls = pass_cls.Options
    owner = pass_cls.name or pass_cls.__name__
    kwargs = {k: check_option(owner, cls, k, v) for k, v in values.items()}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise PassError(f"pass '{owner}': {e}") from None


def check_options(options: dict[str, Any], passes: dict[str, type]) -> None:
    """Check compile-wide ``options`` against the declarations of the registered ``passes``
    (id -> class) and :class:`CompileOptions`: a name no one declares is an error, a value that
    does not fit a declaring pass is an error naming that pass."""
    for name, value in options.items():
        owners = [cls for cls in passes.values() if name in _field_types(cls.Options)]
        if name in _field_types(CompileOptions):
            check_option("compile", CompileOptions, name, value)
        elif not owners:
            known = sorted({n for cls in passes.values() for n in _field_types(cls.Options)} |
                           set(_field_types(CompileOptions)))
            raise PassError(f"unknown option '{name}': no pass declares it (known: {', '.join(known)})")
        for cls in owners:
            make_options(cls, {name: value})
