"""``--precision search`` and the rescue of a build under the quality floor (pass ``quantize``,
issue 20 parts 2 and 5).

The search chooses one precision per *layer group* against two measurements: its quality cost on
the evaluation inputs and its latency gain in the target's cost model. Structured like AIMET's
automatic mixed precision (per-group sensitivity, a Pareto curve from all-highest to all-lowest,
the fastest point that meets the target), with the latency of a real cost model where AIMET and
NNCF use bit-operation counts:

1. **Groups** (:func:`layer_groups`): the tensor-engine ops grouped by the module path in their
   names (``/unet/down_blocks.1/resnets.0/...``: the deepest level with at most ``max_groups``
   groups; a graph whose names carry no hierarchy is cut into runs of ops in graph order), each
   group's vector ops with it. Attention blocks form their own groups: their two matmuls multiply
   activations (``int16xint16`` in W8A16, a quarter of ``fp16``'s rate on this NPU), so their
   options are W8A16, FP16 and W8A8; every other group's are W8A16 and W8A8. What the policy fixes
   (the time embedding, the periodic arguments, statistics) is not searched.
2. **Latency** (:func:`group_gains`): the uniform W8A16, W8A8 and W8A16-with-FP16-attention plans
   built and priced by the target (``mlt`` re-solves the tiles for each); a group's gain is the
   sum of its ops' modelled times. Groups gaining less than :data:`SMALL_SHARE` of the total are
   merged into one.
3. **Quality** (:class:`~edgefc.passes.emulation.PlanMeter`): with every group at W8A16, each group
   is lowered alone and measured on the first :data:`SENSITIVITY_SAMPLES` evaluation inputs; the
   extra noise power it adds is its cost, and a plan's noise is predicted as their sum.
4. **Pareto path**: from all-W8A16, repeatedly the move (one group one option lower) with the most
   modelled time saved per unit of predicted noise, to all-W8A8.
5. **Points**: :data:`POINTS` points along the path, both ends included, are built and priced
   (conversions between precisions included, tiles re-solved) and measured on the first
   :data:`POINT_SAMPLES` evaluation inputs; the fastest one at or above the floor (by
   :data:`MARGIN_DB`) is the candidate. ``quantize`` builds it, measures it on every evaluation
   input and, if it misses the floor, takes the next slower point (three at most), then the
   uniform W8A16 point (:func:`candidate_order`).

The rescue (:func:`rescue_plan`): a build under the floor keeps the layers that lose the most - the
lowest per-layer SQNRs of its measurement - one precision higher (W8A8 -> W8A16 -> FP16 -> FP32),
1, 2, 4 ... of them per round, until it meets the floor or runs out of rounds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from edgefc import ir
from edgefc.pass_base import PassContext
from edgefc.passes import mlt, qdq
from edgefc.passes import quant_policy as qp

TENSOR_OPS = frozenset({"Conv", "FusedConv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm"})
ATTENTION_OPS = frozenset({"Attention", "TiledAttention"})
LAYER_OPTIONS = ("w8a16", "w8a8")
ATTENTION_OPTIONS = ("w8a16", "fp16", "w8a8")
#: groups whose modelled gain (W8A16 -> lowest) is under this share of all groups' are merged
SMALL_SHARE = 0.015
SENSITIVITY_SAMPLES = 2
POINT_SAMPLES = 4
POINTS = 9
MARGIN_DB = 0.3
#: precisions from the narrowest up: the rescue's ladder
LADDER = ("w8a8", "w8a16", "fp16", "fp32")


@dataclass
class Group:
    name: str
    kind: str                 # "layers" | "attention"
    nodes: list[str]
    options: tuple[str, ...]  # highest first


# --- groups ------------------------------------------------------------------------------------

def _path(name: str) -> list[str]:
    """The module path of a node name (``/unet/down_blocks.0/resnets.0/conv1/Conv`` ->
    ``[unet, down_blocks.0, resnets.0, conv1]``): its parts without the op itself."""
    parts = [p for p in name.split("/") if p]
    return parts[:-1]


def layer_groups(graph: gs.Graph, plan: qp.PrecisionPlan, fixed: set[str], max_groups: int = 32) -> list[Group]:
    """Group the ops of ``plan`` not in ``fixed`` (module docstring, step 1)."""
    nodes = [n for n in graph.nodes if n.name in plan.ops and n.name not in fixed
             and plan.ops[n.name] == plan.requested]
    tensor = [n for n in nodes if n.op in TENSOR_OPS or n.op in ATTENTION_OPS]
    if not tensor:
        return []
    depth = 0
    for d in range(1, max(len(_path(n.name)) for n in tensor) + 1):
        keys = {"/".join(_path(n.name)[:d]) for n in tensor}
        if len(keys) > max_groups:
            break
        depth = d
    keyed = depth > 0 and len({"/".join(_path(n.name)[:depth]) for n in tensor}) >= 2
    groups: dict[str, Group] = {}

    def key_of(n: gs.Node) -> str:
        return "/".join(_path(n.name)[:depth])

    if keyed:
        for n in tensor:
            k = key_of(n)
            name, kind = (f"{k} (attention)", "attention") if n.op in ATTENTION_OPS else (k, "layers")
            groups.setdefault(name, Group(name, kind, [], ATTENTION_OPTIONS if kind == "attention" else LAYER_OPTIONS))
            groups[name].nodes.append(n.name)
        for n in nodes:
            if n.op in TENSOR_OPS or n.op in ATTENTION_OPS:
                continue
            if key_of(n) in groups:
                groups[key_of(n)].nodes.append(n.name)
    else:
        # no hierarchy in the names: runs of tensor ops in graph order, each with the vector ops
        # that come before its next tensor op
        per = max(1, math.ceil(len([n for n in tensor if n.op not in ATTENTION_OPS]) / max(1, max_groups // 2)))
        current, count = None, 0
        for n in nodes:
            if n.op in ATTENTION_OPS:
                name = f"{n.name} (attention)"
                groups[name] = Group(name, "attention", [n.name], ATTENTION_OPTIONS)
                continue
            if n.op in TENSOR_OPS and (current is None or count >= per):
                current, count = f"layers {len([g for g in groups.values() if g.kind == 'layers']) + 1}: {n.name}", 0
                groups[current] = Group(current, "layers", [], LAYER_OPTIONS)
            if n.op in TENSOR_OPS:
                count += 1
            if current is not None:
                groups[current].nodes.append(n.name)
    return list(groups.values())


# --- building and pricing a plan --------------------------------------------------------------

@dataclass
class Builder:
    """Builds plans of one FP32 graph (copies; the weights are quantized once) and prices them
    with the target, running ``mlt`` on each so its tiles are solved for the plan's types."""

    graph: gs.Graph
    calibration: object
    policy: qp.QuantPolicy
    ctx: PassContext
    weight_cache: dict = field(default_factory=dict)
    seconds: float = 0.0
    builds: int = 0

    def build(self, plan: qp.PrecisionPlan) -> tuple[gs.Graph, dict]:
        g = ir.copy_graph(self.graph)
        qplan = qp.plan_qdq(g, plan, self.policy)
        cal = self.calibration
        counts = qdq.apply_plan(g, plan, qplan, cal.ranges, cal.means, self.policy, cal.headroom, cal.exact,
                                self.weight_cache, defer=lambda node: mlt.deferral_pays(node, self.ctx))
        return g, {"qplan": qplan, "counts": counts}

    def price(self, plan: qp.PrecisionPlan) -> tuple[float, dict[str, float]]:
        """(modelled ms, per-op ms) of ``plan`` as built (conversions included, tiles re-solved)."""
        from edgefc.registry import get_pass

        start = time.perf_counter()
        g, _ = self.build(plan)
        if not self.ctx.option("no_mlt", False):
            mlt = get_pass("mlt")
            mlt.configure(self.ctx.options)
            g = mlt(g, PassContext(target=self.ctx.target, options=self.ctx.options, report={}))
        prof = self.ctx.target.profile(g, schedule=self.ctx.option("schedule"))   # the compile's --schedule, read as mlt reads it
        ms = float(prof.total_ms)
        per_op = {r.name: float(r.ms) for r in prof.ops}
        del g, prof
        self.seconds += time.perf_counter() - start
        self.builds += 1
        return ms, per_op


