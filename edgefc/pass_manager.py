"""The pass manager: expands a pipeline (pass and pipeline names, see :mod:`edgefc.registry`)
to its passes and runs them in order, timing and counting each one.

Before any pass runs, the compile-wide options are checked against what the registered passes
declare (:func:`edgefc.pass_base.check_options`) and each pass receives the values of its own
options; ``no_fuse`` (``--no-fuse NAME``) removes fusion passes from the list.

With ``verify=True`` the graph after every pass is run in onnxruntime on seeded random inputs
and compared with the graph before that pass (the original model for the first pass), each
pass against its own tolerance: a lossy pass such as quantization does not make the exact passes
after it fail (differential testing, DESIGN.md). A mismatch raises :class:`VerificationError`
naming the pass and its max abs/rel error. ``dump_after`` writes the
graph after the named passes.

After every pass, node names are made unique again (:func:`edgefc.handover.unique_node_names`:
onnxruntime refuses two nodes of one name, and ONNX's version converter inside ``canonicalize``
writes such names); ``report.json`` counts the renamed nodes per pass (``renamed_nodes``).

``progress`` (optional) is called with a :class:`PassRecord` of ``seconds=None`` before each pass
and with the finished record after it (the CLI prints one line per pass as it happens).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx_graphsurgeon as gs

from edgefc import ir, ort
from edgefc.errors import EdgefcError, InternalError, PassError, VerificationError
from edgefc.handover import unique_node_names
from edgefc.pass_base import Pass, PassContext, check_options
from edgefc.registry import expand, get_pass, pass_classes

#: the pipeline whose passes ``--no-fuse`` may remove
FUSION_PIPELINE = "fuse"


def fusion_names() -> list[str]:
    """Short names of the fusion passes, in order (the ``fuse`` pipeline)."""
    return [pid.split("::", 1)[1] for pid in expand([FUSION_PIPELINE])]


def skipped_fusions(no_fuse) -> list[str]:
    """The fusion passes ``--no-fuse`` names (``attention`` or ``fuse-attention``), in pipeline
    order; PassError for a name that is no fusion."""
    if isinstance(no_fuse, str):
        no_fuse = no_fuse.split(",")
    known = fusion_names()
    wanted = set()
    for raw in no_fuse or ():
        name = raw.strip()
        if not name:
            continue
        full = name if name.startswith("fuse-") else f"fuse-{name}"
        if full not in known:
            raise PassError(f"--no-fuse {name}: no such fusion (known: {', '.join(n.removeprefix('fuse-') for n in known)})")
        wanted.add(full)
    return [n for n in known if n in wanted]


@dataclass
class PassRecord:
    """What one pass did: the ``report.json`` ``passes`` entry."""

    name: str
    seconds: float | None
    nodes_before: int
    nodes_after: int | None
    verify_rel_error: float | None = None
    renamed_nodes: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["verify_rel_error"] is None:
            del d["verify_rel_error"]
        if not d["renamed_nodes"]:
            del d["renamed_nodes"]
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

    >>> pm = PassManager(["canonicalize", "fuse"])          # "fuse" is a pipeline: 8 passes
    >>> graph = pm.run(edgefc.load("unet.onnx"), PassContext(target=...))
    >>> [r.name for r in pm.records]                        # canonicalize, fuse-identity, ...
    """

    def __init__(self, passes, *, verify: bool = False, verify_seed: int = 0,
                 dump_after: dict[str, Path] | None = None, progress=None):
        self.passes: list[Pass] = []
        for p in passes:
            if isinstance(p, Pass):
                self.passes.append(p)
            else:
                self.passes.extend(get_pass(pid) for pid in expand([p]))
        self.verify = verify
        self.verify_seed = verify_seed
        self.dump_after: dict[str, Path] = {}
        for k, v in (dump_after or {}).items():
            # a pipeline name means: after its last pass
            ids = expand([k])
            if not ids or ids[-1] not in {p.id for p in self.passes}:
                raise PassError(f"--dump-after names {k}, which is not in the pipeline "
                                f"({', '.join(p.name for p in self.passes)})")
            self.dump_after[ids[-1]] = Path(v)
        self.progress = progress
        self.records: list[PassRecord] = []

    def prepare(self, ctx: PassContext) -> None:
        """Check the compile-wide options, drop the fusions ``no_fuse`` names, give each pass its
        options. Called by :meth:`run`; callers may call it first to fail before loading a model."""
        check_options(ctx.options, pass_classes())
        skipped = skipped_fusions(ctx.options.get("no_fuse"))
        if skipped:
            self.passes = [p for p in self.passes if p.name not in skipped]
            ctx.report.setdefault("fusion", {"misses": {}})["skipped"] = skipped
            lost = [k for k in self.dump_after if k not in {p.id for p in self.passes}]
            if lost:
                raise PassError(f"--dump-after names {lost[0].split('::')[1]}, which --no-fuse removes")
        for p in self.passes:
            p.configure(ctx.options)

    def run(self, graph: gs.Graph, ctx: PassContext | None = None) -> gs.Graph:
        ctx = ctx or PassContext()
        self.prepare(ctx)
        reference = feeds = None
        if self.verify:
            feeds = ort.random_inputs(graph, self.verify_seed)
            reference = ort.run(ir.to_model(graph), feeds)
        unique_node_names(graph)  # the input model's own duplicates
        for p in self.passes:
            before = len(graph.nodes)
            if self.progress:
                self.progress(PassRecord(p.name, None, before, None))
            start = time.perf_counter()
            ctx.pass_options = p.options
            try:
                graph = p.run(graph, ctx)
                graph.cleanup().toposort()
                renamed = unique_node_names(graph)
            except EdgefcError:
                raise
            except Exception as e:  # a bug or an unhandled model: one line naming the pass and node
                raise internal_error(p.name, e) from e
            finally:
                ctx.pass_options = None
            seconds = time.perf_counter() - start
            _note_subgraphs(p, graph, ctx)
            record = PassRecord(p.name, round(seconds, 4), before, len(graph.nodes), renamed_nodes=renamed)
            if self.verify:
                record.verify_rel_error, reference = self._verify(p, graph, reference, feeds)
            self.records.append(record)
            if self.progress:
                self.progress(record)
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


def _note_subgraphs(p: Pass, graph: gs.Graph, ctx: PassContext) -> None:
    """``report.json`` ``subgraphs``: the control-flow nodes whose bodies the graph still holds,
    and the passes that left those bodies as they are (they rewrite the main graph only)."""
    holders = [n.name for n in graph.nodes if any(isinstance(v, gs.Graph) for v in n.attrs.values())]
    if not holders or p.handles_subgraphs:
        return
    section = ctx.report.setdefault("subgraphs", {"nodes": [], "left_as_they_are_by": []})
    section["nodes"] = holders
    if p.name not in section["left_as_they_are_by"]:
        section["left_as_they_are_by"].append(p.name)
