"""What the tiling solver and the cost model agree an attention block is (paper Sec. 2.3)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionSpec:
    """One fused attention: softmax(Q K^T * scale) V over ``heads`` heads.

    ``act_bytes`` is the byte size of its activations as deployed (2 for FP16/INT16, 4 for FP32).
    """

    name: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    act_bytes: int
    causal: bool = False


@dataclass(frozen=True)
class Tiling:
    """Split of an attention into ``row_tiles`` query-row tiles x ``head_tiles`` head groups."""

    row_tiles: int = 1
    head_tiles: int = 1

    @property
    def tiles(self) -> int:
        return self.row_tiles * self.head_tiles
