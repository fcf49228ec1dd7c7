"""The Program: what the lowering hands to the cost model (DESIGN.md "Target").

A Program is an ordered list of NPU commands, the engine of every graph node (``placement``,
decided by ``targets/placement.py``; the TVM lowering partitions by it) and the SRAM residency
decision of every tensor:

* ``load`` / ``store`` -- DMA between DRAM and the SRAM scratchpad, of one named tensor, with its
  byte count and the length of the contiguous runs the transfer is made of (``run_bytes``; 0 means
  one contiguous block);
* ``tensor`` -- a tensor-engine op (convolution, matmul, an attention matmul) with its MAC count,
  the MACs after padding to the engine's granularity, its output element count and its operand
  precision (``int8xint16``, ``int16xint16``, ``fp16`` ...);
* ``vector`` -- a vector-engine op with its element count and the element passes it makes per op
  class (``exp``, ``arith``, ``max``, ``reduce``, ``divide``);
* ``host`` -- an op the NPU cannot run, executed by the CPU on DRAM data.

A command may stand for ``repeat`` identical instances (the tiles of a tiled attention); commands
that share a ``loop`` id form one loop body executed ``repeat`` times (all of them carry the same
``repeat``), which the trace view expands tile by tile. Pricing never depends on the order within
a loop, so a repeated command costs exactly ``repeat`` times one instance.

The Program also carries its schedule (``schedule``, ``targets/schedule.py``) and the decisions
the lowering took under it: the attention blocks that run as a pipeline across the engines
(``Command.pipelined`` on their commands), the cascades whose ops run stripe by stripe as a
pipeline across the engines (``Command.cascade``, ``Command.stripes``) and the bytes of each load
the DMA engine moves ahead, during the previous op (``Command.ahead``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENGINES = ("dma", "tensor", "vector", "host")
KIND_ENGINE = {"load": "dma", "store": "dma", "tensor": "tensor", "vector": "vector", "host": "host"}

# Roles of the commands of one attention block: the rows of the paper's Table 6, in order.
ATTENTION_ROLES = ("load_qk", "qk_matmul", "store_s_in", "load_s_in", "softmax", "store_s_out",
                   "load_s_out_v", "sv_matmul", "store_out")


@dataclass(slots=True)
class Command:
    """One NPU command (see the module docstring for the kinds)."""

    kind: str                 # load | store | tensor | vector | host
    op: str                   # name of the graph node this command belongs to
    op_type: str              # its op type (Conv, Attention, Softmax, ...)
    tensor: str = ""          # DMA: the tensor moved
    bytes: int = 0            # DMA: bytes moved by one instance
    run_bytes: int = 0        # DMA: contiguous run length in DRAM (0 = one contiguous block)
    macs: int = 0             # tensor: real MACs of one instance
    padded_macs: int = 0      # tensor: MACs after padding rows/channels to the engine granularity
    out_elements: int = 0     # tensor: output elements written back by one instance
    precision: str = ""       # tensor: operand precision key of [tensor.rate]
    elements: int = 0         # vector/host: elements of one instance
    passes: tuple = ()        # vector: ((op class, passes over the elements), ...)
    elem_bytes: int = 2       # vector: bytes per element (1: the INT8 path of the vector engine)
    lut_passes: tuple = ()    # vector: passes over the same elements on the INT8 path (deferred softmax)
    post_elements: int = 0    # vector: elements of a second, 16-bit part (a deferred softmax's output tile)
    post_passes: tuple = ()   # vector: ... and its passes
    dispatches: int = 0       # engine command launches (charged once, not per repeat)
    handoffs: int = 0         # engine-to-engine hand-offs of one instance (tiled attention)
    repeat: int = 1           # identical instances
    loop: int = -1            # loop id (commands of one tile loop share it), -1 = none
    role: str = ""            # attention breakdown row (ATTENTION_ROLES) or ""
    spill: bool = False       # DMA caused by SRAM pressure (not an op's own operand traffic)
    ahead: int = 0            # load: bytes of its first instance moved during the previous op (prefetch)
    pipelined: bool = False   # attention: the block's tiles run as a pipeline across the engines
    cascade: int = -1         # pipelined cascade this op's commands belong to (-1: none)
    stripes: int = 0          # ... and the row stripes it runs in

    @property
    def engine(self) -> str:
        return KIND_ENGINE[self.kind]

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.repeat

    @property
    def total_macs(self) -> int:
        return self.macs * self.repeat


@dataclass
class OpInfo:
    """What the profile shows for one graph node besides its commands."""

    name: str
    op_type: str
    engine: str               # tensor | vector | host | none (free: reshape, Q/DQ, ...)
    block: str                # the model block it belongs to (from the node name)
    attention: object = None  # (AttentionSpec, Tiling) for attention ops


@dataclass
class Program:
    """Ordered NPU commands plus the residency of every activation tensor: ``sram`` (kept on
    chip), ``dram`` (stored and loaded back, with the reason in ``reasons``) or ``stream`` (too big
    for SRAM, passed to its only consumer through a stripe buffer)."""

    commands: list[Command] = field(default_factory=list)
    ops: list[OpInfo] = field(default_factory=list)
    residency: dict[str, str] = field(default_factory=dict)   # tensor -> sram | dram | stream
    reasons: dict[str, str] = field(default_factory=dict)     # tensor -> why it is not in SRAM
    placement: dict[str, str] = field(default_factory=dict)   # node -> none | host | tensor | vector
    host_reasons: dict[str, str] = field(default_factory=dict)  # node on the host -> why
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    sram_peak_bytes: int = 0       # activations (and the running op's weight buffer)
    weight_bytes: int = 0          # all weights of the model at their deployed types
    resident_weight_bytes: int = 0  # weights kept in SRAM across inferences (0: streamed per op)
    precision: str = "as-built"
    component: str = ""
    schedule: str = "overlap"      # the schedule it was lowered for (targets/schedule.py)

    def emit(self, cmd: Command) -> Command:
        self.commands.append(cmd)
        return cmd

    def dma_bytes(self) -> int:
        return sum(c.total_bytes for c in self.commands if c.kind in ("load", "store"))

    def macs(self) -> int:
        return sum(c.total_macs for c in self.commands if c.kind == "tensor")