def plan_of(base: qp.PrecisionPlan, groups: list[Group], choice: dict[str, str], reason: str,
            wide_scores: bool = True) -> qp.PrecisionPlan:
    """``base`` with every group's ops at its ``choice``; a W8A8 attention keeps an INT16 S_in when
    the policy's ``attention-scores`` rule is on (``wide_scores``), and its S_out INT16 or, where
    the cost model prices it faster, UINT8 with the normalisation deferred (``qdq.apply_plan``)."""
    changes = {n: choice[g.name] for g in groups if g.name in choice for n in g.nodes}
    plan = base.with_ops(changes, reason)
    attention = {n for g in groups if g.kind == "attention" for n in g.nodes}
    plan.scores = {n: v for n, v in base.scores.items() if plan.ops.get(n) == "w8a8"}
    if wide_scores:
        plan.scores.update({n: "int16" for n in attention if plan.ops.get(n) == "w8a8"})
    return plan


def group_gains(groups: list[Group], per_op: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Modelled ms of each group at each of its options (``per_op``: precision -> op -> ms)."""
    out = {}
    for g in groups:
        out[g.name] = {p: sum(per_op[p].get(n, 0.0) for n in g.nodes) for p in g.options}
    return out


def merge_small(groups: list[Group], times: dict[str, dict[str, float]]) -> tuple[list[Group], dict]:
    """Merge the layer groups whose gain is under :data:`SMALL_SHARE` of the total into one."""
    gain = {g.name: times[g.name][g.options[0]] - min(times[g.name].values()) for g in groups}
    total = sum(max(v, 0.0) for v in gain.values()) or 1.0
    small = [g for g in groups if g.kind == "layers" and gain[g.name] < SMALL_SHARE * total]
    if len(small) < 2:
        return groups, times
    names = [g.name for g in small]
    merged = Group(f"{len(small)} small groups ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})",
                   "layers", [n for g in small for n in g.nodes], LAYER_OPTIONS)
    out = {k: v for k, v in times.items() if k not in names}
    out[merged.name] = {p: sum(times[n][p] for n in names) for p in LAYER_OPTIONS}
    return [g for g in groups if g.name not in names] + [merged], out


# --- the Pareto path -------------------------------------------------------------------------------

def pareto_path(groups: list[Group], times: dict[str, dict[str, float]], noise: dict[str, dict[str, float]],
                base_noise: float) -> list[dict]:
    """Greedy path from every group at its first option to every group at its last (module
    docstring, step 4): each step ``{"choice", "ms_saved", "noise"}`` (noise: predicted, relative
    to the signal)."""
    choice = {g.name: g.options[0] for g in groups}
    saved, n = 0.0, base_noise
    path = [{"choice": dict(choice), "ms_saved": 0.0, "noise": n}]
    while True:
        best = None
        for g in groups:
            cur = g.options.index(choice[g.name])
            for new in g.options[cur + 1:]:
                dt = times[g.name][choice[g.name]] - times[g.name][new]
                if dt <= 0:
                    continue
                dn = noise[g.name].get(new, 0.0) - noise[g.name].get(choice[g.name], 0.0)
                score = dt / max(dn, 1e-12)
                if best is None or score > best[0]:
                    best = (score, g.name, new, dt, dn)
        if best is None:
            break
        _, name, new, dt, dn = best
        choice[name] = new
        saved += dt
        n += max(dn, 0.0)
        path.append({"choice": dict(choice), "ms_saved": saved, "noise": n, "move": f"{name} -> {new}"})
    return path


def db(noise: float) -> float:
    return math.inf if noise <= 0 else -10 * math.log10(noise)


def pick_points(path: list[dict], k: int = POINTS) -> list[int]:
    """``k`` indices of ``path`` spread evenly over its saved time, both ends included."""
    if len(path) <= k:
        return list(range(len(path)))
    top = path[-1]["ms_saved"] or 1.0
    want = [top * i / (k - 1) for i in range(k)]
    picked = []
    for w in want:
        i = min(range(len(path)), key=lambda j: abs(path[j]["ms_saved"] - w))
        if i not in picked:
            picked.append(i)
    return sorted(set(picked) | {0, len(path) - 1})


# --- the rescue ---------------------------------------------------------------------------------

def raise_one(precision: str) -> str | None:
    """The next precision up the rescue's ladder (None at FP32)."""
    i = LADDER.index(precision) if precision in LADDER else len(LADDER) - 1
    return LADDER[i + 1] if i + 1 < len(LADDER) else None


def rescue_plan(plan: qp.PrecisionPlan, layers: list, count: int, graph: gs.Graph) -> tuple[qp.PrecisionPlan, list[dict]]:
    """``plan`` with the ``count`` worst ``layers`` (:class:`~edgefc.passes.quant_eval.LayerLoss`,
    worst first) that can go higher each one precision higher - and the ops that read its outputs
    at least as high, so the layer's output is stored and read at the wider type too: a layer's own
    error is that of its inputs, weights *and* output rounding; and what changed, with the reason."""
    by_name = {n.name: n for n in graph.nodes}
    changes: dict[str, str] = {}
    notes = []

    def current(name: str) -> str:
        return changes.get(name, plan.ops[name])

    ranked = [x for x in layers if x.layer in plan.ops and raise_one(plan.ops[x.layer])]
    for rank, x in enumerate(ranked[:count], 1):
        new = raise_one(current(x.layer)) or current(x.layer)
        changes[x.layer] = new
        readers = []
        node = by_name.get(x.layer)
        for t in (node.outputs if node is not None else []):
            for r in qp.readers(t):
                if r.name in plan.ops and LADDER.index(current(r.name)) < LADDER.index(new):
                    changes[r.name] = new
                    readers.append(r.name)
        notes.append({"layer": x.layer, "op": x.op, "from": plan.ops[x.layer], "to": new,
                      "reason": f"rescue: its own SQNR {x.sqnr_db:.1f} dB is the {_ordinal(rank)} lowest of "
                                f"{len(layers)} layers", **({"readers_raised": readers} if readers else {})})
    new_plan = plan.with_ops(changes, "rescue")
    for n in notes:
        new_plan.reasons[n["layer"]] = n["reason"]
        for r in n.get("readers_raised", ()):
            new_plan.reasons.setdefault(r, f"rescue: reads {n['layer']} at {n['to']}")
    new_plan.scores = {k: v for k, v in plan.scores.items() if new_plan.ops.get(k) == "w8a8"}
    return new_plan, notes


def candidate_order(points: list[dict], floor_db: float, tries: int = 3) -> list[int]:
    """The points ``quantize`` builds, in order, until one meets the floor: the fastest ``tries``
    whose emulated SQNR is at least :data:`MARGIN_DB` above it (``points`` fastest first), else the
    best-measured one; then the uniform all-W8A16 point, since emulation can read a little above
    the build (by more than the margin on some graphs) and a search is never to end worse off than
    that build."""
    meets = [j for j, p in enumerate(points) if p["sqnr_db"] is not None and p["sqnr_db"] >= floor_db + MARGIN_DB]
    order = meets[:tries] or [max(range(len(points)), key=lambda j: points[j]["sqnr_db"] or -1e9)]
    highest = next((j for j, p in enumerate(points) if p.get("uniform") == "w8a16"), None)
    if highest is not None and highest not in order:
        order.append(highest)
    return order


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# --- the search ---------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """The evaluated points (fastest first), their plans, the candidates in the order ``quantize``
    tries them (fastest meeting the floor first), and the report section."""

    points: list[dict]
    plans: list[qp.PrecisionPlan]
    candidates: list[int]
    groups: list[Group]
    report: dict


def _say(progress: bool, message: str) -> None:
    if progress:
        import sys

        print(f"  search: {message}", file=sys.stderr, flush=True)


def search(graph: gs.Graph, ctx: PassContext, base: qp.PrecisionPlan, fixed: set[str], calibration,
           reference, policy: qp.QuantPolicy, floor: float | None, folder, progress: bool = True) -> SearchResult:
    """Steps 1-5 of the module docstring on the FP32 ``graph``; ``base``: every op at W8A16 with
    the policy's rules; ``fixed``: ops not searched (the time embedding)."""
    from edgefc.passes.emulation import PlanMeter, build_switchboard

    start = time.perf_counter()
    floor_db = floor if floor is not None and math.isfinite(floor) else -math.inf
    wide = policy.rule("attention-scores")
    groups = layer_groups(graph, base, fixed)
    if not groups:
        from edgefc.errors import QuantizationError

        raise QuantizationError("--precision search found no tensor-engine layers to choose precisions for")
    builder = Builder(graph, calibration, policy, ctx)
    uniform = {"w8a16": {g.name: g.options[0] for g in groups},
               "w8a8": {g.name: g.options[-1] for g in groups},
               "fp16": {g.name: ("fp16" if "fp16" in g.options else g.options[0]) for g in groups}}
    per_op, uniform_ms = {}, {}
    for name, choice in uniform.items():
        _say(progress, f"pricing the uniform {name if name != 'fp16' else 'W8A16 + FP16 attention'} plan "
                       f"({len(groups)} groups)")
        uniform_ms[name], per_op[name] = builder.price(plan_of(base, groups, choice, "search", wide))
    times = group_gains(groups, per_op)
    groups, times = merge_small(groups, times)
    priced = time.perf_counter()
    _say(progress, f"{len(groups)} groups; building the emulation model")
    board = build_switchboard(graph, base, {g.name: g.nodes for g in groups}, {g.name: g.options for g in groups},
                              calibration, policy, folder, progress)
    meter = PlanMeter(board, reference, SENSITIVITY_SAMPLES)
    top = {g.name: g.options[0] for g in groups}
    s0 = meter.sqnr(top)
    n0 = 10 ** (-s0 / 10) if math.isfinite(s0) else 0.0
    noise: dict[str, dict[str, float]] = {}
    sensitivity: dict[str, dict[str, float]] = {}
    for i, g in enumerate(groups, 1):
        noise[g.name] = {g.options[0]: 0.0}
        sensitivity[g.name] = {}
        for o in g.options[1:]:
            s = meter.sqnr({**top, g.name: o})
            sensitivity[g.name][o] = round(s, 3) if math.isfinite(s) else None
            noise[g.name][o] = max((10 ** (-s / 10) if math.isfinite(s) else 1.0) - n0, 0.0)
        _say(progress, f"sensitivity {i}/{len(groups)}: {g.name}: "
                       + ", ".join(f"{o} {sensitivity[g.name][o]} dB" for o in g.options[1:]))
    sensed = time.perf_counter()
    path = pareto_path(groups, times, noise, n0)
    chosen_path = pick_points(path)
    feasible = [i for i, p in enumerate(path) if db(p["noise"]) >= floor_db + MARGIN_DB]
    if feasible:
        f = max(feasible)
        chosen_path = sorted(set(chosen_path) | {i for i in (f - 1, f, f + 1) if 0 <= i < len(path)})
    evaluate = [("path", i, path[i]["choice"]) for i in chosen_path]
    ends = {"w8a16": {g.name: g.options[0] for g in groups}, "w8a8": {g.name: g.options[-1] for g in groups}}
    for name, choice in ends.items():   # the uniform builds, whether or not the path reaches them
        if all(path[i]["choice"] != choice for i in chosen_path):
            evaluate.append((name, None, choice))
    points, plans = [], []
    n_points = min(POINT_SAMPLES, len(reference.inputs.samples))
    for k, (kind, i, choice) in enumerate(evaluate, 1):
        plan = plan_of(base, groups, choice, "search", wide)
        ms, _ = builder.price(plan)
        sq = meter.sqnr(choice, POINT_SAMPLES)
        predicted = db(n0 + sum(noise[g.name].get(choice[g.name], 0.0) for g in groups))
        _say(progress, f"point {k}/{len(evaluate)}: {ms:.2f} ms, {sq:.2f} dB (predicted {predicted:.2f} dB)")
        point = {"ms": round(ms, 4), "sqnr_db": round(sq, 3) if math.isfinite(sq) else None, "plan": dict(choice),
                 "predicted_sqnr_db": round(predicted, 3) if math.isfinite(predicted) else None,
                 "measured": f"emulated, first {n_points} evaluation inputs"}
        if i is not None:
            point["path_step"] = i
        for name, end in ends.items():
            if choice == end:
                point["uniform"] = name
        points.append(point)
        plans.append(plan)
    order = sorted(range(len(points)), key=lambda j: (points[j]["ms"], -(points[j]["sqnr_db"] or -1e9)))
    points = [points[j] for j in order]
    plans = [plans[j] for j in order]
    candidates = candidate_order(points, floor_db)
    meter.close()
    report = {
        "groups": [{"name": g.name, "kind": g.kind, "ops": len(g.nodes), "options": list(g.options),
                    "modelled_ms": {p: round(times[g.name][p], 4) for p in g.options},
                    "sqnr_db_alone": sensitivity[g.name]} for g in groups],
        "all_highest_sqnr_db": round(s0, 3) if math.isfinite(s0) else None,
        "sensitivity_inputs": meter.samples,
        "point_inputs": min(POINT_SAMPLES, len(reference.inputs.samples)),
        "path": [{"ms_saved": round(p["ms_saved"], 4), "predicted_sqnr_db": round(db(p["noise"]), 3),
                  **({"move": p["move"]} if "move" in p else {})} for p in path],
        "uniform_ms": {k: round(v, 4) for k, v in uniform_ms.items()},
        "seconds": {"pricing": round(priced - start, 1), "emulation_model": round(board.seconds, 1),
                    "sensitivity": round(sensed - priced - board.seconds, 1),
                    "points": round(time.perf_counter() - sensed, 1), "builds_priced": builder.builds,
                    "emulated_runs": meter.runs},
    }
    return SearchResult(points, plans, candidates, groups, report)


def plot(file, points: list[dict], chosen: int, floor: float | None, title: str) -> None:
    """``BUILD/precision.png``: modelled ms against SQNR of the evaluated points, the chosen one, the
    uniform W8A16 (all highest) and W8A8 (all lowest) ends, and the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ms = [p["ms"] for p in points]
    dbs = [p["sqnr_db"] if p["sqnr_db"] is not None else float("nan") for p in points]
    path = [j for j, p in enumerate(points) if "path_step" in p]
    ax.plot([ms[j] for j in path], [dbs[j] for j in path], "o-", color="#4477aa", label="points on the Pareto path")
    for name, style, color in (("w8a16", "s", "#228833"), ("w8a8", "D", "#ee6677")):
        j = next((j for j, p in enumerate(points) if p.get("uniform") == name), None)
        if j is not None:
            ax.plot([ms[j]], [dbs[j]], style, color=color, markersize=10, label=f"uniform {name.upper()}")
    ax.plot([ms[chosen]], [dbs[chosen]], "*", color="#ccbb44", markersize=18, markeredgecolor="k", label="chosen")
    if floor is not None and math.isfinite(floor):
        ax.axhline(floor, color="grey", linestyle="--", label=f"floor {floor:g} dB")
    ax.set_xlabel("modelled time (ms, target cost model)")
    ax.set_ylabel("SQNR vs FP32 (dB, evaluation inputs)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)
