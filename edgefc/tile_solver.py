"""The tile-count solver of model-level tiling (paper Sec. 2.3): the cheapest tiling of an
attention block whose working set fits the SRAM budget.

Pure and target-agnostic: everything it knows about the hardware comes from the interface core
defines (:class:`edgefc.target.Target`; the NPU target answers from its cost model):

* ``target.attention_variants(schedule) -> names``      the ways a tiled block can run under the
                                                         schedule (e.g. pipelined, sequential);
* ``target.attention_sram_bytes(spec, tiling, variant=) -> int``  SRAM working set of one tile;
* ``target.attention_cycles(spec, tiling, variant=) -> float``     the cost model's time for the block;
* ``target.row_granularity``                             rows per tensor-engine pass;
* ``target.sram.tiles``                                  the default budget (the SRAM less its reserve);
* ``target.clock_hz``                                    to state times in ms.

**Candidates.** ``Tiling(r, h)`` with ``h`` dividing the heads and ``r`` dividing
``n = padded_rows / G`` (so every row tile is a whole number of granules of ``G`` rows; see
``edgefc.attention``), under each variant the schedule allows (a pipelined block double-buffers
its tiles, so needs more SRAM for the same tiling). A candidate is *feasible* when its working set
is at most the budget. The solver returns the feasible candidate of least ``attention_cycles``;
ties go to fewer tiles, then fewer head tiles, then the variant the target prefers (costs within a
relative 1e-9 are equal), the order :func:`brute_force` uses too.

**Algorithm.** For each variant and each head split ``h`` (a handful: the divisors of the head count):

1. binary-search the smallest feasible row-tile count ``r*`` among the divisors of ``n``;
2. evaluate the cost at ``r*`` and then at the next larger divisors, stopping at the first one
   whose cost is strictly higher than the previous one.

The best over all variants and ``h`` is the answer. Calls to the target: per ``h``, about ``log2(d(n)) + 2``
(``d(n)`` = number of divisors, 9 for 4096 rows at ``G = 16``), so a block is solved in well under
a millisecond with an arithmetic cost model; nothing is cached between blocks.

**Why it is exact** (it returns the same tiling as evaluating every candidate), given two
properties of the cost model, which the cost model has by construction and the tests check against
brute force on random shapes and budgets, with a synthetic target and with the real one:

* (P1) *the working set shrinks with the tiles*: for a fixed ``h``, a tile with fewer rows never
  needs more SRAM, so ``sram(r, h)`` is non-increasing in ``r``. The feasible ``r`` therefore form a
  suffix of the sorted divisors and step 1 finds its first element exactly.
* (P2) *on the feasible suffix the cost is unimodal in r* (first non-increasing, then
  non-decreasing). The block time is a sum of (a) per-tile terms - engine hand-off, per-transfer
  DMA latency, dispatch - each paid once per tile, so non-decreasing in ``r``; (b) bytes moved and
  MACs done, which do not depend on ``r`` once S_in/S_out stay on chip (tiles are whole granules,
  so padding does not change either; K/V reloaded per row tile only add a non-decreasing term);
  (c) traffic for whatever still spills, non-increasing in ``r`` and zero when the tile fits. On
  the feasible suffix (c) is zero, so the cost is non-decreasing there - a special case of
  unimodal - and any cost model that trades a falling term against a rising one in a convex way
  (e.g. partial spills that shrink with the tile) is unimodal too. Under (P2), once the cost rises
  strictly it never falls again, so every ``r`` after the stop costs at least as much as one
  already seen; equal costs (plateaus) are scanned through, so a later fall is never missed.
  Larger ``r`` also means more tiles, so among equal costs the earliest ``r`` is the tie winner.

An infeasible budget (no candidate fits) raises :class:`InfeasibleBudgetError`, one sentence
naming the smallest budget that works: the working set of the most finely split tiling (the
minimum over all candidates, by P1 the largest ``r`` of some ``h``).
"""

from __future__ import annotations

