"""The pass manager: runs an ordered pipeline of passes, timing and counting each one.

With ``verify=True`` the graph after every pass is run in onnxruntime on seeded random inputs
and compared with the graph before that pass (the original model for the first pass), each
pass against its own tolerance: a lossy pass such as quantization does not make the exact passes
after it fail (differential testing, DESIGN.md). A mismatch raises :class:`VerificationError`
naming the pass and its max abs/rel error. ``dump_after`` writes the
graph after the named passes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx_graphsurgeon as gs

from edgefc import ir, ort
from edgefc.errors import EdgefcError, InternalError, PassError, VerificationError
from edgefc.pass_base import Pass, PassContext
from edgefc.registry import get_pass, resolve_pass_id


@dataclass
class PassRecord:
    """What one pass did: the ``report.json`` ``passes`` entry."""

    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    verify_rel_error: float | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["verify_rel_error"] is None:
            del d["verify_rel_error"]
        return d


def internal_error(pass_name: str, error: Exception) -> InternalError:
    """``error`` raised inside pass ``pass_name`` as one line: the pass, the innermost node the
    failing code was handling (a local named ``node`` or ``n`` holding a graph node), the
    exception."""
    node = None
    tb = error.__traceback__
    while tb is not None:
        for key in ("node", "n"):
            value = tb.tb_frame.f_locals.get(key)
            if isinstance(value, gs.Node):
                node = value
        tb = tb.tb_next
    where = f" at node '{node.name}' ({node.op})" if node is not None else ""
    text = str(error).strip()
    first = text.splitlines()[0][:300] if text else ""
    return InternalError(f"pass '{pass_name}' failed{where}: {type(error).__name__}: {first}".rstrip(": "))


class PassManager:
    """An ordered pipeline of passes.

    >>> pm = PassManager(["canonicalize", "fuse"])
    >>> graph = pm.run(edgefc.load("unet.onnx"), PassContext(target=...))
    >>> [r.name for r in pm.records]
    """

    def __init__(self, passes, *, verify: bool = False, verify_seed: int = 0,
                 dump_after: dict[str, Path] | None = None, progress=None):
        self.passes: list[Pass] = [p if isinstance(p, Pass) else get_pass(p) for p in passes]
        self.verify = verify
        self.verify_seed = verify_seed
        self.dump_after = {resolve_pass_id(k): Path(v) for k, v in (dump_after or {}).items()}
        missing = [k for k in self.dump_after if k not in {p.id for p in self.passes}]
        if missing:
            raise PassError(f"--dump-after names {missing[0].split('::')[1]}, which is not in the pipeline "
                            f"({', '.join(p.name for p in self.passes)})")
        self.progress = progress
        self.records: list[PassRecord] = []

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> gs.Graph:
        ctx = ctx or PassContext()
        reference = feeds = None
        if self.verify:
            feeds = ort.random_inputs(graph, self.verify_seed)
            reference = ort.run(ir.to_model(graph), feeds)
        for p in self.passes:
            if self.progress:
                self.progress(p)
            before = len(graph.nodes)
            start = time.perf_counter()
            try:
                graph = p.run(graph, ctx)
                graph.cleanup().toposort()
            except EdgefcError:
                raise
            except Exception as e:  # a bug or an unhandled model: one line naming the pass and node
                raise internal_error(p.name, e) from e
            seconds = time.perf_counter() - start
            record = PassRecord(p.name, round(seconds, 4), before, len(graph.nodes))
            if self.verify:
                record.verify_rel_error, reference = self._verify(p, graph, reference, feeds)
            self.records.append(record)
            if p.id in self.dump_after:
                ir.save(graph, self.dump_after[p.id])
        return graph

    @staticmethod
    def _verify(p: Pass, graph: gs.Graph, reference, feeds) -> tuple[float, dict]:
        """Relative error of ``graph`` against ``reference``, and its outputs (the next reference)."""
        try:
            actual = ort.run(ir.to_model(graph), feeds)
        except Exception as e:
            raise VerificationError(f"after pass '{p.name}' the model no longer runs in onnxruntime: "
                                    f"{str(e).strip().splitlines()[0]}") from None
        diff = ort.compare(reference, actual)
        if not diff.within(p.verify_tolerance):
            if diff.reason:
                raise VerificationError(f"pass '{p.name}' changed the model: {diff.reason}")
            raise VerificationError(f"pass '{p.name}' changed output '{diff.output}': max abs error {diff.abs_error:.3g}, "
                                    f"max rel error {diff.rel_error:.3g} (tolerance {p.verify_tolerance:g})")
        return diff.rel_error, actual
