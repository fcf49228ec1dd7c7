"""Pattern rewriting: describe a small subgraph, match it, check constraints, replace it.

The fusions in ``edgefc.passes`` are written with this module, and so can a user's pass::

    p = Pattern("silu")
    x = p.input("x")
    sig = p.op("Sigmoid", x, name="sigmoid")
    p.op("Mul", x, sig, name="mul")            # Add and Mul match in either input order

    rewrite_all(graph, p, lambda m: [gs.Node("Swish", inputs=[m["x"]], outputs=m.outputs)])

A :class:`Pattern` is data: input placeholders (any tensor; the same name must bind the same
tensor everywhere), constant placeholders (bind a ``gs.Constant``, optionally checked, e.g. "a
scalar equal to 0.5"), and op nodes (op type or set of op types, attribute constraints, a
per-node check, commutativity, number of outputs). A match may start at *any* pattern node
(``anchor``) and grows along producer and consumer edges, so a fusion can be anchored at the
node that makes it a candidate (the ``Softmax`` of an attention, the ``Erf`` of a GELU) and say,
for every such candidate that did not match, why (:class:`Miss`, the deepest failure found).

Rules a match obeys (what makes the replacement safe):
  * a tensor that a pattern node consumes inside the pattern (an *internal* tensor) must have
    no consumer outside the match and must not be a graph output (it disappears);
  * tensors produced by a pattern node and consumed by no pattern node are the pattern's
    *outputs* (``Match.outputs``); they keep their consumers, the replacement writes them;
  * a graph node belongs to at most one match (the :class:`Rewriter` tracks what it replaced).

Matching costs O(pattern size) per candidate (gs keeps producer/consumer lists on every
tensor, and the :class:`Rewriter` indexes nodes by op once), so a pass is linear in the graph.

onnx-graphsurgeon's ``GraphPattern`` describes the same kind of subgraph (positional inputs,
one op per node, a ``check_func``); :meth:`Pattern.from_graphsurgeon` converts one, so a pattern
written for graphsurgeon gets anchored matching, miss reasons and the rewrite driver here.
(Its own ``match_all`` tries every node of the graph, has no commutative inputs and gives no
reason when nothing matches, which is why edgefc matches with this module.)
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.errors import PassError

COMMUTATIVE = frozenset({"Add", "Mul"})
Check = Callable[..., Any]  # returns True/None (ok), False (no) or a str (no, with the reason)


def _verdict(result: Any, default: str) -> str | None:
    """None if a check passed, else the reason it failed."""
    if result is None or result is True:
        return None
    if isinstance(result, str):
        return result
    if isinstance(result, (bool, np.bool_)):
        return None if result else default
    return None if result else default


def _label(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'"


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

    # matching
    def match(self, node: gs.Node, anchor: str | None = None, *, graph_outputs: frozenset = frozenset(),
              taken: set | frozenset = frozenset()) -> Match | Miss:
        """Match with pattern node ``anchor`` (default: the first whose op is ``node.op``) bound to ``node``.

        ``graph_outputs``: names of the graph's outputs (internal tensors must not be among them);
        ``taken``: ids of graph nodes that must not be used (already replaced).
        """
        if anchor is None:
            cands = self.anchors(node.op)
            if not cands:
                return Miss(f"{_label(node)} is not a {'/'.join(sorted({o for n in self.nodes for o in n.ops}))} "
                            f"node of pattern '{self.name}'", 0)
            anchor_node = cands[0]
        else:
            anchor_node = self.node(anchor)
        search = _Search(self, graph_outputs, taken)
        for state in search.bind(anchor_node, node, _State()):
            for final in search.solve(state):
                return Match(self, final.nodes, final.values)
        return search.miss if search.miss is not None else Miss(f"pattern '{self.name}' does not match at {_label(node)}")

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

    def tensor(self, value: Value) -> gs.Tensor:
        return self._values[id(value)]

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
                why = _verdict(v.check(t), f"constant '{t.name}' has the wrong value")
                if why:
                    self.fail(state, f"{where}: {why}")
                    return False
        state.values[id(v)] = t
        return True

    def bind(self, pn: PNode, node: gs.Node, state: _State):
        """Yield the states extending ``state`` with ``pn`` bound to ``node``."""
        label = _label(node)
        if id(node) in state.used or id(node) in self.taken:
            self.fail(state, f"{label} is already part of another match")
            return
        if node.op not in pn.ops:
            self.fail(state, f"{label} is not {'/'.join(pn.ops)} (pattern node '{pn.name}')")
            return
        if pn.domain is not None and (node.domain or "") != pn.domain:
            self.fail(state, close=True, reason=f"{label} has domain '{node.domain or ''}', want '{pn.domain}'")
            return
        n_in = len(node.inputs)
        if n_in < len(pn.inputs) or (n_in > len(pn.inputs) and not pn.extra_inputs):
            self.fail(state, close=True, reason=f"{label} has {n_in} inputs, pattern node '{pn.name}' has {len(pn.inputs)}")
            return
        if len(node.outputs) < len(pn.outputs):
            self.fail(state, close=True, reason=f"{label} has {len(node.outputs)} outputs, pattern node '{pn.name}' has {len(pn.outputs)}")
            return
        for extra in node.outputs[len(pn.outputs):]:
            if extra.outputs or extra.name in self.graph_outputs:
                self.fail(state, close=True, reason=f"{label}: output '{extra.name}' is used but not part of pattern '{self.p.name}'")
                return
        for key, want in pn.attrs.items():
            have = node.attrs.get(key)
            if callable(want):
                why = _verdict(want(have), f"attribute {key}={have!r} not accepted")
            else:
                norm = list(have) if isinstance(have, (tuple, list)) else have
                wnorm = list(want) if isinstance(want, (tuple, list)) else want
                why = None if norm == wnorm else f"attribute {key}={have!r}, want {want!r}"
            if why:
                self.fail(state, f"{label}: {why}", close=True)
                return
        if pn.check is not None:
            why = _verdict(pn.check(node), f"check of pattern node '{pn.name}' failed")
            if why:
                self.fail(state, f"{label}: {why}", close=True)
                return
        base = state.copy()
        base.nodes[pn.name] = node
        base.used = base.used | {id(node)}
        for k, v in enumerate(pn.outputs):
            if not self.bind_value(v, node.outputs[k], base, label):
                return
        orders = [list(range(len(pn.inputs)))]
        if pn.commutative and len(pn.inputs) == 2:
            orders.append([1, 0])
        for order in orders:
            st = base.copy()
            ok = True
            for v, i in zip(pn.inputs, order):
                if not self.bind_value(v, node.inputs[i], st, f"{label} input {i}"):
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
                    self.fail(state, f"'{t.name}' is output {list(producer.outputs).index(t)} of {_label(producer)}, "
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
                    names = ", ".join(_label(c) for c in consumers)
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
                    return f"'{t.name}' is a graph output, so {_label(state.nodes[pn.name])} cannot be fused away"
                for c in t.outputs:
                    if id(c) not in state.used:
                        return (f"'{t.name}' (output of {_label(state.nodes[pn.name])}) is also used by "
                                f"{_label(c)} outside the pattern")
        if self.p.where is not None:
            return _verdict(self.p.where(Match(self.p, state.nodes, state.values)),
                            f"constraints of pattern '{self.p.name}' not met")
        return None


# --- rewriting ----------------------------------------------------------------------------------

class RewriteLog:
    """What a set of rewrites did: counts by kind and, per kind, the candidates that did not
    match with the reason (the ``report.json`` ``fusion`` section is made from it)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.misses: dict[str, dict[str, str]] = defaultdict(dict)

    def count(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n

    def miss(self, kind: str, node: gs.Node, reason: str) -> None:
        self.misses[kind][node.name] = reason

    def resolve(self, kind: str, node: gs.Node) -> None:
        """A candidate matched after all (by a later pattern): forget its miss."""
        self.misses.get(kind, {}).pop(node.name, None)

    def record(self, report: dict, kinds: Iterable[str] | None = None, section: str = "fusion") -> dict:
        """Merge into ``report[section]`` (e.g. ``ctx.report``): counts add up; the misses of
        ``kinds`` (default: every kind logged) become this log's, so a pass that runs twice
        reports what is still unfused at the end. Returns the section."""
        kinds = list(kinds) if kinds is not None else sorted(set(self.counts) | set(self.misses))
        out = report.setdefault(section, {})
        misses = out.pop("misses", {})
        for kind in kinds:
            out[kind] = int(out.get(kind, 0)) + int(self.counts.get(kind, 0))
            found = self.misses.get(kind)
            if found:
                misses[kind] = [{"node": n, "reason": r} for n, r in found.items()]
            else:
                misses.pop(kind, None)
        out["misses"] = misses  # kept last, after the counts
        return out

    def as_dict(self) -> dict:
        out: dict[str, Any] = dict(sorted(self.counts.items()))
        out["misses"] = {k: [{"node": n, "reason": r} for n, r in v.items()] for k, v in sorted(self.misses.items()) if v}
        return out


class Rewriter:
    """Applies rewrites to one graph.

    Indexes nodes by op once; hands out candidates in graph order; records replaced nodes so
    they are skipped and removed in one sweep by :meth:`commit` (which also topologically
    sorts, because replacements are appended at the end of the node list).
    """

    def __init__(self, graph: gs.Graph, log: RewriteLog | None = None):
        self.graph = graph
        self.log = log if log is not None else RewriteLog()
        self.graph_outputs = frozenset(t.name for t in graph.outputs)
        self.removed: set[int] = set()
        self._by_op: dict[str, list[gs.Node]] | None = None
        self._added: list[gs.Node] = []
        self._names: set[str] | None = None

    def _index(self) -> dict[str, list[gs.Node]]:
        if self._by_op is None:
            self._by_op = defaultdict(list)
            for n in self.graph.nodes:
                self._by_op[n.op].append(n)
        return self._by_op

    def nodes(self, *ops: str) -> list[gs.Node]:
        """Live nodes of the given op types, in graph order (a snapshot: safe to rewrite while iterating)."""
        index = self._index()
        found = [n for op in ops for n in index.get(op, ())]
        if len(ops) > 1:
            order = {id(n): i for i, n in enumerate(self.graph.nodes)}
            found.sort(key=lambda n: order.get(id(n), len(order)))
        return [n for n in found if id(n) not in self.removed]

    def alive(self, node: gs.Node) -> bool:
        return id(node) not in self.removed

    def match(self, pattern: Pattern, node: gs.Node, anchor: str | None = None) -> Match | Miss:
        if id(node) in self.removed:
            return Miss(f"{_label(node)} was already rewritten", 0)
        return pattern.match(node, anchor, graph_outputs=self.graph_outputs, taken=self.removed)

    def match_any(self, patterns: Sequence[Pattern], node: gs.Node, anchor: str | None = None) -> Match | Miss:
        """The first pattern that matches at ``node``, else the deepest miss among them."""
        best: Miss | None = None
        for p in patterns:
            anc = anchor if anchor is None or any(n.name == anchor for n in p.nodes) else None
            m = self.match(p, node, anc)
            if m:
                return m
            if best is None or m.depth > best.depth:
                best = m
        return best if best is not None else Miss("no pattern given")

    def unique_name(self, base: str) -> str:
        if self._names is None:
            self._names = {n.name for n in self.graph.nodes}
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def replace(self, match: Match | Iterable[gs.Node], new_nodes: Sequence[gs.Node]) -> list[gs.Node]:
        """Replace the matched nodes by ``new_nodes``, which must write the match's output tensors
        (``match.outputs``) and read only tensors that survive (inputs/constants of the match or
        tensors of their own)."""
        old = match.all_nodes() if isinstance(match, Match) else list(match)
        for n in old:
            n.outputs.clear()
        for n in old:
            n.inputs.clear()
            self.removed.add(id(n))
        for n in new_nodes:
            self._added.append(n)
            if self._by_op is not None:
                self._by_op[n.op].append(n)
        return list(new_nodes)

    def commit(self) -> gs.Graph:
        """Drop replaced nodes, add the new ones, restore topological order."""
        if self.removed or self._added:
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self.removed] + \
                               [n for n in self._added if id(n) not in self.removed]
            self.graph.toposort()
        self.removed, self._added, self._by_op = set(), [], None
        return self.graph


