"""Pattern rewriting, part 2 of 3 - binding: a :class:`~edgefc.pattern.Pattern` bound to a graph.

:func:`match` binds one pattern node (the *anchor*) to a graph node and grows the binding along
producer and consumer edges with a small backtracking search (branching only at commutative
inputs and at the choice among a tensor's consumers). The result is a :class:`Match` (pattern
names -> graph nodes and tensors) or a :class:`Miss` carrying the reason of the deepest failure,
which the rewrite driver (:mod:`edgefc.rewriter`) reports for every candidate that did not fuse.

Imports :mod:`edgefc.pattern` (the description) and nothing of the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.errors import InternalError, PassError
from edgefc.pattern import Check, Pattern, PNode, Value


def label(node: gs.Node) -> str:
    """How a reason names a graph node: ``Softmax '/attn/Softmax'``."""
    return f"{node.op} '{node.name}'"


def _verdict(result, default: str) -> str | None:
    """None if a check passed, else the reason it failed."""
    if result is None or result is True:
        return None
    if isinstance(result, str):
        return result
    return None if result else default


def _run_check(check: Check, arg, pattern: Pattern, what: str, default: str, on: str) -> str | None:
    """The verdict of a check written with a pattern. A check answers True/None, False or a reason;
    one that raises is a bug (in edgefc or a plugin), reported as an InternalError naming the
    pattern, the check and the node it was looking at."""
    try:
        result = check(arg)
    except Exception as e:
        raise InternalError(f"pattern '{pattern.name}': {what} raised {type(e).__name__}: {e} (at {on}); "
                            f"a check returns True, False or a reason") from None
    return _verdict(result, default)


# --- match results ------------------------------------------------------------------------------

@dataclass
class Miss:
    """Why a candidate did not match (falsy). ``depth``: pattern nodes bound when it failed."""

    reason: str
    depth: float = 0

    def __bool__(self) -> bool:
        return False


class Match:
    """A match: pattern node names -> graph nodes, placeholder names -> tensors."""

    def __init__(self, pattern: Pattern, nodes: dict[str, gs.Node], values: dict[int, gs.Tensor]):
        self.pattern = pattern
        self.nodes = nodes
        self._values = values
        self.tensors = {v.name: values[id(v)] for v in pattern.values.values() if id(v) in values}

    def __bool__(self) -> bool:
        return True

    def __getitem__(self, name: str):
        """A node by pattern node name, or a tensor by placeholder name."""
        if name in self.nodes:
            return self.nodes[name]
        if name in self.tensors:
            return self.tensors[name]
        raise KeyError(f"pattern '{self.pattern.name}' has no node or placeholder '{name}'")

    def get(self, name: str, default=None):
        try:
            return self[name]
        except KeyError:
            return default

    def const(self, name: str) -> np.ndarray:
        """The values of a constant placeholder (or of any constant-bound placeholder)."""
        t = self.tensors[name]
        if not isinstance(t, gs.Constant):
            raise PassError(f"placeholder '{name}' of pattern '{self.pattern.name}' is not bound to a constant")
        return t.values

    @property
    def outputs(self) -> list[gs.Tensor]:
        """The tensors of the pattern's outputs (what a replacement must produce), in pattern order."""
        return [self._values[id(v)] for v in self.pattern.output_values]

    @property
    def output(self) -> gs.Tensor:
        outs = self.outputs
        if len(outs) != 1:
            raise PassError(f"pattern '{self.pattern.name}' has {len(outs)} outputs; use .outputs")
        return outs[0]

    def all_nodes(self) -> list[gs.Node]:
        return list(self.nodes.values())

    def __repr__(self) -> str:
        return f"<match {self.pattern.name}: {', '.join(f'{k}={v.name}' for k, v in self.nodes.items())}>"




@dataclass
class _State:
    nodes: dict = field(default_factory=dict)     # pattern node name -> gs.Node
    values: dict = field(default_factory=dict)    # id(Value) -> gs.Tensor
    used: frozenset = frozenset()                 # id(gs.Node)

    def copy(self) -> _State:
        return _State(dict(self.nodes), dict(self.values), self.used)


