"""The paper's Table 6 for a Program: where the time of its largest attention block goes.

``attention_breakdown`` gives the share of each step (Q K^T, the S_in/S_out DMA round trips,
softmax, P V ...; the roles of ``targets/attention_block.py``) in the untiled block's time,
priced untiled (``rows``) and with the tiling MLT chooses (``rows_mlt``): the solver's choice at
the target's default SRAM budget, else the build's own tiling. Paper Sec. 2.3, Table 6.
"""

from __future__ import annotations

from edgefc import tile_solver
from edgefc.attention import Tiling, row_granularity
from edgefc.target import Target
from edgefc.targets.attention_block import lower_attention
from edgefc.targets.cost_model import command_cycles
from edgefc.targets.description import Architecture
from edgefc.targets.program import ATTENTION_ROLES, Program


def role_cycles(arch: Architecture, spec, tiling) -> dict[str, float]:
    """Cycles of one attention block per Table 6 row (commands grouped by role)."""
    out = {k: 0.0 for k in ATTENTION_ROLES}
    for c in lower_attention(spec, tiling, arch):
        out[c.role] += command_cycles(arch, c)
    return out


def mlt_tiling(target: Target, spec, built=None, schedule: str | None = None):
    """``(tiling, source or why not, variant)``: the tiling MLT gives this block under ``schedule``
    -- the solver's choice at the target's default SRAM budget (``edgefc.tile_solver``, core), else
    the build's own tiling; ``(None, why, "")`` when there is none."""
    try:
        sol = tile_solver.solve(spec, target, tile_solver.default_budget(target), row_granularity(target), schedule)
        return sol.tiling, "solver", sol.variant
    except tile_solver.InfeasibleBudgetError as e:
        why = (f"no tiling fits {target.name}'s default SRAM budget of {e.budget / 2**20:.2f} MiB (the smallest "
               f"tile needs {e.min_budget / 2**20:.2f} MiB), so MLT leaves this block untiled")
    if built is not None and built.tiles > 1:
        return built, "build", ""
    return None, why, ""


def attention_breakdown(target: Target, arch: Architecture, program: Program, schedule: str | None = None) -> dict | None:
    """Table 6 for the program's largest attention block: shares of the untiled block's time.

    ``rows``: the block priced untiled (one tile); ``rows_mlt``: priced with the tiling MLT
    chooses under ``schedule`` (None when no tiling is available, and ``rows_mlt_reason`` says
    why); both in percent of the untiled block's cycles (the rows are sums of the commands of each
    kind, whatever overlaps them: ``tiled_ms`` is their sum, ``tiled_block_ms`` the block's time
    under the schedule).
    ``target`` is the one the MLT solver asks, ``arch`` its description.
    """
    blocks = [o for o in program.ops if o.attention is not None]
    if not blocks:
        return None
    op = max(blocks, key=lambda o: (o.attention[0].batch * o.attention[0].heads * o.attention[0].q_len
                                    * o.attention[0].kv_len))
    spec, built = op.attention
    untiled = role_cycles(arch, spec, Tiling(1, 1))
    total = sum(untiled.values())
    out = {"block": op.name,
           "shape": f"{spec.heads} heads x {spec.q_len} x {spec.kv_len}, head dim {spec.head_dim}, "
                    f"{spec.act_dtype} activations",
           "untiled_ms": total / arch.clock_hz * 1e3,
           "rows": {k: round(100.0 * v / total, 3) for k, v in untiled.items()},
           "rows_mlt": None, "tiling_mlt": None, "tiling_mlt_source": None,
           "built_tiling": {"row_tiles": built.row_tiles, "head_tiles": built.head_tiles}}
    tiling, source, variant = mlt_tiling(target, spec, built, schedule)
    if tiling is None:
        out["rows_mlt_reason"] = source
    else:
        tiled = role_cycles(arch, spec, tiling)
        block = target.attention_cycles(spec, tiling, variant=variant) if variant else sum(tiled.values())
        out.update(rows_mlt={k: round(100.0 * v / total, 3) for k, v in tiled.items()},
                   tiling_mlt={"row_tiles": tiling.row_tiles, "head_tiles": tiling.head_tiles, "variant": variant},
                   tiling_mlt_source=source, tiled_ms=sum(tiled.values()) / arch.clock_hz * 1e3,
                   tiled_block_ms=block / arch.clock_hz * 1e3)
    return out
