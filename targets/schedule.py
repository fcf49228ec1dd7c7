"""Schedules by name: how the Program's commands may overlap (PERFORMANCE.md "Schedules").

A schedule is a *base* -- ``sequential`` (every command one after another) or ``overlap`` (an
op's DMA beside its compute, ops one after another: the schedule the Exynos 2400 target was
fitted under, so Tables 6/7, the MLT figures and MLPerf are reproduced with it) -- plus the
*mechanisms* the compiler may use on top of ``overlap``, each a decision the lowering records in
the Program:

* ``pipelined-mlt``: a tiled attention runs its tiles as a three-stage pipeline across the
  engines (tile i's softmax on the vector engine while tile i+1's QK^T and tile i-1's S x V run
  on the tensor engine), S_in/S_out double-buffered; the MLT solver prices tilings so;
* ``pipelined-cascades``: the ops of a cascade (a chain of row-wise ops whose too-big
  intermediates stay on chip in row stripes) run stripe by stripe as a pipeline across the
  engines -- a vector op (GeGLU, an activation) on stripe s while the tensor ops beside it work on
  stripes s+1 and s-1 -- the stripe buffers double-buffered (twice the stripes);
* ``prefetch``: the DMA engine runs ahead of the compute engines: an op's weight load (as much
  as the weight buffer has room for) and its input loads from DRAM (when the SRAM has room beside
  the previous op) start during the previous op;
* ``packed-operands``: an attention's Q, K, V and output lie in DRAM without the head-dim padding
  (the DMA pads each head row into SRAM and unpads the output on the way back), so the round trips
  between the projections and the block move their real bytes;
* ``concat-in-place``: a Concat whose axis is the outermost one is a view: its operands are its
  output's slices (in SRAM, or stored into their slices of the output in DRAM), no copy.

``best`` is ``overlap`` with every mechanism, the compiler's default. A schedule is written by
name or as ``overlap+MECH[+MECH...]`` (what ``bench/schedule_gains.py`` switches on one at a
time). Other bases can be registered in ``edgefc.targets.cost_model.SCHEDULES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefc.errors import TargetError

MECHANISMS = ("pipelined-mlt", "pipelined-cascades", "prefetch", "packed-operands", "concat-in-place")
BASES = ("sequential", "overlap")
BEST = "best"
DEFAULT = BEST
FITTED = "overlap"   # the schedule the target files' fitted numbers were measured under


@dataclass(frozen=True)
class ScheduleSpec:
    """A parsed schedule: its base and the mechanisms on top (``name`` as written, canonical)."""

    base: str
    mechanisms: frozenset = frozenset()

    @property
    def name(self) -> str:
        if self.base == "overlap" and self.mechanisms == frozenset(MECHANISMS):
            return BEST
        return "+".join([self.base] + [m for m in MECHANISMS if m in self.mechanisms])

    def has(self, mechanism: str) -> bool:
        return mechanism in self.mechanisms

    def only_base(self) -> ScheduleSpec:
        return ScheduleSpec(self.base)


def names(bases=BASES) -> list[str]:
    """The schedules to offer by name: ``best`` and the bases."""
    return [BEST, *bases]


def parse(text: str | None, bases=BASES) -> ScheduleSpec:
    """``best`` | a base | ``overlap+MECH[+MECH...]`` -> :class:`ScheduleSpec` (None: the default,
    ``best``). ``bases`` are the registered bases; an unknown name is one TargetError sentence."""
    text = DEFAULT if text is None else str(text).strip()
    if text == BEST:
        return ScheduleSpec("overlap", frozenset(MECHANISMS))
    base, *mechs = [p.strip() for p in text.split("+")]
    if base not in bases:
        raise TargetError(f"unknown schedule '{text}' (choose from {', '.join(names(bases))}, or "
                          f"overlap+MECHANISM with {', '.join(MECHANISMS)})")
    bad = [m for m in mechs if m not in MECHANISMS]
    if bad:
        raise TargetError(f"unknown schedule mechanism '{bad[0]}' in '{text}' (mechanisms: {', '.join(MECHANISMS)})")
    if mechs and base != "overlap":
        raise TargetError(f"schedule '{text}': mechanisms apply on top of 'overlap' only")
    return ScheduleSpec(base, frozenset(mechs))