class _Search:
    """Backtracking search for one pattern (patterns are small; branching comes only from
    commutative inputs and from choosing among a tensor's consumers)."""

    def __init__(self, pattern: Pattern, graph_outputs, taken):
        self.p = pattern
        self.graph_outputs = graph_outputs
        self.taken = taken
        self.miss: Miss | None = None

    def fail(self, state: _State, reason: str, prefer: bool = False, weak: bool = False, close: bool = False) -> None:
        """Remember the deepest failure. ``prefer``: also replace one of equal depth; ``weak``:
        lose against any other failure of equal depth (a binding conflict, as when a commutative
        node is tried in the wrong order, explains less than what the other order found);
        ``close``: the node had the right op and failed on a detail (attribute, arity, check),
        which explains more than a wrong op type."""
        depth = len(state.nodes) - (0.5 if weak else 0.0) + (0.25 if close else 0.0)
        if self.miss is None or depth > self.miss.depth or (prefer and depth == self.miss.depth):
            self.miss = Miss(reason, depth)

    def bind_value(self, v: Value, t: gs.Tensor, state: _State, where: str) -> bool:
        bound = state.values.get(id(v))
        if bound is not None:
            if bound is not t:
                what = f"'{v.name}'" if v.kind != "node" else f"the output of pattern node '{v.producer.name}'"
                self.fail(state, f"{where}: tensor '{t.name}' should be {what}, which is '{bound.name}'", weak=True)
                return False
            return True
        if v.kind == "const":
            if not isinstance(t, gs.Constant):
                self.fail(state, f"{where}: '{t.name}' is not a constant")
                return False
            if v.check is not None:
                why = _run_check(v.check, t, self.p, f"the check of constant '{v.name}'",
                                 f"constant '{t.name}' has the wrong value", f"'{t.name}'")
                if why:
                    self.fail(state, f"{where}: {why}")
                    return False
        state.values[id(v)] = t
        return True

    def bind(self, pn: PNode, node: gs.Node, state: _State):
        """Yield the states extending ``state`` with ``pn`` bound to ``node``."""
        here = label(node)
        if id(node) in state.used or id(node) in self.taken:
            self.fail(state, f"{here} is already part of another match")
            return
        if node.op not in pn.ops:
            self.fail(state, f"{here} is not {'/'.join(pn.ops)} (pattern node '{pn.name}')")
            return
        if pn.domain is not None and (node.domain or "") != pn.domain:
            self.fail(state, close=True, reason=f"{here} has domain '{node.domain or ''}', want '{pn.domain}'")
            return
        n_in = len(node.inputs)
        if n_in < len(pn.inputs) or (n_in > len(pn.inputs) and not pn.extra_inputs):
            self.fail(state, close=True, reason=f"{here} has {n_in} inputs, pattern node '{pn.name}' has {len(pn.inputs)}")
            return
        if len(node.outputs) < len(pn.outputs):
            self.fail(state, close=True, reason=f"{here} has {len(node.outputs)} outputs, pattern node '{pn.name}' has {len(pn.outputs)}")
            return
        for extra in node.outputs[len(pn.outputs):]:
            if extra.outputs or extra.name in self.graph_outputs:
                self.fail(state, close=True, reason=f"{here}: output '{extra.name}' is used but not part of pattern '{self.p.name}'")
                return
        for key, want in pn.attrs.items():
            have = node.attrs.get(key)
            if callable(want):
                why = _run_check(want, have, self.p, f"the check of attribute '{key}' of pattern node '{pn.name}'",
                                 f"attribute {key}={have!r} not accepted", here)
                if why and key not in why:
                    why = f"attribute {key} {why}"
            else:
                norm = list(have) if isinstance(have, (tuple, list)) else have
                wnorm = list(want) if isinstance(want, (tuple, list)) else want
                why = None if norm == wnorm else f"attribute {key}={have!r}, want {want!r}"
            if why:
                self.fail(state, f"{here}: {why}", close=True)
                return
        if pn.check is not None:
            why = _run_check(pn.check, node, self.p, f"the check of pattern node '{pn.name}'",
                             f"check of pattern node '{pn.name}' failed", here)
            if why:
                self.fail(state, f"{here}: {why}", close=True)
                return
        base = state.copy()
        base.nodes[pn.name] = node
        base.used = base.used | {id(node)}
        for k, v in enumerate(pn.outputs):
            if not self.bind_value(v, node.outputs[k], base, here):
                return
        orders = [list(range(len(pn.inputs)))]
        if pn.commutative and len(pn.inputs) == 2:
            orders.append([1, 0])
        for order in orders:
            st = base.copy()
            ok = True
            for v, i in zip(pn.inputs, order):
                if not self.bind_value(v, node.inputs[i], st, f"{here} input {i}"):
                    ok = False
                    break
            if ok:
                yield st

    def solve(self, state: _State):
        """Yield complete states extending ``state``."""
        if len(state.nodes) == len(self.p.nodes):
            why = self.finish(state)
            if why:
                self.fail(state, why)
            else:
                yield state
            return
        # 1. producer steps (deterministic): an unbound node whose output tensor is known
        for pn in self.p.nodes:
            if pn.name in state.nodes:
                continue
            for v in pn.outputs:
                t = state.values.get(id(v))
                if t is None:
                    continue
                if not t.inputs:
                    kind = "a constant" if isinstance(t, gs.Constant) else "a graph input"
                    self.fail(state, f"'{t.name}' is {kind}, pattern wants it produced by {'/'.join(pn.ops)}")
                    return
                producer = t.inputs[0]
                if v.index >= len(producer.outputs) or producer.outputs[v.index] is not t:
                    self.fail(state, f"'{t.name}' is output {list(producer.outputs).index(t)} of {label(producer)}, "
                                     f"pattern wants output {v.index}")
                    return
                for st in self.bind(pn, producer, state):
                    yield from self.solve(st)
                return
        # 2. consumer steps: an unbound node reading a known tensor
        for pn in self.p.nodes:
            if pn.name in state.nodes:
                continue
            for i, v in enumerate(pn.inputs):
                t = state.values.get(id(v))
                if t is None:
                    continue
                consumers = [c for c in t.outputs if id(c) not in state.used]
                if not consumers:
                    self.fail(state, f"'{t.name}' has no consumer that could be {'/'.join(pn.ops)} (pattern node '{pn.name}')")
                    return
                found = False
                for c in consumers:
                    for st in self.bind(pn, c, state):
                        for final in self.solve(st):
                            found = True
                            yield final
                if not found and len(consumers) > 1:
                    names = ", ".join(label(c) for c in consumers)
                    self.fail(state, f"no consumer of '{t.name}' matches pattern node '{pn.name}' "
                                     f"({'/'.join(pn.ops)}); its consumers: {names}", prefer=True)
                return
        raise PassError(f"pattern '{self.p.name}' is not connected (node '{next(n.name for n in self.p.nodes if n.name not in state.nodes)}' unreachable)")

    def finish(self, state: _State) -> str | None:
        """Whole-match rules: internal tensors stay internal; the pattern's own constraint."""
        for pn in self.p.nodes:
            for v in pn.outputs:
                if self.p.is_output(v):
                    continue
                t = state.values[id(v)]
                if t.name in self.graph_outputs:
                    return f"'{t.name}' is a graph output, so {label(state.nodes[pn.name])} cannot be fused away"
                for c in t.outputs:
                    if id(c) not in state.used:
                        return (f"'{t.name}' (output of {label(state.nodes[pn.name])}) is also used by "
                                f"{label(c)} outside the pattern")
        if self.p.where is not None:
            return _run_check(self.p.where, Match(self.p, state.nodes, state.values), self.p,
                              "the where-check", f"constraints of pattern '{self.p.name}' not met",
                              ", ".join(label(n) for n in state.nodes.values()))
        return None


def match(pattern: Pattern, node: gs.Node, anchor: str | None = None, *, graph_outputs=frozenset(),
          taken=frozenset()) -> Match | Miss:
    """Match ``pattern`` with its node ``anchor`` (default: the first whose op is ``node.op``) bound
    to ``node``: the first complete binding, else the deepest miss.

    ``graph_outputs``: names of the graph's outputs (internal tensors must not be among them);
    ``taken``: ids of graph nodes that must not be used (already replaced).
    """
    if anchor is None:
        cands = pattern.anchors(node.op)
        if not cands:
            ops = "/".join(sorted({o for n in pattern.nodes for o in n.ops}))
            return Miss(f"{label(node)} is not a {ops} node of pattern '{pattern.name}'", 0)
        anchor_node = cands[0]
    else:
        anchor_node = pattern.node(anchor)
    s = _Search(pattern, graph_outputs, taken)
    for state in s.bind(anchor_node, node, _State()):
        for final in s.solve(state):
            return Match(pattern, final.nodes, final.values)
    return s.miss if s.miss is not None else Miss(f"pattern '{pattern.name}' does not match at {label(node)}")
