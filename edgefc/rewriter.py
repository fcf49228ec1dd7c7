"""Pattern rewriting, part 3 of 3 - the driver: fusions declared as data, applied and logged.

A fusion is declared as a :class:`Fusion` - TVM Relax's ``(pattern, annotations, check)`` triple
as ``(patterns, anchor, replacement)``: the patterns to find (:mod:`edgefc.pattern`), the
pattern node bound to each candidate graph node (the *anchor*: the ``Softmax`` of an attention,
the ``Erf`` of a GELU), and the replacement that builds the new nodes from a match. The driver,
:func:`apply_fusions` (one :class:`Rewriter` per call), does the rest the same way for every
fusion: it visits the candidates in graph order, binds the patterns (:func:`edgefc.matcher.match`),
calls the replacement, removes what was replaced and restores topological order, and keeps the
:class:`RewriteLog` - rewrites counted per kind and, per kind, every candidate that did not match
with the reason (``report.json`` ``fusion``; onnxruntime's fusions miss silently when an exporter
changes, these say why). :class:`FusionPass` makes a registered pass of a list of fusions.

Imports the description (:mod:`edgefc.pattern`) and the binding (:mod:`edgefc.matcher`); neither
imports this module.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx_graphsurgeon as gs

from edgefc import functions
from edgefc.errors import PassError
from edgefc.matcher import Match, Miss, label, match
from edgefc.pass_base import Pass, PassContext
from edgefc.pattern import Pattern


class Bound(Protocol):
    """What a replacement receives: a :class:`~edgefc.matcher.Match`, or what a custom matcher
    returns; the driver only needs the graph nodes it covers."""

    def all_nodes(self) -> list[gs.Node]: ...


#: ``replacement(match, rewriter)``: the new nodes, which write the match's output tensors and read
#: only tensors that survive; None or a :class:`Miss` declines the match (a miss, with its reason).
Replacement = Callable[[Any, "Rewriter"], "Sequence[gs.Node] | Miss | None"]


@dataclass(frozen=True)
class Fusion:
    """A rewrite declared as data: ``(patterns, anchor, replacement)``.

    ``kind``         the ``report.json`` ``fusion`` key its rewrites are counted and its misses
                     reported under;
    ``patterns``     tried in order at every candidate; the first that matches wins, else the
                     deepest miss among them is the candidate's reason;
    ``anchor``       the name of the pattern node bound to the candidate (several names when the
                     patterns are families with differently named anchors: each pattern uses the
                     one it has, e.g. ``("erf", "tanh")``);
    ``replacement``  ``replacement(match, rewriter) -> new nodes`` (None or a ``Miss``: declined);
    ``candidate``    ``candidate(node) -> bool``: which nodes of the anchor's ops are candidates
                     (checked when its turn comes; default all), e.g. :func:`feeds` ``("Sub")``;
    ``ops``          the candidates' op types (default: the anchor nodes' ops);
    ``matcher``      a custom matcher hook, ``matcher(node, rewriter) -> match | Miss``, used
                     instead of the patterns where the pattern language cannot say what to find
                     (``fuse-attention``; docs/passes.md says why); its match has ``all_nodes()``;
    ``misses``       whether a candidate that does not match is logged (default True);
    ``counts``       ``counts(match) -> kinds`` counted per rewrite (default: ``(kind,)``).
    """

    kind: str
    patterns: Sequence[Pattern]
    anchor: str | tuple[str, ...]
    replacement: Replacement
    candidate: Callable[[gs.Node], bool] | None = None
    ops: tuple[str, ...] = ()
    matcher: Callable[[gs.Node, Rewriter], Any] | None = None
    misses: bool = True
    counts: Callable[[Any], Iterable[str]] | None = None
    _anchors: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "patterns", tuple(self.patterns))
        names = (self.anchor,) if isinstance(self.anchor, str) else tuple(self.anchor)
        anchors = {}
        for p in self.patterns:
            found = [n for n in p.nodes if n.name in names]
            if len(found) != 1:
                raise PassError(f"fusion '{self.kind}': pattern '{p.name}' has {len(found)} of the anchor nodes "
                                f"{', '.join(names)} (want exactly one)")
            anchors[p.name] = found[0]
        object.__setattr__(self, "_anchors", anchors)
        if not self.ops:
            ops = sorted({o for n in anchors.values() for o in n.ops})
            if not ops:
                raise PassError(f"fusion '{self.kind}' has neither patterns nor ops: nothing is a candidate")
            object.__setattr__(self, "ops", tuple(ops))
        if not self.patterns and self.matcher is None:
            raise PassError(f"fusion '{self.kind}' needs patterns or a matcher")

    def anchor_of(self, pattern: Pattern) -> str:
        """The name of ``pattern``'s anchor node."""
        return self._anchors[pattern.name].name

    def kinds(self, bound) -> Iterable[str]:
        return (self.kind,) if self.counts is None else self.counts(bound)


