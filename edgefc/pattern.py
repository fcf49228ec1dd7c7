"""Pattern rewriting, part 1 of 3 - the description: what a small subgraph to find looks like.

The three parts, each importing only the ones before it: :mod:`edgefc.pattern` (this module:
placeholders, op nodes, constant and attribute checks), :mod:`edgefc.matcher` (binding a pattern
to a graph: :class:`~edgefc.matcher.Match` or :class:`~edgefc.matcher.Miss`) and
:mod:`edgefc.rewriter` (the driver: a fusion declared as :class:`~edgefc.rewriter.Fusion` -
``(patterns, anchor, replacement)`` - matched, rewritten and logged by
:func:`~edgefc.rewriter.apply`, the :class:`~edgefc.rewriter.RewriteLog` behind ``report.json``
``fusion``). All three are public as ``edgefc.Pattern``, ``edgefc.match``, ``edgefc.Fusion`` ...

The fusions in ``edgefc.passes`` are declared with them, and so can a user's pass::

    p = Pattern("silu")
    x = p.input("x")
    sig = p.op("Sigmoid", x, name="sigmoid")
    p.op("Mul", x, sig, name="mul")            # Add and Mul match in either input order

    SWISH = Fusion("swish", [p], anchor="sigmoid",
                   replacement=lambda m, rw: [gs.Node("Swish", inputs=[m["x"]], outputs=m.outputs)])

A :class:`Pattern` is data: input placeholders (any tensor; the same name must bind the same
tensor everywhere), constant placeholders (bind a ``gs.Constant``, optionally checked, e.g. "a
scalar equal to 0.5"), and op nodes (op type or set of op types, attribute constraints, a
per-node check, commutativity, number of outputs). A match may start at *any* pattern node
(the *anchor*) and grows along producer and consumer edges, so a fusion can be anchored at the
node that makes it a candidate (the ``Softmax`` of an attention, the ``Erf`` of a GELU) and say,
for every such candidate that did not match, why (the deepest failure found).

Rules a match obeys (what makes the replacement safe):
  * a tensor that a pattern node consumes inside the pattern (an *internal* tensor) must have
    no consumer outside the match and must not be a graph output (it disappears);
  * tensors produced by a pattern node and consumed by no pattern node are the pattern's
    *outputs* (``Match.outputs``); they keep their consumers, the replacement writes them;
  * a graph node belongs to at most one match (the rewriter tracks what it replaced).

Matching costs O(pattern size) per candidate (gs keeps producer/consumer lists on every
tensor, and the rewriter indexes nodes by op once), so a pass is linear in the graph.

onnx-graphsurgeon's ``GraphPattern`` describes the same kind of subgraph (positional inputs,
one op per node, a ``check_func``); :meth:`Pattern.from_graphsurgeon` converts one, so a pattern
written for graphsurgeon gets anchored matching, miss reasons and the rewrite driver here.
(Its own ``match_all`` tries every node of the graph, has no commutative inputs and gives no
reason when nothing matches, which is why edgefc matches with its own matcher.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.errors import PassError

COMMUTATIVE = frozenset({"Add", "Mul"})
Check = Callable[..., Any]  # returns True/None (ok), False (no) or a str (no, with the reason)


# --- pattern description ------------------------------------------------------------------------

class Value:
    """A tensor in a pattern: an input placeholder, a constant placeholder or a node output."""

    def __init__(self, pattern: Pattern, kind: str, name: str, producer: PNode | None = None,
                 index: int = 0, check: Check | None = None):
        self.pattern, self.kind, self.name = pattern, kind, name
        self.producer, self.index, self.check = producer, index, check
        self.consumers: list[PNode] = []

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>"


class PNode:
    """An op node of a pattern."""

    def __init__(self, name: str, ops: tuple[str, ...], inputs: list[Value], attrs: dict, check: Check | None,
                 commutative: bool, extra_inputs: bool, domain: str | None):
        self.name, self.ops, self.inputs, self.attrs, self.check = name, ops, inputs, attrs, check
        self.commutative, self.extra_inputs, self.domain = commutative, extra_inputs, domain
        self.outputs: list[Value] = []

    def __repr__(self) -> str:
        return f"<pattern node {self.name}: {'|'.join(self.ops)}>"


class Pattern:
    """A small subgraph to find. Build it with :meth:`input`, :meth:`const` and :meth:`op`."""

    def __init__(self, name: str, where: Check | None = None):
        self.name = name
        self.where = where  # where(match) -> True/None | False | "reason": constraints over the whole match
        self.nodes: list[PNode] = []
        self.values: dict[str, Value] = {}
        self._marked_outputs: set[int] = set()

    # building
    def _new_name(self, name: str | None, prefix: str) -> str:
        if name is None:
            i = len(self.nodes) + len(self.values)
            name = f"{prefix}{i}"
            while name in self.values or any(n.name == name for n in self.nodes):
                i += 1
                name = f"{prefix}{i}"
        if name in self.values or any(n.name == name for n in self.nodes):
            raise PassError(f"pattern '{self.name}': the name '{name}' is used twice")
        return name

    def input(self, name: str) -> Value:
        """A placeholder for any tensor (graph input, constant or node output)."""
        v = Value(self, "input", self._new_name(name, "in"))
        self.values[v.name] = v
        return v

    def const(self, name: str | None = None, check: Check | None = None) -> Value:
        """A placeholder that binds a constant; ``check(constant: gs.Constant)`` may constrain it
        (read ``.shape`` when that is enough: ``.values`` loads a large weight)."""
        v = Value(self, "const", self._new_name(name, "c"), check=check)
        self.values[v.name] = v
        return v

    def op(self, op: str | Iterable[str], *inputs: Value, name: str | None = None, attrs: dict | None = None,
           check: Check | None = None, commutative: bool | None = None, outputs: int = 1,
           extra_inputs: bool = False, domain: str | None = None) -> Value | tuple[Value, ...]:
        """Add an op node; returns its output value (a tuple when ``outputs > 1``).

        ``attrs`` maps attribute names to the value required or to ``fn(value_or_None) -> verdict``;
        ``check(node) -> verdict`` sees the graph node; ``commutative`` (default: Add and Mul)
        lets a two-input node match its inputs in either order; ``extra_inputs`` lets the graph
        node have more inputs than the pattern lists (optional trailing inputs).
        """
        ops = (op,) if isinstance(op, str) else tuple(op)
        for v in inputs:
            if not isinstance(v, Value) or v.pattern is not self:
                raise PassError(f"pattern '{self.name}': inputs of '{op}' must be values of this pattern")
        if commutative is None:
            commutative = len(inputs) == 2 and all(o in COMMUTATIVE for o in ops)
        node = PNode(self._new_name(name, "n"), ops, list(inputs), dict(attrs or {}), check, commutative,
                     extra_inputs, domain)
        for v in inputs:
            v.consumers.append(node)
        for k in range(outputs):
            out = Value(self, "node", f"{node.name}:{k}", producer=node, index=k)
            node.outputs.append(out)
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    def output(self, *values: Value) -> None:
        """Declare node outputs that may keep consumers outside the match although a pattern node
        consumes them too (by default only unconsumed node outputs are outputs)."""
        for v in values:
            self._marked_outputs.add(id(v))

    def node(self, name: str) -> PNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise PassError(f"pattern '{self.name}' has no node '{name}'")

    def is_output(self, v: Value) -> bool:
        return v.kind == "node" and (not v.consumers or id(v) in self._marked_outputs)

    @property
    def output_values(self) -> list[Value]:
        return [v for n in self.nodes for v in n.outputs if self.is_output(v)]

    def anchors(self, op: str) -> list[PNode]:
        return [n for n in self.nodes if op in n.ops]

    @classmethod
    def from_graphsurgeon(cls, gp: gs.GraphPattern, name: str = "graphsurgeon", *, commutative: bool = False,
                          where: Check | None = None) -> Pattern:
        """Convert an onnx-graphsurgeon ``GraphPattern`` made of single-op nodes.

        Inputs stay positional as in graphsurgeon unless ``commutative=True`` (then Add/Mul match
        in either order); constants become constant placeholders, ``check_func`` the node check.
        """
        p = cls(name, where=where)
        values: dict[int, Value] = {}
        for i, tid in enumerate(gp.input_tensors):
            values[tid] = p.input(f"input{i}")
        for tid, cname in gp.constant_tensors.items():
            values[tid] = p.const(cname)
        for node_name, sub in gp.nodes.items():
            if sub.op is None:
                raise PassError(f"GraphPattern node '{node_name}' is a nested pattern; only single-op nodes convert")
            try:
                ins = [values[t] for t in gp.node_inputs[node_name]]
            except KeyError:
                raise PassError(f"GraphPattern node '{node_name}' uses a tensor defined after it") from None
            outs = p.op(sub.op, *ins, name=node_name, check=sub.check_func,
                        commutative=None if commutative else False, outputs=len(gp.node_outputs[node_name]))
            outs = outs if isinstance(outs, tuple) else (outs,)
            for tid, v in zip(gp.node_outputs[node_name], outs):
                values[tid] = v
        for tid in gp.output_tensors:
            if values[tid].consumers:
                p.output(values[tid])
        return p


# --- constant helpers shared by patterns ---------------------------------------------------------

def _size(c) -> int:
    shape = c.shape if isinstance(c, gs.Constant) else np.shape(c)
    return int(np.prod(shape, dtype=np.int64)) if shape is not None else -1


def scalar(c) -> float | None:
    """The value of a constant (``gs.Constant`` or array) that holds one number, else None.
    Looks at the shape first, so a large weight is never loaded."""
    if _size(c) != 1:
        return None
    arr = np.asarray(c.values if isinstance(c, gs.Constant) else c)
    return float(arr.reshape(-1)[0]) if np.issubdtype(arr.dtype, np.number) else None


def is_scalar(expected: float, rtol: float = 1e-6, atol: float = 0.0) -> Check:
    """A constant check: one number close to ``expected``."""
    def check(c):
        v = scalar(c)
        if v is None:
            return f"constant of shape {list(np.shape(c) if not isinstance(c, gs.Constant) else c.shape)} is not a scalar (want {expected:g})"
        if not np.isclose(v, expected, rtol=rtol, atol=atol):
            return f"constant is {v:g}, want {expected:g}"
        return True
    return check


def any_scalar(c) -> bool | str:
    """A constant check: one number."""
    return True if scalar(c) is not None else "constant is not a scalar"


def close_to(expected: float, *, default: float | None = None, rtol: float = 1e-6, atol: float = 0.0) -> Check:
    """An attribute check (for ``p.op(..., attrs={name: close_to(...)})``): a number close to
    ``expected``. ``default`` is the value ONNX gives the attribute when a node omits it (the
    op's schema default, e.g. ``HardSigmoid`` alpha 0.2); without one an absent attribute is a
    miss."""
    def check(value):
        if value is None:
            if default is None:
                return f"is absent (want {expected:g})"
            value = default
        if not isinstance(value, (int, float, np.number)):
            return f"is {value!r}, not a number (want {expected:g})"
        if not np.isclose(float(value), expected, rtol=rtol, atol=atol):
            return f"is {float(value):g}, want {expected:g}"
        return True
    return check
