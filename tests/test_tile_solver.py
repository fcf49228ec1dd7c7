"""The MLT tile-count solver: exact (equal to brute force), cheap (few target calls), clear errors."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from edgefc import tile_solver as ts
from edgefc.attention import AttentionSpec, Tiling, divisors, padded_rows, tile_rows
from edgefc.errors import PassError
from tests.mlt_fake_target import FakeNpu

# The attention shapes of the BK-SDM-Tiny U-Net at 512x512 (self and cross, three resolutions),
# the SD VAE decoder's mid-block attention and the CLIP text encoder's.
UNET_512 = [AttentionSpec(f"{kind}{res}", 1, 8, res * res, res * res if kind == "self" else 77, c // 8, c // 8, "int16")
            for res, c in ((64, 320), (32, 640), (16, 1280)) for kind in ("self", "cross")]
OTHERS = [AttentionSpec("vae", 1, 1, 4096, 4096, 512, 512, "int16"), AttentionSpec("clip", 1, 12, 77, 77, 64, 64, "int16", True)]


def real_target():
    """The real exynos2400 target (it must carry the cost model the solver prices with)."""
    import edgefc

    tgt = edgefc.get_target("exynos2400")
    assert tgt.has_cost_model
    return tgt


def random_case(rng: random.Random):
    heads = rng.choice([1, 2, 3, 4, 5, 6, 8, 12, 16])
    spec = AttentionSpec("x", rng.choice([1, 2]), heads, rng.randint(1, 5000), rng.randint(1, 5000),
                         rng.choice([8, 40, 64, 80, 160]), rng.choice([8, 40, 64]), rng.choice(["int8", "int16", "fp16", "fp32"]),
                         rng.random() < 0.2)
    tgt = FakeNpu(sram_bytes=rng.choice([1 << 20, 6 << 20, 16 << 20]), row_granularity=rng.choice([1, 8, 16, 32, 64]),
                  handoff=rng.choice([0, 100, 3000, 30000]), dma_latency=rng.choice([0, 600]),
                  bank_bytes=rng.choice([0, 1 << 14, 1 << 18]), bank_cycles_per_byte=rng.choice([0, 0.05, 1.0]))
    return spec, tgt, rng.randint(1 << 12, tgt.sram.total)


def assert_same(spec, tgt, budget, schedule=None):
    try:
        fast = ts.solve(spec, tgt, budget, schedule=schedule)
    except ts.InfeasibleBudgetError as e:
        with pytest.raises(ts.InfeasibleBudgetError) as ref:
            ts.brute_force(spec, tgt, budget, schedule=schedule)
        assert e.min_budget == ref.value.min_budget
        return None
    ref = ts.brute_force(spec, tgt, budget, schedule=schedule)
    assert (fast.tiling, fast.variant) == (ref.tiling, ref.variant), (spec, budget, fast.tiling, fast.cycles, ref.tiling, ref.cycles)
    assert fast.cycles == ref.cycles and fast.sram_bytes == ref.sram_bytes <= budget
    return fast


# --- exactness -------------------------------------------------------------------------------

def test_solver_equals_brute_force_random_shapes_and_budgets():
    rng = random.Random(2024)
    solved = infeasible = 0
    for _ in range(1500):
        sol = assert_same(*random_case(rng))
        solved += sol is not None
        infeasible += sol is None
    assert solved > 800 and infeasible > 50  # both outcomes exercised


def test_solver_equals_brute_force_on_model_shapes_and_budget_sweep():
    tgt = FakeNpu()
    for spec in UNET_512 + OTHERS:
        for budget in [1 << k for k in range(16, 23)] + [ts.default_budget(tgt), tgt.sram.total]:
            assert_same(spec, tgt, budget)


def test_solver_finds_interior_minimum_of_a_convex_cost():
    # The bank term makes the cost fall and then rise over the feasible row tiles: the optimum
    # is neither the first feasible tiling nor the last, and the scan must walk to it.
    tgt = FakeNpu(handoff=500, bank_bytes=1 << 19, bank_cycles_per_byte=0.01)
    spec = AttentionSpec("s", 1, 1, 4096, 4096, 64, 64, "int16")
    budget = 6 << 20
    sol = assert_same(spec, tgt, budget)
    feasible = [r for r in divisors(padded_rows(4096, 16) // 16)
                if tgt.attention_sram_bytes(spec, Tiling(r, sol.tiling.head_tiles)) <= budget]
    assert feasible[0] < sol.tiling.row_tiles < feasible[-1]


def test_ties_go_to_fewer_tiles():
    # No per-tile cost at all: every feasible tiling with the same head split costs the same.
    tgt = FakeNpu(handoff=0, dma_latency=0)
    spec = AttentionSpec("s", 1, 8, 1024, 1024, 64, 64, "int16")
    sol = assert_same(spec, tgt, 2 << 20)
    ref = [r for r in divisors(1024 // 16) if tgt.attention_sram_bytes(spec, Tiling(r, sol.tiling.head_tiles)) <= 2 << 20]
    assert sol.tiling.row_tiles == ref[0]


@pytest.mark.parametrize("schedule", ["overlap", "best"])
def test_real_target_solver_equals_brute_force(schedule):
    """Under overlap (one way to run a tiled block) and best (pipelined or sequential tiles)."""
    tgt = real_target()
    rng = random.Random(7)
    specs = UNET_512 + OTHERS + [AttentionSpec("r", 1, rng.choice([1, 2, 4, 8, 12]), rng.randint(16, 4096),
                                               rng.randint(16, 4096), rng.choice([40, 64, 80, 160]),
                                               rng.choice([40, 64, 80]), rng.choice(["int16", "fp32"])) for _ in range(60)]
    for spec in specs:
        for budget in (tgt.sram.total // 8, tgt.sram.total // 2, ts.default_budget(tgt), tgt.sram.total,
                       rng.randint(1 << 16, tgt.sram.total)):
            assert_same(spec, tgt, budget, schedule)


@pytest.mark.parametrize("variant", ["sequential", "pipelined"])
def test_real_target_has_the_properties_the_solver_relies_on(variant):
    """(P1) working set non-increasing in row tiles; (P2) the cost, once a tile fits, unimodal in row
    tiles (non-decreasing for sequential tiles; a pipeline's fill and drain shrink with the tiles
    while hand-offs grow, so it may fall first)."""
    tgt = real_target()
    g = ts.row_granularity(tgt)
    for spec in UNET_512 + OTHERS:
        for h, rows in ts.candidate_tilings(spec, g).items():
            sram = [tgt.attention_sram_bytes(spec, Tiling(r, h), variant) for r in rows]
            assert all(a >= b for a, b in itertools.pairwise(sram)), (spec.name, h, sram)
            cost = [tgt.attention_cycles(spec, Tiling(r, h), variant) for r, s in zip(rows, sram) if s <= tgt.sram.tiles]
            rises = [b > a * (1 + 1e-9) for a, b in itertools.pairwise(cost)]
            falls = [b < a * (1 - 1e-9) for a, b in itertools.pairwise(cost)]
            first_rise = rises.index(True) if True in rises else len(rises)
            assert not any(falls[first_rise:]), (spec.name, h, variant, cost)
            if variant == "sequential":
                assert not any(falls), (spec.name, h, cost)


# --- cost of solving ----------------------------------------------------------------------------

def test_solver_asks_the_target_few_times():
    # Not a timing test: the number of target calls bounds the work (bench prints the ms).
    tgt = FakeNpu()
    for spec in UNET_512 + OTHERS:
        cands = ts.candidate_tilings(spec, 16)
        tgt.calls = 0
        try:
            sol = ts.solve(spec, tgt, ts.default_budget(tgt))
        except ts.InfeasibleBudgetError:
            sol = None
        n_rows = len(next(iter(cands.values())))
        bound = len(cands) * (math.ceil(math.log2(n_rows + 1)) + 3) + len(cands)
        assert tgt.calls <= bound, (spec.name, tgt.calls, bound)
        if sol is not None and n_rows >= 4:
            assert sol.evaluated < sol.candidates / 2, (spec.name, sol.evaluated, sol.candidates)


# --- candidates and conventions ------------------------------------------------------------------

@pytest.mark.parametrize("q_len,g", [(4096, 16), (77, 16), (1000, 32), (5, 64), (4096, 1)])
def test_candidates_are_whole_granules_and_head_groups(q_len, g):
    spec = AttentionSpec("s", 1, 12, q_len, 77, 64, 64, "int16")
    cands = ts.candidate_tilings(spec, g)
    assert sorted(cands) == [1, 2, 3, 4, 6, 12]
    for h, rows in cands.items():
        assert rows == sorted(rows) and rows[0] == 1
        for r in rows:
            t = tile_rows(spec, Tiling(r, h), g)
            assert t % g == 0 and t * r == padded_rows(q_len, g) and (r - 1) * t < q_len


def test_tile_rows_rejects_a_split_that_is_not_whole_granules():
    with pytest.raises(ValueError):
        tile_rows(AttentionSpec("s", 1, 8, 4096, 4096, 40, 40, "int16"), Tiling(3, 1), 16)


# --- budgets and errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("6291456", 6291456), (4096, 4096), ("4MiB", 4 << 20), ("0.5 MiB", 1 << 19),
                                        ("512KiB", 512 << 10), ("512kib", 512 << 10), ("1GiB", 1 << 30),
                                        ("100B", 100), (".25MiB", 1 << 18)])
def test_parse_budget(text, value):
    assert ts.parse_budget(text) == value


@pytest.mark.parametrize("text,needle", [("4MB", "binary units"), ("4 k", "binary units"), ("lots", "expected bytes"),
                                         ("0", "positive"), ("-1", "expected bytes"), ("1.5", "whole number"),
                                         ("3 TiB", "unknown unit"), ("", "expected bytes")])
def test_parse_budget_errors(text, needle):
    with pytest.raises(PassError) as e:
        ts.parse_budget(text)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_infeasible_budget_names_the_smallest_budget_that_works():
    tgt = FakeNpu()
    spec = UNET_512[0]
    with pytest.raises(ts.InfeasibleBudgetError) as e:
        ts.solve(spec, tgt, 100_000)
    err = e.value
    msg = str(err)
    assert "\n" not in msg and f"--sram-budget {err.min_budget}" in msg and spec.name in msg
    assert isinstance(err, PassError)
    ts.solve(spec, tgt, err.min_budget)  # the named budget works ...
    with pytest.raises(ts.InfeasibleBudgetError):
        ts.solve(spec, tgt, err.min_budget - 1)  # ... and nothing smaller does
    every = [tgt.attention_sram_bytes(spec, Tiling(r, h)) for h, rs in ts.candidate_tilings(spec, 16).items() for r in rs]
    assert err.min_budget == min(every)


def test_default_budget_leaves_a_reserve():
    tgt = FakeNpu(sram_bytes=6 << 20)
    assert ts.default_budget(tgt) == (6 << 20) - (6 << 20) // 16
    tgt = FakeNpu(sram_bytes=6 << 20, reserve_bytes=1 << 20)
    assert ts.default_budget(tgt) == 5 << 20


# --- explain ----------------------------------------------------------------------------------

def test_explain_lists_every_candidate_and_the_choice():
    tgt = FakeNpu()
    spec = UNET_512[0]
    budget = ts.default_budget(tgt)
    table = ts.explain(spec, tgt, budget)
    sol = ts.solve(spec, tgt, budget)
    rows = table["candidates"]
    assert len(rows) == sol.candidates
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and (chosen[0]["row_tiles"], chosen[0]["head_tiles"]) == (sol.tiling.row_tiles, sol.tiling.head_tiles)
    fits = [r for r in rows if r["fits"]]
    assert min(fits, key=lambda r: (r["cycles"], r["tiles"]))["chosen"]
    assert rows and all(r["fits"] == (r["sram_bytes"] <= budget) for r in rows)
    assert not table["untiled_fits"] and table["choice"]["tiles"] == sol.tiling.tiles
    text = ts.format_explain([table])
    assert "<- chosen" in text and spec.name in text and "pruned" in text
    assert sum(r["priced"] for r in rows) == sol.evaluated
    # A second block of the same shape refers to the first table instead of repeating it.
    twice = ts.format_explain([table, dict(table, block="other")])
    assert twice.count("<- chosen") == 1 and f"candidates as for {spec.name}" in twice


def test_explain_reports_an_infeasible_budget():
    table = ts.explain(UNET_512[0], FakeNpu(), 4096)
    assert table["choice"] is None and "--sram-budget" in table["error"]
    assert "no tiling fits" in ts.format_explain([table])