def feeds(op: str) -> Callable[[gs.Node], bool]:
    """A candidate filter: the node's first output is read by an ``op`` node."""
    return lambda node: any(c.op == op for c in node.outputs[0].outputs)


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
    """Applies fusions to one graph.

    Indexes nodes by op once; hands out candidates in graph order; records replaced nodes so
    they are skipped and removed in one sweep by :meth:`commit` (which also topologically sorts
    when nodes were added, because replacements are appended at the end of the node list).
    """

    def __init__(self, graph: gs.Graph, log: RewriteLog | None = None):
        self.graph = graph
        self.log = log if log is not None else RewriteLog()
        self.graph_outputs = frozenset(t.name for t in graph.outputs)
        self.removed: set[int] = set()
        self._by_op: dict[str, list[gs.Node]] | None = None
        self._added: list[gs.Node] = []
        self._added_ids: set[int] = set()
        self._names: set[str] | None = None

    def _index(self) -> dict[str, list[gs.Node]]:
        if self._by_op is None:
            self._by_op = defaultdict(list)
            for n in self.graph.nodes:
                self._by_op[n.op].append(n)
        return self._by_op

    def nodes(self, *ops: str) -> list[gs.Node]:
        """Live nodes of the given op types, in graph order (nodes added by this rewriter last),
        as a snapshot: safe to rewrite while iterating."""
        index = self._index()
        found = [n for op in ops for n in index.get(op, ())]
        if len(ops) > 1:
            order = {id(n): i for i, n in enumerate(self.graph.nodes)}
            found.sort(key=lambda n: order.get(id(n), len(order)))
        return [n for n in found if id(n) not in self.removed]

    def alive(self, node: gs.Node) -> bool:
        return id(node) not in self.removed

    def added(self, node: gs.Node) -> bool:
        """Whether ``node`` was written by a replacement of this rewriter (not yet committed)."""
        return id(node) in self._added_ids

    def match(self, pattern: Pattern, node: gs.Node, anchor: str | None = None) -> Match | Miss:
        """:func:`edgefc.matcher.match` in this graph: internal tensors must not be graph outputs,
        nodes replaced already are not available."""
        if id(node) in self.removed:
            return Miss(f"{label(node)} was already rewritten", 0)
        return match(pattern, node, anchor, graph_outputs=self.graph_outputs, taken=self.removed)

    def bind(self, fusion: Fusion, node: gs.Node):
        """The match of ``fusion`` at ``node`` (its matcher, else its first pattern whose anchor
        takes ``node``'s op), else the deepest miss."""
        if fusion.matcher is not None:
            return fusion.matcher(node, self)
        best: Miss | None = None
        for p in fusion.patterns:
            anchor = fusion.anchor_of(p)
            if node.op not in p.node(anchor).ops:
                continue
            m = self.match(p, node, anchor)
            if m:
                return m
            if best is None or m.depth > best.depth:
                best = m
        return best if best is not None else Miss(f"no pattern of '{fusion.kind}' is anchored at a {node.op}")

    def apply(self, fusion: Fusion) -> int:
        """Rewrite every candidate of ``fusion`` that matches; log the misses. Candidates are the
        live nodes of ``fusion.ops`` when it starts, in graph order, that ``fusion.candidate``
        accepts when their turn comes; nodes written by this rewriter are not candidates (a
        fusion never revisits what it or an earlier fusion of the same call wrote). Returns the
        number of rewrites."""
        done = 0
        for node in self.nodes(*fusion.ops):
            if not self.alive(node) or self.added(node) or (fusion.candidate is not None and not fusion.candidate(node)):
                continue
            bound = self.bind(fusion, node)
            if not bound:
                if fusion.misses:
                    self.log.miss(fusion.kind, node, bound.reason)
                continue
            new = fusion.replacement(bound, self)
            if new is None or isinstance(new, Miss):
                if fusion.misses:
                    self.log.miss(fusion.kind, node, new.reason if new is not None else "the replacement declined this match")
                continue
            self.replace(bound, new)
            done += 1
            for kind in fusion.kinds(bound):
                self.log.count(kind)
        return done

    def unique_name(self, base: str) -> str:
        if self._names is None:
            self._names = {n.name for n in self.graph.nodes}
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def replace(self, bound: Bound | Iterable[gs.Node], new_nodes: Sequence[gs.Node]) -> list[gs.Node]:
        """Replace the matched nodes (a match, or the nodes themselves) by ``new_nodes``, which
        must write the match's output tensors (``match.outputs``) and read only tensors that
        survive (inputs/constants of the match or tensors of their own)."""
        old = bound.all_nodes() if hasattr(bound, "all_nodes") else list(bound)
        for n in old:
            n.outputs.clear()
        for n in old:
            n.inputs.clear()
            self.removed.add(id(n))
        for n in new_nodes:
            self._added.append(n)
            self._added_ids.add(id(n))
            if self._by_op is not None:
                self._by_op[n.op].append(n)
        return list(new_nodes)

    def commit(self) -> gs.Graph:
        """Drop replaced nodes, add the new ones, restore topological order."""
        if self.removed or self._added:
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self.removed] + \
                               [n for n in self._added if id(n) not in self.removed]
            if self._added:
                self.graph.toposort()
        self.removed, self._added, self._added_ids, self._by_op = set(), [], set(), None
        return self.graph


