"""Pass ``mlt``: model-level tiling of attention (EdgeFusion, paper Sec. 2.3).

Why: the softmax input S_in = Q K^T and output S_out of the large attentions (4096 x 4096 scores
per head at 512x512) do not fit the NPU's SRAM, so untiled they make DRAM round trips (a DMA store
and load of each, about 75 % of the block's time in Table 6). Split into tiles of query rows (and
head groups), each tile's S_in/S_out stays in SRAM between the tensor engine and the vector engine.

Matches: every fused attention - ONNX ``Attention``-23 in the 3D form (Q [B,Sq,H*dk],
K [B,Skv,H*dk], V [B,Skv,H*dv], ``q_num_heads == kv_num_heads``, no mask/past inputs, as ``fuse``
emits it) - whose SRAM working set (``target.attention_sram_bytes`` with one tile) exceeds the
budget. Attentions that fit, or that have another form, are left alone; the report says why.

Emits: edgefc ``TiledAttention`` (an ONNX local function in domain ``edgefc``) with the same
inputs, output and attributes plus ``row_tiles`` and ``head_tiles``, the tiling chosen by the
solver (``edgefc.tile_solver``: least ``target.attention_cycles`` among the tilings that
fit). Its function body computes the same result tile by tile: a ``Loop`` over the
``row_tiles x head_tiles`` tiles, each slicing its query rows and head group, computing
S_in = Q_t K_g^T * scale (causal mask shifted by the tile's row offset), S_out = Softmax(S_in) and
A_t = S_out V_g, the tiles' outputs concatenated back into [B, Sq, H*dv]. onnxruntime runs it; the
cost model and the TVM lowering read the two attributes and price/emit per-tile commands. The op's
body is ``edgefc/tiled_attention_function.py`` (stamped on export), its numpy numerics
``passes/tiled_attention.py``; this module is the pass. A one-tile TiledAttention (a W8A8
attention whose normalisation ``quantize`` deferred, ``deferred_normalization = 1``) is tiled like
an Attention and keeps that attribute; :func:`deferral_pays` is what ``quantize`` asks before it
defers (the two forms priced as this pass would tile them).

Budget: ``--sram-budget BYTES|xKiB|xMiB`` (``ctx.options["sram_budget"]``), at most the target's
SRAM; by default the target's SRAM minus a reserve (``target.sram.tiles``: the target file's
``sram.reserve_bytes`` left to what else is live). With an explicit budget, an attention that no tiling
fits is an error naming the smallest budget that works; with the default budget it is left untiled
and reported. ``--no-mlt`` (``ctx.options["no_mlt"]``) removes the pass from the default pipeline
(and makes an explicitly listed ``mlt`` a no-op).

Report: ``ctx.report["tiling"]`` with the budget and, per block, the spec, the chosen tiling, its
SRAM bytes and predicted time, the untiled time, how many candidates there were and how many the
solver evaluated, the solver's time, and the reason for the decision.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from edgefc import tile_solver
from edgefc.attention import (
    DEFERRED_ATTR,
    AttentionSpec,
    Tiling,
    is_attention,
    row_granularity,
    spec_from_node,
    tile_grid,
    tiling_from_node,
)
from edgefc.deployed_types import DeployedTypes
from edgefc.errors import PassError
from edgefc.functions import ensure_functions
from edgefc.pass_base import Pass, PassContext
from edgefc.passes.tiled_attention import DOMAIN, OP
from edgefc.precision import PRECISIONS, metadata, recorded_plan
from edgefc.registry import register_pass

# --- the pass --------------------------------------------------------------------------------

def attention_types(graph: gs.Graph, precision: str | None = None) -> DeployedTypes:
    """The deployed types the solver sizes tiles with: as ``quantize`` built the graph (each
    attention's recorded precision, else its Q's stored type), or, for a graph no ``quantize``
    decided (``--passes ...,mlt`` without it), the ``--precision`` given (``fp16``, ``w8a16``,
    ``w8a8``) as a what-if."""
    if precision in PRECISIONS and not recorded_plan(graph):
        return DeployedTypes(graph, precision)
    return DeployedTypes(graph, "as-built")


def _budget(ctx: PassContext, target) -> tuple[int, str]:
    raw = ctx.option("sram_budget")
    if raw is None:
        return tile_solver.default_budget(target), (
            f"target SRAM {target.sram.total} bytes minus reserve {target.sram.reserve} bytes")
    budget = tile_solver.parse_budget(raw)
    if budget > target.sram.total:
        raise PassError(f"--sram-budget {tile_solver.fmt_bytes(budget)} exceeds the SRAM of target "
                        f"'{target.name}' ({tile_solver.fmt_bytes(target.sram.total)}); to study a larger SRAM, "
                        f"use a target file with a larger sram.bytes")
    return budget, "--sram-budget"


def block_cycles(spec: AttentionSpec, target, budget: int, granularity: int, schedule: str | None) -> float:
    """The cycles the cost model gives an attention block as this pass would leave it: untiled
    when its working set fits ``budget``, else the solver's fastest tiling that fits (untiled,
    spilling S_in/S_out, when none does)."""
    one = Tiling(1, 1)
    if target.attention_sram_bytes(spec, one) <= budget:
        return float(target.attention_cycles(spec, one))
    try:
        return float(tile_solver.solve(spec, target, budget, granularity, schedule).cycles)
    except tile_solver.InfeasibleBudgetError:
        return float(target.attention_cycles(spec, one))


def deferral_pays(node: gs.Node, ctx: PassContext) -> bool:
    """Whether the W8A8 attention ``node`` (its S_in INT16) is faster on ``ctx.target`` with its
    normalisation deferred (UINT8 S_out, S_out x V at ``int8xint8``, the division after it: one
    more hand-off each way per tile) than with an INT16 S_out, each as this pass would tile it
    under the compile's ``--sram-budget``, ``--no-mlt`` and ``--schedule``: the deferred form
    wins on large attentions (a 4096-key one: 9.1 vs 19.6 ms), loses on small ones, where the
    hand-offs dominate. False without a target that prices attention, or for a node whose form
    the cost model does not describe."""
    target = ctx.target
    if target is None or not target.is_npu or not target.has_cost_model:
        return False
    try:
        spec = spec_from_node(node, "int8", "int16")
    except ValueError:
        return False
    budget = target.sram.total if ctx.option("no_mlt", False) else _budget(ctx, target)[0]
    g, schedule = row_granularity(target), ctx.option("schedule")
    deferred = block_cycles(dataclasses.replace(spec, deferred=True), target, budget, g, schedule)
    return deferred < block_cycles(dataclasses.replace(spec, deferred=False), target, budget, g, schedule)


def _tiling_dict(spec: AttentionSpec, tiling: Tiling, granularity: int) -> dict:
    grid = tile_grid(spec.q_len, spec.heads, tiling, granularity)
    return {"row_tiles": tiling.row_tiles, "head_tiles": tiling.head_tiles, "tiles": tiling.tiles,
            "tile_rows": grid.rows, "heads_per_tile": grid.heads}


@dataclass
class MltOptions:
    """Options of ``mlt`` (``edgefc compile`` flags)."""

    sram_budget: int | str | None = None   # --sram-budget: bytes or "4MiB"; None: target SRAM - reserve
    no_mlt: bool = False                    # --no-mlt: leave every attention untiled
    precision: str | None = None            # --precision: byte sizes of a graph quantize did not decide (what-if)
    schedule: str | None = None             # --schedule: the schedule tilings are priced under; None: the target's default


@register_pass("mlt", namespace="edgefc")
class ModelLevelTiling(Pass):
    """Model-level tiling (paper Sec. 2.3): attentions too big for SRAM become TiledAttention, tiles from the solver."""

    Options = MltOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> gs.Graph:
        target = ctx.target
        report: dict = {"blocks": [], "tiled": 0, "left_alone": 0}
        ctx.report["tiling"] = report
        if ctx.option("no_mlt", False):
            report["skipped"] = "disabled by --no-mlt"
            return graph
        if target is None or not target.is_npu:
            report["skipped"] = "no NPU target"
            return graph
        if not target.has_cost_model:
            report["skipped"] = (f"target '{target.name}' has no attention cost model "
                                 f"(attention_cycles / attention_sram_bytes)")
            return graph
        budget, source = _budget(ctx, target)
        explicit = ctx.option("sram_budget") is not None
        g = row_granularity(target)
        report.update({"budget_bytes": budget, "budget_source": source, "sram_bytes": int(target.sram.total),
                       "row_granularity": g})
        types = attention_types(graph, ctx.option("precision"))
        schedule = ctx.option("schedule")
        report["schedule"] = schedule or "the target's default"
        changed = False
        for node in list(graph.nodes):
            if not is_attention(node):
                continue
            entry = {"name": node.name, "op": node.op}
            report["blocks"].append(entry)
            if node.op == OP and tiling_from_node(node).tiles > 1:
                entry["reason"] = "already tiled"
                report["left_alone"] += 1
                continue
            try:
                spec = spec_from_node(node, *types.attention_types(node))
            except ValueError as e:
                entry["reason"] = f"not tiled: {e}"
                report["left_alone"] += 1
                continue
            entry["spec"] = tile_solver.spec_dict(spec)
            one = Tiling(1, 1)
            untiled_sram = int(target.attention_sram_bytes(spec, one))
            untiled_cycles = float(target.attention_cycles(spec, one))
            entry.update({"untiled_sram_bytes": untiled_sram, "untiled_cycles": untiled_cycles,
                          "untiled_ms": tile_solver.cycles_to_ms(target, untiled_cycles)})
            if untiled_sram <= budget:
                entry.update({"tiling": None, "sram_bytes": untiled_sram, "predicted_cycles": untiled_cycles,
                              "predicted_ms": entry["untiled_ms"],
                              "reason": f"fits: working set {tile_solver.fmt_bytes(untiled_sram)} <= budget "
                                        f"{tile_solver.fmt_bytes(budget)}"})
                report["left_alone"] += 1
                continue
            try:
                sol = tile_solver.solve(spec, target, budget, g, schedule)
            except tile_solver.InfeasibleBudgetError as e:
                if explicit:
                    raise
                entry.update({"tiling": None, "sram_bytes": untiled_sram, "predicted_cycles": untiled_cycles,
                              "predicted_ms": entry["untiled_ms"], "min_budget_bytes": e.min_budget,
                              "reason": f"not tiled: no tiling fits the default budget {tile_solver.fmt_bytes(budget)} "
                                        f"(the smallest needs {tile_solver.fmt_bytes(e.min_budget)}); "
                                        f"S_in/S_out spill to DRAM"})
                report["left_alone"] += 1
                continue
            tiled = gs.Node(OP, name=node.name, domain=DOMAIN, inputs=list(node.inputs[:3]), outputs=list(node.outputs[:1]),
                            attrs={"q_num_heads": spec.heads, "kv_num_heads": spec.heads,
                                   "scale": float(node.attrs.get("scale", 1.0 / math.sqrt(spec.head_dim))),
                                   "is_causal": int(spec.causal),
                                   "row_tiles": sol.tiling.row_tiles, "head_tiles": sol.tiling.head_tiles,
                                   "row_granularity": g,
                                   **({DEFERRED_ATTR: 1} if spec.deferred else {})})
            metadata(tiled).update(metadata(node))   # the precision quantize recorded, among others
            node.inputs.clear()
            node.outputs.clear()
            graph.nodes.append(tiled)
            changed = True
            entry.update({"op": OP, "tiling": _tiling_dict(spec, sol.tiling, g), "variant": sol.variant,
                          "sram_bytes": sol.sram_bytes,
                          "predicted_cycles": sol.cycles, "predicted_ms": tile_solver.cycles_to_ms(target, sol.cycles),
                          "candidates": sol.candidates, "evaluated": sol.evaluated,
                          "solver_ms": round(sol.seconds * 1e3, 3), "solver_cpu_ms": round(sol.cpu_seconds * 1e3, 3),
                          "reason": f"working set {tile_solver.fmt_bytes(untiled_sram)} > budget "
                                    f"{tile_solver.fmt_bytes(budget)}: {sol.tiling.row_tiles} row tiles x "
                                    f"{sol.tiling.head_tiles} head tiles{', ' + sol.variant if sol.variant else ''} "
                                    f"is the fastest tiling that fits"})
            report["tiled"] += 1
        if changed:
            ensure_functions(graph)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return graph


def explain_tiling(graph: gs.Graph, target, budget=None, precision: str | None = None,
                   schedule: str | None = None) -> list[dict]:
    """Per attention block of ``graph`` (Attention or TiledAttention), the solver's candidate table
    (``tile_solver.explain``): what ``edgefc profile --explain-tiling`` prints.

    ``budget``: bytes or a ``--sram-budget`` string; default the target's default budget.
    ``precision``: price the blocks as if deployed at this precision (default: as built).
    """
    if not target.has_cost_model:
        raise PassError(f"target '{target.name}' has no attention cost model (attention_cycles / attention_sram_bytes)")
    budget = tile_solver.default_budget(target) if budget is None else tile_solver.parse_budget(budget)
    tables = []
    types = DeployedTypes(graph, precision or "as-built")
    for node in graph.nodes:
        if not is_attention(node):
            continue
        try:
            spec = spec_from_node(node, *types.attention_types(node))
        except ValueError:
            continue
        table = tile_solver.explain(spec, target, budget, schedule=schedule)
        table["op"] = node.op
        if node.op == OP:
            table["built_tiling"] = {"row_tiles": int(node.attrs["row_tiles"]), "head_tiles": int(node.attrs["head_tiles"])}
        tables.append(table)
    return tables