def rewrite_all(graph: gs.Graph, pattern: Pattern | Sequence[Pattern], replace: Callable[[Match], Sequence[gs.Node]],
                *, anchor: str | None = None, ops: Sequence[str] | None = None, kind: str | None = None,
                log: RewriteLog | None = None) -> int:
    """Rewrite every match of ``pattern`` (or the first matching of several) in ``graph``.

    Candidates are the nodes whose op is the anchor's (``anchor``, default the pattern's last
    node) or ``ops``; ``replace(match)`` returns the new nodes, which write ``match.outputs``; it
    may return None to decline (the candidate is then reported as a miss). With ``kind`` and
    ``log``, counts and misses are recorded. Returns the number of rewrites.
    """
    patterns = [pattern] if isinstance(pattern, Pattern) else list(pattern)
    anchor_name = anchor or patterns[0].nodes[-1].name
    if ops is None:
        ops = sorted({o for p in patterns for n in p.nodes if n.name == anchor_name for o in n.ops})
    rw = Rewriter(graph, log)
    done = 0
    for node in rw.nodes(*ops):
        if not rw.alive(node):
            continue
        m = rw.match_any(patterns, node, anchor_name)
        if not m:
            if kind:
                rw.log.miss(kind, node, m.reason)
            continue
        new = replace(m)
        if new is None:
            if kind:
                rw.log.miss(kind, node, "the replacement declined this match")
            continue
        rw.replace(m, new)
        done += 1
        if kind:
            rw.log.count(kind)
    rw.commit()
    return done


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