import gc
import re
import time
from dataclasses import dataclass, field

from edgefc.attention import (
    AttentionSpec,
    Tiling,
    divisors,
    heads_per_tile,
    padded_rows,
    row_granularity,
    tile_rows,
)
from edgefc.errors import PassError
from edgefc.target import Target


class InfeasibleBudgetError(PassError):
    """No tiling of an attention fits the SRAM budget; ``min_budget`` is the smallest that works."""

    def __init__(self, message: str, spec: AttentionSpec, budget: int, min_budget: int, tiling: Tiling):
        super().__init__(message)
        self.spec, self.budget, self.min_budget, self.tiling = spec, budget, min_budget, tiling


# --- budgets ---------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_budget(value) -> int:
    """``--sram-budget`` value to bytes: an integer byte count, or a number with KiB/MiB/GiB.

    ``parse_budget("4MiB") == 4194304``, ``parse_budget("0.5 MiB") == 524288``, ``parse_budget(6000) == 6000``.
    Raises PassError (one sentence) for anything else.
    """
    if isinstance(value, bool):
        raise PassError(f"bad SRAM budget {value!r}: expected bytes or a size like 4MiB")
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        text = str(value).strip()
        m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)", text)
        if not m:
            raise PassError(f"bad SRAM budget '{value}': expected bytes or a size like 4MiB, 512KiB, 0.5MiB")
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit in ("k", "kb", "m", "mb", "g", "gb"):
            raise PassError(f"bad SRAM budget '{value}': write binary units, e.g. {m.group(1)}"
                            f"{ {'k': 'KiB', 'm': 'MiB', 'g': 'GiB'}[unit[0]] } (or a byte count)")
        if unit not in _UNITS:
            raise PassError(f"bad SRAM budget '{value}': unknown unit '{m.group(2)}' (use bytes, KiB, MiB or GiB)")
    size = number * _UNITS[unit]
    if size != int(size):
        raise PassError(f"bad SRAM budget '{value}': not a whole number of bytes")
    if size <= 0:
        raise PassError(f"bad SRAM budget '{value}': it must be positive")
    return int(size)


def default_budget(target: Target) -> int:
    """The budget when none is given: ``target.sram.tiles``, the SRAM less the reserve the target
    file names (``sram.reserve_bytes``: what else is live around an attention -- the residual
    stream, the next projection's weights, command buffers)."""
    return target.sram.tiles


def fmt_bytes(n: float) -> str:
    """``1.50 MiB`` style, for messages and tables."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def cycles_to_ms(target: Target, cycles: float) -> float:
    """Cycles at the target's clock (``target.clock_hz``), in ms (NaN for a target without a clock)."""
    hz = target.clock_hz
    return float(cycles) / float(hz) * 1e3 if hz else float("nan")


# --- candidates --------------------------------------------------------------------------------

def candidate_tilings(spec: AttentionSpec, granularity: int) -> dict[int, list[int]]:
    """Head-tile count -> increasing row-tile counts, for every tiling the solver may choose."""
    granules = padded_rows(spec.q_len, granularity) // granularity
    rows = divisors(granules)
    return {h: rows for h in divisors(spec.heads)}


@dataclass
class Solution:
    """The solver's answer for one block, with what it cost to find it."""

    spec: AttentionSpec
    tiling: Tiling
    sram_bytes: int
    cycles: float
    budget: int
    granularity: int
    candidates: int                 # tilings the solver could choose from (all variants)
    evaluated: int                  # attention_cycles calls
    variant: str = ""               # how the chosen tiling runs (target.attention_variants)
    seconds: float = 0.0            # wall time of the solve
    cpu_seconds: float = 0.0        # CPU time of the solving thread (immune to other processes)
    priced: set = field(default_factory=set)   # (r, h, variant) whose time the solver asked for (--explain-tiling)

    @property
    def tile_rows(self) -> int:
        return tile_rows(self.spec, self.tiling, self.granularity)

    @property
    def heads_per_tile(self) -> int:
        return heads_per_tile(self.spec, self.tiling)


