"""What a pass is: a named transformation ``Graph -> Graph`` run with a :class:`PassContext`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx_graphsurgeon as gs


@dataclass
class PassContext:
    """What a pass may read besides the graph, and where it reports what it did.

    ``target``  the hardware description (``edgefc.target.Target``) or None for a target-free run;
    ``options`` compile options by name (``precision``, ``sram_budget``, ``shapes`` ...);
    ``report``  sections a pass adds to ``report.json`` (e.g. ``report["fusion"]``).
    """

    target: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value


class Pass:
    """Base class of every pass. Subclasses implement :meth:`run` and carry a docstring whose first
    line says what the pass does, followed by what it matches, what it emits, and the paper section.

    ``verify_tolerance``: the relative error ``--verify`` accepts for this pass (exact passes keep
    the default; quantization sets its own).
    """

    name: str = ""
    namespace: str = "user"
    verify_tolerance: float = 1e-4

    def __init__(self, **options):
        self.options = options

    @property
    def id(self) -> str:
        return f"{self.namespace}::{self.name}"

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        raise NotImplementedError

    def __call__(self, graph: gs.Graph, ctx: PassContext | None = None) -> gs.Graph:
        return self.run(graph, ctx or PassContext())

    def __repr__(self) -> str:
        return f"<pass {self.id}>"


class FunctionPass(Pass):
    """A pass made from a plain function ``fn(graph, ctx) -> graph`` by ``register_pass``."""

    fn = None

    def run(self, graph, ctx):
        result = type(self).fn(graph, ctx)
        return graph if result is None else result
