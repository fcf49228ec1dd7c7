"""A synthetic NPU target for the MLT tests: the cost model's shape (per-tile engine hand-off +
DMA with per-transfer latency + tensor/vector compute, S_in/S_out spilled when a tile does not
fit), with round numbers instead of fitted ones. Not the real target: the tests run against both.
"""

from __future__ import annotations

from edgefc.attention import AttentionSpec, Tiling, heads_per_tile, tile_rows
from edgefc.target import SramBudget, Target


def _pad(n: int, g: int) -> int:
    return -(-n // g) * g


class FakeNpu(Target):
    """Working set and cycles of an attention tile, Table 6's command list per tile.

    ``bank_bytes``/``bank_cycles_per_byte`` add an optional convex term (a per-tile penalty for the
    part of S_in beyond a small fast buffer) so the solver's scan also meets a cost that first falls,
    then rises, over the feasible tilings.
    """

    name = "fake-npu"
    is_npu = True
    has_cost_model = True

    def __init__(self, sram_bytes: int = 6 << 20, *, row_granularity: int = 16, channel_granularity: int = 64,
                 macs_per_cycle: int = 8192, lanes: int = 128, dram_bytes_per_cycle: float = 24.0,
                 dma_latency: float = 600.0, handoff: float = 3000.0, bank_bytes: int = 0,
                 bank_cycles_per_byte: float = 0.0, clock_hz: float = 1.2e9, reserve_bytes: int | None = None):
        self.sram = SramBudget(sram_bytes, 0, sram_bytes // 16 if reserve_bytes is None else reserve_bytes)
        self.row_granularity = row_granularity
        self.cg = channel_granularity
        self.macs, self.lanes, self.bw, self.lat = macs_per_cycle, lanes, dram_bytes_per_cycle, dma_latency
        self.handoff, self.bank_bytes, self.bank_cpb = handoff, bank_bytes, bank_cycles_per_byte
        self.clock_hz = clock_hz
        self.calls = 0

    def _dims(self, spec: AttentionSpec, tiling: Tiling):
        rows = tile_rows(spec, tiling, self.row_granularity)
        hp = heads_per_tile(spec, tiling)
        return rows, hp, _pad(spec.head_dim, self.cg), _pad(spec.v_head_dim, self.cg), _pad(spec.kv_len, self.row_granularity)

    def attention_sram_bytes(self, spec: AttentionSpec, tiling: Tiling, variant: str = "") -> int:
        self.calls += 1
        rows, hp, dk, dv, kv = self._dims(spec, tiling)
        elems = rows * hp * dk + kv * hp * (dk + dv) + 2 * hp * rows * kv + rows * hp * dv
        return spec.batch * spec.act_bytes * elems

    def _dma(self, nbytes: float) -> float:
        return self.lat + nbytes / self.bw

    def attention_cycles(self, spec: AttentionSpec, tiling: Tiling, variant: str = "") -> float:
        self.calls += 1
        rows, hp, dk, dv, kv = self._dims(spec, tiling)
        a, b = spec.act_bytes, spec.batch
        s_bytes = b * a * hp * rows * kv
        spill = self.attention_sram_bytes(spec, tiling) > self.sram.total
        self.calls -= 1
        per_tile = (self._dma(b * a * rows * hp * dk)                      # load Q tile
                    + b * rows * hp * kv * dk / self.macs                  # Q x K^T
                    + b * hp * rows * kv * 4 / self.lanes                  # softmax
                    + b * rows * hp * kv * dv / self.macs                  # S_out x V
                    + self._dma(b * a * rows * hp * dv)                    # store A
                    + 2 * self.handoff                                     # tensor -> vector -> tensor
                    + self.bank_cpb * max(0, s_bytes - self.bank_bytes))
        if spill:
            per_tile += 4 * self._dma(s_bytes)                             # store/load S_in, S_out
        per_group = self._dma(b * a * kv * hp * dk) + self._dma(b * a * kv * hp * dv)   # K, V once per head group
        return tiling.tiles * per_tile + tiling.head_tiles * per_group