class _Probe:
    """Counts and memoises the target calls of one solve."""

    def __init__(self, spec, target):
        self.spec, self.target = spec, target
        self.sram, self.cost = {}, {}

    def sram_bytes(self, r, h, v):
        if (r, h, v) not in self.sram:
            self.sram[(r, h, v)] = int(self.target.attention_sram_bytes(self.spec, Tiling(r, h), variant=v))
        return self.sram[(r, h, v)]

    def cycles(self, r, h, v):
        if (r, h, v) not in self.cost:
            self.cost[(r, h, v)] = float(self.target.attention_cycles(self.spec, Tiling(r, h), variant=v))
        return self.cost[(r, h, v)]


# Costs within this relative difference are a tie (sums of the same terms in another order differ
# in the last bits); ties go to fewer tiles, then fewer head tiles.
REL_TIE = 1e-9


def _rises(c: float, prev: float) -> bool:
    return c > prev + REL_TIE * max(abs(c), abs(prev))


def _better(a: tuple, b: tuple | None) -> bool:
    """Whether candidate ``a = (cycles, r, h, variant index)`` beats ``b``: lower cost, else fewer
    tiles, else fewer head tiles, else the preferred variant."""
    if b is None:
        return True
    if _rises(a[0], b[0]):
        return False
    if _rises(b[0], a[0]):
        return True
    return (a[1] * a[2], a[2], a[3]) < (b[1] * b[2], b[2], b[3])


def _variants(target: Target, schedule) -> tuple[str, ...]:
    variants = tuple(target.attention_variants(schedule))
    if not variants:
        raise PassError(f"target '{target.name}' names no way to run an attention block under schedule {schedule!r}")
    return variants


def _infeasible(spec, target, budget, probe, cands, variants) -> InfeasibleBudgetError:
    # By P1 the smallest working set of each head split is at its largest row-tile count.
    best = min(((probe.sram_bytes(rows[-1], h, v), rows[-1] * h, h, rows[-1]) for h, rows in cands.items()
                for v in variants))
    need, _, h, r = best
    shape = f"{spec.heads} heads x {spec.q_len} x {spec.kv_len}"
    return InfeasibleBudgetError(
        f"SRAM budget {fmt_bytes(budget)} ({budget} bytes) is too small for attention '{spec.name}' ({shape}): "
        f"even {r} row tiles x {h} head tiles need {fmt_bytes(need)} per tile; "
        f"use --sram-budget {need} or more",
        spec, budget, need, Tiling(r, h))


def solve(spec: AttentionSpec, target: Target, budget: int, granularity: int | None = None,
          schedule: str | None = None) -> Solution:
    """The feasible tiling of least ``target.attention_cycles`` under ``schedule`` (the target's
    default when None; exact, see the module docstring).

    The garbage collector is paused for the solve (well under a millisecond): a full collection
    would otherwise walk every object of a loaded U-Net graph in the middle of it.
    """
    start, cpu = time.perf_counter(), time.thread_time()
    paused = gc.isenabled()
    gc.disable()
    try:
        sol = _solve(spec, target, budget, granularity, schedule)
    finally:
        if paused:
            gc.enable()
    sol.seconds, sol.cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu
    return sol


def _solve(spec: AttentionSpec, target: Target, budget: int, granularity: int | None, schedule) -> Solution:
    g = granularity or row_granularity(target)
    cands = candidate_tilings(spec, g)
    variants = _variants(target, schedule)
    probe = _Probe(spec, target)
    best = None
    for vi, v in enumerate(variants):
        for h, rows in cands.items():
            # 1. smallest feasible row-tile count (P1: feasibility is monotone in r).
            lo, hi = 0, len(rows)
            while lo < hi:
                mid = (lo + hi) // 2
                if probe.sram_bytes(rows[mid], h, v) <= budget:
                    hi = mid
                else:
                    lo = mid + 1
            if lo == len(rows):
                continue
            # 2. scan on while the cost can still fall (P2: stop at the first strict rise).
            prev = None
            for r in rows[lo:]:
                c = probe.cycles(r, h, v)
                if _better((c, r, h, vi), best):
                    best = (c, r, h, vi)
                if prev is not None and _rises(c, prev):
                    break
                prev = c
    if best is None:
        raise _infeasible(spec, target, budget, probe, cands, variants)
    c, r, h, vi = best
    return Solution(spec, Tiling(r, h), probe.sram_bytes(r, h, variants[vi]), c, budget, g,
                    candidates=len(variants) * sum(len(v) for v in cands.values()), evaluated=len(probe.cost),
                    variant=variants[vi], priced=set(probe.cost))


