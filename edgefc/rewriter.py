"""Pattern rewriting, part 3 of 3 - rewriting: replace matches, keep the graph consistent, log.

:class:`Rewriter` hands out candidates by op (indexed once), replaces matched nodes and removes
them in one sweep; :func:`rewrite_all` is the driver most fusions use; :class:`RewriteLog`
counts rewrites and keeps, per kind, every candidate that did not match with the reason (the
``report.json`` ``fusion`` section).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import onnx_graphsurgeon as gs

from edgefc.matcher import Match, Miss
from edgefc.pattern import Pattern, _label


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

    def candidates(self, *ops: str, feeding: str | None = None) -> Iterator[gs.Node]:
        """The anchors a fusion tries: :meth:`nodes` of ``ops``, each yielded only if it is still
        alive when its turn comes (an earlier rewrite may have taken it) and, with ``feeding``,
        only if its first output feeds an op of that type."""
        for node in self.nodes(*ops):
            if self.alive(node) and (feeding is None or any(c.op == feeding for c in node.outputs[0].outputs)):
                yield node

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