def apply_fusions(graph: gs.Graph, fusions: Sequence[Fusion], log: RewriteLog | None = None) -> RewriteLog:
    """Apply ``fusions`` to ``graph`` in order (one :class:`Rewriter`, committed at the end);
    returns the log (``log`` when given): counts per kind and the misses with their reasons."""
    rw = Rewriter(graph, log)
    for f in fusions:
        rw.apply(f)
    rw.commit()
    return rw.log


class FusionPass(Pass):
    """A pass made of declared fusions: set ``fusions`` (or override :meth:`declare` when the
    fusions depend on the graph or the target). Running it applies them with
    :func:`apply_fusions`, records in ``ctx.report["fusion"]`` the rewrites of each kind and
    every candidate that did not match with the reason, and gives the graph the functions of the
    edgefc ops it uses (:func:`edgefc.functions.ensure_functions`).

    ``kinds``: the report keys the pass owns (default: the kinds of :attr:`fusions` and whatever
    else this run counted or missed); each appears in the report, 0 when nothing fused, and its
    misses are replaced by this run's. The patterns assume
    the canonical form, so the graph must have been through ``canonicalize`` (standard opset
    ``min_opset``).
    """

    fusions: Sequence[Fusion] = ()
    kinds: tuple[str, ...] = ()
    min_opset = 23

    def declare(self, graph: gs.Graph, ctx: PassContext) -> Sequence[Fusion]:
        """The fusions to apply to ``graph`` (default: :attr:`fusions`)."""
        return self.fusions

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        if int(graph.opset) < self.min_opset:
            raise PassError(f"pass '{self.name}' needs a canonicalized graph (standard opset {self.min_opset}, "
                            f"this one has {graph.opset}): run canonicalize first")
        log = RewriteLog()
        self.fuse(graph, ctx, log)
        kinds = self.kinds or tuple(dict.fromkeys([*(f.kind for f in self.fusions), *log.counts, *log.misses]))
        log.record(ctx.report, kinds)
        functions.ensure_functions(graph)
        return graph

    def fuse(self, graph: gs.Graph, ctx: PassContext, log: RewriteLog) -> None:
        """Apply the declared fusions (a pass whose fusions run in stages overrides this)."""
        apply_fusions(graph, self.declare(graph, ctx), log)