def brute_force(spec: AttentionSpec, target: Target, budget: int, granularity: int | None = None,
                schedule: str | None = None) -> Solution:
    """Evaluate every candidate; the reference :func:`solve` is tested against."""
    start = time.perf_counter()
    g = granularity or row_granularity(target)
    cands = candidate_tilings(spec, g)
    variants = _variants(target, schedule)
    probe = _Probe(spec, target)
    best = None
    for vi, v in enumerate(variants):
        for h, rows in cands.items():
            for r in rows:
                if probe.sram_bytes(r, h, v) <= budget:
                    c = probe.cycles(r, h, v)
                    if _better((c, r, h, vi), best):
                        best = (c, r, h, vi)
    if best is None:
        raise _infeasible(spec, target, budget, probe, cands, variants)
    c, r, h, vi = best
    n = len(variants) * sum(len(v) for v in cands.values())
    return Solution(spec, Tiling(r, h), probe.sram_bytes(r, h, variants[vi]), c, budget, g, candidates=n,
                    evaluated=len(probe.cost), variant=variants[vi], seconds=time.perf_counter() - start,
                    priced=set(probe.cost))


@dataclass
class CandidateRow:
    """One line of ``--explain-tiling``."""

    row_tiles: int
    head_tiles: int
    tiles: int
    tile_rows: int
    heads_per_tile: int
    sram_bytes: int
    fits: bool
    cycles: float
    ms: float
    priced: bool        # the solver asked for its time (fitting ones it did not ask for were pruned)
    chosen: bool
    variant: str = ""   # how the tiling runs (target.attention_variants)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def explain(spec: AttentionSpec, target: Target, budget: int, granularity: int | None = None,
            schedule: str | None = None) -> dict:
    """Every candidate of one block with its working set and predicted time under ``schedule``, and
    the solver's choice.

    Returns ``{"block", "spec", "budget", "untiled_fits", "choice": {...} | None, "error": str | None,
    "solver_ms", "candidates": [CandidateRow.as_dict(), ...]}`` (candidates by tiles, then head
    tiles, then the target's order of variants).
    """
    g = granularity or row_granularity(target)
    variants = _variants(target, schedule)
    untiled_fits = int(target.attention_sram_bytes(spec, Tiling(1, 1), variant=variants[-1])) <= budget
    choice, error = None, None
    try:
        sol = solve(spec, target, budget, g, schedule)
        choice = {"row_tiles": sol.tiling.row_tiles, "head_tiles": sol.tiling.head_tiles,
                  "tiles": sol.tiling.tiles, "tile_rows": sol.tile_rows, "heads_per_tile": sol.heads_per_tile,
                  "variant": sol.variant, "sram_bytes": sol.sram_bytes, "cycles": sol.cycles,
                  "ms": cycles_to_ms(target, sol.cycles)}
        priced, solver_ms = sol.priced, sol.seconds * 1e3
    except InfeasibleBudgetError as e:
        error, priced, solver_ms = str(e), set(), None
    rows = []
    for vi, v in enumerate(variants):
        for h, rs in candidate_tilings(spec, g).items():
            for r in rs:
                t = Tiling(r, h)
                sram = int(target.attention_sram_bytes(spec, t, variant=v))
                cyc = float(target.attention_cycles(spec, t, variant=v))
                rows.append(CandidateRow(r, h, t.tiles, tile_rows(spec, t, g), heads_per_tile(spec, t), sram,
                                         sram <= budget, cyc, cycles_to_ms(target, cyc), (r, h, v) in priced,
                                         choice is not None and (r, h, v) == (choice["row_tiles"], choice["head_tiles"],
                                                                              choice["variant"]), v))
    order = {v: i for i, v in enumerate(variants)}
    rows.sort(key=lambda c: (c.tiles, c.head_tiles, order[c.variant]))
    return {"block": spec.name, "spec": spec_dict(spec), "budget": budget, "granularity": g,
            "untiled_fits": untiled_fits, "choice": choice, "error": error, "solver_ms": solver_ms,
            "candidates": [c.as_dict() for c in rows]}


def spec_dict(spec: AttentionSpec) -> dict:
    return {"batch": spec.batch, "heads": spec.heads, "q_len": spec.q_len, "kv_len": spec.kv_len,
            "head_dim": spec.head_dim, "v_head_dim": spec.v_head_dim, "act_dtype": spec.act_dtype,
            "causal": spec.causal, **({"score_dtype": spec.score_dtype} if spec.score_dtype else {})}


def format_explain(tables: list[dict], target=None) -> str:
    """The ``--explain-tiling`` text: per block, the candidates weighed and the choice. Blocks with
    the same shape and budget as an earlier one get one line referring to its table."""
    out, seen = [], {}
    for t in tables:
        s = t["spec"]
        out.append(f"{t['block']}: {s['heads']} heads x {s['q_len']} x {s['kv_len']} (dk {s['head_dim']}, "
                   f"{s['act_dtype']}{', causal' if s['causal'] else ''}); budget {fmt_bytes(t['budget'])}, "
                   f"row granularity {t['granularity']}")
        key = (tuple(sorted(s.items())), t["budget"], t["granularity"])
        if t["untiled_fits"]:
            out.append("  untiled working set fits the budget: left alone by mlt")
        elif key in seen:
            pass
        else:
            seen[key] = t["block"]
            many = len({c.get("variant", "") for c in t["candidates"]}) > 1
            out.append(f"  {'tiles':>6} {'rows':>5}x{'heads':<5} {'tile rows':>9} " + (f"{'variant':<10} " if many else "")
                       + f"{'SRAM/tile':>11} {'fits':>4} {'time ms':>9}")
            for c in t["candidates"]:
                mark = "<- chosen" if c["chosen"] else ("priced" if c["priced"] else ("pruned" if c["fits"] else ""))
                out.append(f"  {c['tiles']:>6} {c['row_tiles']:>5}x{c['head_tiles']:<5} {c['tile_rows']:>9} "
                           + (f"{c['variant']:<10} " if many else "")
                           + f"{fmt_bytes(c['sram_bytes']):>11} {'yes' if c['fits'] else 'no':>4} {c['ms']:>9.3f}  {mark}")
            n_fit = sum(c["fits"] for c in t["candidates"])
            n_priced = sum(c["priced"] for c in t["candidates"])
            out.append(f"  {len(t['candidates'])} candidates, {n_fit} fit; the solver priced {n_priced} "
                       f"(\"pruned\": fits, but cannot beat the choice)")
        if t["error"]:
            out.append(f"  no tiling fits: {t['error']}")
        elif not t["untiled_fits"]:
            ch = t["choice"]
            same = f" (candidates as for {seen[key]})" if seen.get(key) != t["block"] else ""
            how = f", {ch['variant']}" if ch.get("variant") else ""
            out.append(f"  choice: {ch['row_tiles']} row tiles x {ch['head_tiles']} head tiles{how} "
                       f"({ch['tile_rows']} rows x {ch['heads_per_tile']} heads per tile, "
                       f"{fmt_bytes(ch['sram_bytes'])}), {ch['ms']:.3f} ms; solver {t['solver_ms']:.2f} ms{same}")
        out.append("")
    return "\n".join(out)
