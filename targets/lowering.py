"""Lowering: Graph -> Program (DESIGN.md "Target"; PERFORMANCE.md explains every rule).

Each graph node is placed on one engine by ``targets/placement.py`` (tensor, vector, host or
nothing; recorded in ``Program.placement``) and becomes the commands of that engine: a
convolution or matmul one tensor command (MACs, padded MACs, precision), a vector op one vector
command (elements, passes of its class), an attention block its commands
(``targets/attention_block.py``), a host op one host command; weights and spilled activations
add DMA commands.

Byte sizes come from each tensor's deployed type and tensor-engine rates from each op's precision
(``edgefc/deployed_types.py``): as ``quantize`` decided them (``as-built``: the precision recorded on
each op, the graph's dtypes, where a tensor passing through QuantizeLinear/DequantizeLinear is priced
at the quantized type); or a what-if precision (``fp32``, ``fp16``, ``w8a16``: INT8 weights, INT16
activations, INT32 biases; ``w8a8``: INT8 weights and activations, INT32 biases, as MLPerf Mobile
runs its networks).

Residency: activations stay in SRAM while they fit together with everything else live at that
point; otherwise the tensor whose next use is furthest is stored to DRAM and loaded back where
it is used (a Belady-style choice). An op whose own operands do not fit streams them through
DRAM. Weights arrive by DMA for every op that uses them. Attention blocks read Q, K, V from DRAM
and write their output to DRAM (their producers store them); inside the block S_in = QK^T and
S_out = softmax(S_in) stay in SRAM when the tile's working set fits, else each makes a DRAM round
trip (the paper's Sec. 2.3 and Table 6).
"""

from __future__ import annotations

import dataclasses
import math

import onnx_graphsurgeon as gs

from edgefc.attention import (
    AttentionSpec,
    granularity_from_node,
    spec_from_node,
    tiling_from_node,
)
from edgefc.deployed_types import DeployedTypes
from edgefc.dtypes import DTYPE_BYTES as BYTES
from edgefc.errors import BuildError
from edgefc.precision import PRICINGS
from edgefc.targets.attention_block import (
    attention_io_bytes,
    attention_sram_bytes,
    lower_attention,
    pipelines,
)
from edgefc.targets.blocks import block_of, component_of
from edgefc.targets.control_flow import CONTROL_FLOW, control_flow_commands, reads
from edgefc.targets.description import Architecture
from edgefc.targets.geometry import contraction, pad
from edgefc.targets.placement import INPUT_SIZED, TENSOR_OPS, VECTOR_CLASS, node_names, place, vector_passes
from edgefc.targets.program import Command, OpInfo, Program
from edgefc.targets.schedule import ScheduleSpec

# Producer -> consumer streaming (a two-op cascade, as Arm Vela's cascading): a tensor too big
# for SRAM whose only consumer is the very next op passes through a small stripe buffer instead
# of DRAM when the producer writes it row by row and the consumer reads it row by row.
_ROWWISE = {k for k in VECTOR_CLASS if k not in INPUT_SIZED and k != "Softmax"}   # elementwise / activations
# DepthToSpace / SpaceToDepth (pixel shuffle) are spatially local too: output rows 2h, 2h+1 come
# from input row h, a strided write pattern of the stripe.
_SPATIAL = {"Resize", "DepthToSpace", "SpaceToDepth"}
STREAM_PRODUCERS = TENSOR_OPS | _ROWWISE | _SPATIAL | {"GroupNormalization", "GroupNormSiLU",
                                                       "InstanceNormalization", "LayerNormalization", "Gelu", "GeGLU"}
STREAM_CONSUMERS = TENSOR_OPS | _ROWWISE | _SPATIAL | {"Gelu", "GeGLU"}

# --- graph lowering ---------------------------------------------------------------------------

def _shape(t: gs.Tensor) -> tuple[int, ...] | None:
    s = t.shape
    if s is None:
        return None
    try:
        return tuple(int(d) for d in s)
    except (TypeError, ValueError):
        return None


def _elements(t: gs.Tensor) -> int:
    if getattr(t, "type", "tensor_type") != "tensor_type":  # a sequence/optional on the host: its tensors count where made
        return 0
    s = _shape(t)
    if s is None:
        raise BuildError(f"tensor '{t.name}' has no static shape; compile the model (canonicalize) first")
    return int(math.prod(s))


def attention_spec(node: gs.Node, act_dtype: str, score_dtype: str = "") -> AttentionSpec:
    """AttentionSpec of an Attention / TiledAttention node (``edgefc.attention.spec_from_node``:
    the 3D form [B, S, H*d]; the 4D form [B, H, S, d] is read here too)."""
    try:
        return spec_from_node(node, act_dtype, score_dtype)
    except ValueError as e:
        shapes = [_shape(t) for t in node.inputs[:3]]
        causal = bool(int(node.attrs.get("is_causal", 0) or 0))
        heads = int(node.attrs.get("q_num_heads", 0) or 0)
        if len(shapes) == 3 and all(s is not None and len(s) == 4 for s in shapes):
            (b, h, sq, dk), k, v = shapes
            return AttentionSpec(name=node.name, batch=b, heads=h, q_len=sq, kv_len=k[2], head_dim=dk,
                                 v_head_dim=v[3], act_dtype=act_dtype, causal=causal, score_dtype=score_dtype)
        if (len(shapes) == 3 and all(s is not None and len(s) == 3 for s in shapes) and heads > 0
                and shapes[0][2] % heads == 0 and shapes[2][2] % heads == 0):
            # 3D form with a mask input (or another attribute the tiling solver does not take)
            (b, sq, width), k, v = shapes
            return AttentionSpec(name=node.name, batch=b, heads=heads, q_len=sq, kv_len=k[1], head_dim=width // heads,
                                 v_head_dim=v[2] // heads, act_dtype=act_dtype, causal=causal,
                                 score_dtype=score_dtype)
        raise BuildError(f"cannot lower attention '{node.name}': {e}") from None


def lower(graph: gs.Graph, arch: Architecture, precision: str = "as-built",
          schedule: ScheduleSpec | None = None) -> Program:
    """Lower a (canonicalized, fused) graph to a Program for the architecture ``arch`` at ``precision``,
    taking the decisions of the mechanisms of ``schedule`` (``targets/schedule.py``; default:
    ``overlap``, none)."""
    if precision not in PRICINGS:
        raise BuildError(f"unknown precision '{precision}' (choose from {', '.join(PRICINGS)})")
    schedule = schedule or ScheduleSpec("overlap")
    streamed = _Lowering(graph, arch, precision, schedule=schedule)
    prog = streamed.run()
    # Weights that fit in SRAM beside the activations stay there across inferences: loaded once
    # with the model (outside a timed inference, as MLPerf's steady-state latency measures it),
    # not streamed per op. The activations then get the SRAM the weights leave. (Decided on the
    # peak without the schedule's double buffers and prefetched bytes, which give way to it.)
    total_w = prog.weight_bytes
    room = arch.sram.activations
    if arch.resident_weights and 0 < total_w and total_w + streamed.plain_peak <= room:
        kept = _Lowering(graph, arch, precision, resident_weights=total_w, schedule=schedule)
        resident = kept.run()
        if kept.plain_peak + total_w <= room:
            prog = resident
    return _choose_cascades(prog, arch)


def _choose_cascades(prog: Program, arch: Architecture) -> Program:
    """Keep a cascade pipelined (``pipelined-cascades``) only where that is faster: its doubled
    stripes re-fetch the weights that exceed the weight buffer once more per stripe, which can cost
    more DMA than overlapping its engines saves. Each cascade is priced both ways by the cost model
    (as the overlapped schedule times it: the stripe pipeline against its ops one after another, each
    ``max(latency + compute, transfers)``); a cascade left unpipelined gets its stripes back."""
    from edgefc.targets.cost_model import command_cycles, overlapped_op_cycles, pipelined_cascade

    chains: dict[int, list[Command]] = {}
    for c in prog.commands:
        if c.cascade >= 0:
            chains.setdefault(c.cascade, []).append(c)
    for cmds in chains.values():
        cyc = [command_cycles(arch, c) for c in cmds]
        path, _ = pipelined_cascade(arch, cmds, cyc)
        dma = [x for c, x in zip(cmds, cyc) if c.kind in ("load", "store")]
        piped = max(path + (arch.dma.latency_cycles if dma else 0.0), sum(dma))
        plain_cmds = [_unpiped(c) for c in cmds]
        plain = 0.0
        for op in dict.fromkeys(c.op for c in plain_cmds):
            own = [c for c in plain_cmds if c.op == op]
            plain += max(overlapped_op_cycles(arch, own, [command_cycles(arch, c) for c in own]))
        if plain <= piped:
            for c, u in zip(cmds, plain_cmds):
                c.cascade, c.stripes, c.repeat = -1, 0, u.repeat
    return prog


def _unpiped(c: Command) -> Command:
    """A cascade's command as it runs unpipelined: weights re-fetched per stripe on half the stripes."""
    from dataclasses import replace

    repeat = c.repeat // 2 if c.tensor.endswith(":weights") and c.repeat > 1 and c.repeat == c.stripes else c.repeat
    return replace(c, cascade=-1, stripes=0, repeat=max(1, repeat))


_NEVER = 1 << 62


class _Lowering:
    """One pass over the nodes in order, emitting commands and deciding residency."""

    def __init__(self, graph: gs.Graph, arch: Architecture, precision: str, resident_weights: int = 0,
                 schedule: ScheduleSpec | None = None):
        self.graph, self.arch, self.precision = graph, arch, precision
        self.schedule = schedule or ScheduleSpec("overlap")
        self.resident_weights = int(resident_weights)
        self.types = DeployedTypes(graph, precision)
        self.prog = Program(precision=precision, component=component_of(graph), schedule=self.schedule.name)
        self.budget = arch.sram.activations - self.resident_weights
        self.loops = 0
        self.io: dict[str, tuple[int, int]] = {}   # alias root -> (DRAM bytes, run) of attention operands
        self.size: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self.graph_outputs = frozenset(t.name for t in graph.outputs)

    def nm(self, node: gs.Node) -> str:
        """The node's name in the Program (``placement.node_names``)."""
        return self._names.get(id(node), node.name)

    def classify(self, node: gs.Node, name: str) -> str:
        """The node's kind (``edgefc.targets.placement.place``), recorded in the Program."""
        kind, reason = place(node, self.types, self.arch.tensor.dtypes, self.arch.ops, self.graph_outputs)
        if kind == "attention":
            try:  # an attention the NPU block does not take (grouped heads, past key/value): the host runs it
                attention_spec(node, "fp16")
            except BuildError as e:
                kind, reason = "host", f"an attention the NPU block does not take ({e})"
        self.prog.placement[name] = "tensor" if kind == "attention" else kind
        if reason:
            self.prog.host_reasons[name] = reason
        return kind

    def nbytes(self, t: gs.Tensor) -> int:
        r = self.types.find(t.name)
        if r in self.io:
            return self.io[r][0]
        return _elements(t) * BYTES[self.types.of(t)]

    def _dma(self, kind: str, node: gs.Node, r: str, spill: bool, ahead: int = 0) -> None:
        self.prog.emit(Command(kind, self.nm(node), node.op, tensor=r, bytes=int(self.size[r]), spill=spill,
                               ahead=int(ahead)))

    def run(self) -> Program:
        graph, types, prog = self.graph, self.types, self.prog
        nodes = list(graph.nodes)
        names = node_names(nodes)
        self._names = {id(n): name for n, name in zip(nodes, names)}
        kinds = [self.classify(n, name) for n, name in zip(nodes, names)]
        specs: dict[str, AttentionSpec] = {}
        for n, kind in zip(nodes, kinds):
            if kind == "attention":
                spec = attention_spec(n, *types.attention_types(n))
                specs[self.nm(n)] = spec
                io = attention_io_bytes(spec, self.arch, packed=self.schedule.has("packed-operands"))
                for key, t in zip(("q", "k", "v", "out"), list(n.inputs[:3]) + [n.outputs[0]]):
                    self.io[types.find(t.name)] = (io[key][0], 0)
        pinned = set(self.io)
        uses: dict[str, list[int]] = {}
        for i, (n, kind) in enumerate(zip(nodes, kinds)):
            if kind != "none":
                for t in reads(n):
                    if t is not None and t.name and not types.is_const(t):
                        uses.setdefault(types.find(t.name), []).append(i)
        graph_in = {types.find(t.name) for t in graph.inputs}
        graph_out = {types.find(t.name) for t in graph.outputs}

        def next_use(r: str, i: int) -> int:
            for u in uses.get(r, ()):
                if u >= i:
                    return u
            return _NEVER

        resident: dict[str, int] = {}
        cascaded: set[str] = set()
        in_dram: set[str] = set(graph_in)
        why = prog.reasons
        for r in graph_in:
            why[r] = "graph input"
        peak = plain = 0   # plain: the peak without the double buffers and prefetches of the schedule
        # prefetch (targets/schedule.py): what the previous op leaves free while it runs -- the
        # activation SRAM beside its working set, and the weight buffer beside its weights
        prefetch = self.schedule.has("prefetch") and not self.resident_weights
        prev_ws, prev_wb_held = self.budget, self.arch.sram.weight_buffer
        # pipelined cascades: the id of the cascade the previous op ran in (-1: none)
        chain, chains = -1, 0
        for i, (node, kind) in enumerate(zip(nodes, kinds)):
            if kind == "none":
                continue
            prog.ops.append(info := OpInfo(self.nm(node), node.op, "tensor" if kind == "attention" else kind,
                                           block_of(self.nm(node))))
            act_in: list[str] = []
            for t in reads(node):
                if t is not None and t.name and not types.is_const(t):
                    r = types.find(t.name)
                    if r not in act_in:
                        act_in.append(r)
                        self.size.setdefault(r, self.nbytes(t))
            outs: list[str] = []
            for t in node.outputs:
                if t is not None and t.name:
                    r = types.find(t.name)
                    outs.append(r)
                    self.size.setdefault(r, self.nbytes(t))
            for r in [r for r in resident if next_use(r, i) == _NEVER]:
                del resident[r]

            if kind in ("host", "attention"):
                # the host and the attention block read their inputs from DRAM, write outputs there
                for r in act_in:
                    if r not in in_dram:
                        self._dma("store", node, r, spill=r not in pinned)
                        in_dram.add(r)
                    why.setdefault(r, f"read from DRAM by {'the host' if kind == 'host' else 'attention'} op {self.nm(node)}")
                    resident.pop(r, None)
                if kind == "host" and node.op in CONTROL_FLOW:
                    # the host drives it; its body's commands are priced (targets/control_flow.py)
                    cmds, note = control_flow_commands(node, self.nm(node), self.arch, self.precision, lower)
                    prog.commands.extend(dataclasses.replace(c, loop=-1) for c in cmds)
                    prog.host_reasons[self.nm(node)] = note
                elif kind == "host":
                    prog.emit(Command("host", self.nm(node), node.op,
                                      elements=sum(_elements(t) for t in node.outputs if t is not None and t.name)))
                else:
                    spec, tiling = specs[self.nm(node)], tiling_from_node(node)
                    built_g = granularity_from_node(node)
                    info.attention = (spec, tiling)
                    limit = self.arch.sram.attention
                    pipe = self.schedule.has("pipelined-mlt") and pipelines(spec, tiling, self.arch, built_g)
                    need = min(attention_sram_bytes(spec, tiling, self.arch, built_g, pipe), limit)
                    # the block's tiles take the SRAM they need: evict what is live, furthest use first
                    for r in sorted(resident, key=lambda r: -next_use(r, i)):
                        if sum(resident.values()) + need <= limit:
                            break
                        if r not in in_dram:
                            self._dma("store", node, r, spill=True)
                            in_dram.add(r)
                        why.setdefault(r, f"evicted for {self.nm(node)} (its tiles need the SRAM)")
                        del resident[r]
                    for r in act_in[3:]:   # a mask input: read once from DRAM
                        self._dma("load", node, r, spill=False)
                    prog.commands.extend(lower_attention(spec, tiling, self.arch, granularity=built_g, op=self.nm(node), op_type=node.op,
                                                         loop_base=self.loops, pipelined=pipe,
                                                         packed=self.schedule.has("packed-operands")))
                    self.loops += 1 << 20
                    peak = max(peak, sum(resident.values()) + need)
                    plain = max(plain, sum(resident.values())
                                + min(attention_sram_bytes(spec, tiling, self.arch, built_g), limit))
                chain = -1
                if kind == "host":   # the NPU's SRAM is idle while the host runs
                    prev_ws, prev_wb_held = sum(resident.values()), 0
                else:                # the block's tiles may take the weight buffer too
                    prev_ws = self.budget
                    prev_wb_held = self.arch.sram.weight_buffer - max(
                        0, min(self.arch.sram.weight_buffer, limit - sum(resident.values()) - need))
                in_dram.update(outs)
                for r in outs:
                    why.setdefault(r, f"written to DRAM by {'the host' if kind == 'host' else 'attention'} op "
                                      f"{self.nm(node)}")
                continue

            if (self.schedule.has("concat-in-place") and self.concat_view(node, act_in, outs, i, next_use)
                    and not any(r in cascaded or r in pinned or r in graph_out for r in act_in + outs)):
                # concat-in-place: the operands are the output's slices. In SRAM when they all are
                # and the output fits where they were; else each operand still on chip is stored into
                # its slice of the output in DRAM (one already there was placed at its slice when
                # stored). No copy: the Concat's own command moves no element.
                (out,) = outs
                others = sum(v for r, v in resident.items() if r not in act_in)
                if all(r in resident for r in act_in) and others + self.size[out] <= self.budget:
                    for r in act_in:
                        del resident[r]
                    resident[out] = self.size[out]
                else:
                    for r in act_in:
                        if r not in in_dram:
                            self._dma("store", node, r, spill=True)
                            in_dram.add(r)
                        resident.pop(r, None)
                    in_dram.add(out)
                    why[out] = (f"a Concat in place ({self.nm(node)}): its operands are stored into their slices "
                                f"of it in DRAM (they do not fit SRAM together)")
                # the view's own command moves no element (it records that the op is a view)
                prog.emit(Command("vector", self.nm(node), node.op, elements=0,
                                  passes=self.arch.vector.passes["copy"], elem_bytes=min(BYTES[self.types.of(node.outputs[0])], 4)))
                prev_ws, prev_wb_held = min(self.budget, sum(resident.values())), 0
                chain = -1
                continue

            first_cmd = len(prog.commands)
            operands = list(dict.fromkeys(act_in + outs))   # ordered: ties break the same way every run
            streamed: set[str] = {r for r in act_in if r in cascaded}

            def working_set(operands=operands, streamed=streamed) -> int:
                return (sum(s for r, s in resident.items() if r not in operands)
                        + sum(self.size[r] for r in operands if r not in streamed))

            if working_set() > self.budget:
                for r in sorted((r for r in resident if r not in operands), key=lambda r: -next_use(r, i)):
                    if r not in in_dram:
                        self._dma("store", node, r, spill=True)
                        in_dram.add(r)
                    why.setdefault(r, f"evicted for {self.nm(node)} (SRAM full; its next use is the furthest)")
                    del resident[r]
                    if working_set() <= self.budget:
                        break
                for r in sorted(operands, key=lambda r: (-self.size[r], r)):
                    if working_set() <= self.budget:
                        break
                    streamed.add(r)
            room = self.budget - prev_ws if prefetch else 0
            for r in act_in:
                if r in cascaded:
                    continue
                if r not in resident:
                    # prefetch: a whole input that fits beside the previous op's working set is
                    # loaded while that op runs (it is then resident from there on)
                    ahead = self.size[r] if r not in streamed and 0 < self.size[r] <= room else 0
                    room -= ahead
                    self._dma("load", node, r, spill=r not in pinned and r not in graph_in, ahead=ahead)
                    in_dram.add(r)
                    if r not in streamed:
                        resident[r] = self.size[r]
            if prefetch:
                peak = max(peak, prev_ws + (self.budget - prev_ws - room))
            keep = pinned | graph_out
            casc_out = [r for r in outs if r in streamed and self.can_stream(r, i, node, nodes, kinds, uses, keep)]
            # a cascade runs in row stripes: as many as its cascaded operands need to pass through
            # the activation SRAM; pipelined across the engines (pipelined-cascades), every stripe
            # buffer is double-buffered, so twice as many
            stripe = sum(self.size[r] for r in act_in if r in cascaded) + sum(self.size[r] for r in casc_out)
            stripes = max(1, -(-stripe // max(self.budget, 1)))
            if stripe and self.schedule.has("pipelined-cascades"):
                stripes *= 2
                if not (chain >= 0 and any(r in cascaded for r in act_in)):
                    chain, chains = chains, chains + 1
            else:
                chain = -1
            wbytes = self.weight_bytes(node)
            prog.weight_bytes += wbytes
            if wbytes and not self.resident_weights:
                # in a cascade the op runs once per row stripe; weights that do not stay in the
                # weight buffer are fetched again for every stripe
                tiles = stripes if wbytes > self.arch.sram.weight_buffer else 1
                # prefetch: as much of the weights as the weight buffer has room for beside the
                # previous op's weights, and beyond that as the activation SRAM has room for both
                # beside the previous op's working set and beside this op's, moves while the
                # previous op runs
                extra = 0
                ahead = 0
                if prefetch:
                    ahead = min(wbytes, max(0, self.arch.sram.weight_buffer - prev_wb_held))
                    if tiles == 1:
                        extra = max(0, min(wbytes - ahead, room, self.budget - working_set()))
                    room -= extra
                prog.emit(Command("load", self.nm(node), node.op, tensor=f"{self.nm(node)}:weights", bytes=wbytes,
                                  repeat=int(tiles), ahead=int(ahead + extra)))
                if extra:
                    peak = max(peak, prev_ws + (self.budget - prev_ws - room))
            else:
                extra = 0
            prog.emit(self.tensor_command(node) if kind == "tensor" else self.vector_command(node))
            peak = max(peak, working_set() + extra
                       + (0 if self.resident_weights else min(wbytes, self.arch.sram.weight_buffer)))
            plain = max(plain, working_set() + (0 if self.resident_weights else min(wbytes, self.arch.sram.weight_buffer)))
            if chain >= 0:
                for c in prog.commands[first_cmd:]:
                    c.cascade, c.stripes = chain, stripes
            prev_ws = min(self.budget, working_set())
            prev_wb_held = 0 if self.resident_weights else min(wbytes, self.arch.sram.weight_buffer)
            for r in act_in:
                if r in streamed:
                    resident.pop(r, None)
            for r in outs:
                if r in casc_out:
                    cascaded.add(r)
                    why[r] = (f"too big for SRAM: kept on chip in row stripes from {self.nm(node)} to "
                              f"{self.nm(nodes[uses[r][-1]])}")
                    continue
                if r in streamed or r in pinned or r in graph_out:
                    self._dma("store", node, r, spill=r in streamed and r not in pinned and r not in graph_out)
                    in_dram.add(r)
                    why.setdefault(r, "graph output" if r in graph_out else "attention operand (read from DRAM)"
                                   if r in pinned else f"does not fit SRAM with the other operands of {self.nm(node)}")
                if r not in streamed and r not in pinned and next_use(r, i + 1) != _NEVER:
                    resident[r] = self.size[r]
                    if r not in graph_out:
                        in_dram.discard(r)

        for r in self.size:
            prog.residency[r] = "stream" if r in cascaded else "dram" if r in in_dram else "sram"
            if prog.residency[r] == "sram":
                why.pop(r, None)
        prog.tensor_bytes = dict(self.size)
        prog.sram_peak_bytes = int(peak)
        self.plain_peak = int(plain)
        prog.resident_weight_bytes = self.resident_weights
        return prog

    def concat_view(self, node: gs.Node, act_in: list[str], outs: list[str], i: int, next_use) -> bool:
        """Whether a Concat can be a view of its operands (``concat-in-place``): it joins two or
        more distinct activations along its outermost non-unit axis (each operand is then one
        contiguous block of the output), none of them is read after it, and the output is as
        many bytes as they are."""
        if node.op != "Concat" or len(outs) != 1 or len(act_in) < 2 or len(act_in) != len(node.inputs):
            return False
        shape = _shape(node.outputs[0])
        if shape is None:
            return False
        axis = int(node.attrs.get("axis", 0)) % len(shape)
        if any(d != 1 for d in shape[:axis]):
            return False
        if any(next_use(r, i + 1) != _NEVER for r in act_in):
            return False
        return sum(self.size[r] for r in act_in) == self.size[outs[0]]

    def can_stream(self, r: str, i: int, node: gs.Node, nodes, kinds, uses, keep: set[str]) -> bool:
        """Whether output ``r`` of node ``i`` (too big for SRAM) stays on chip in a spatial cascade:
        every op from the producer to the last use of ``r`` reads its activations row by row (a
        convolution, a matmul with constant weights, an elementwise op or activation), and each use
        reads ``r`` as such an activation (not as weights). The cascade then runs in row stripes
        (Vela's cascading): only a stripe of ``r`` is ever in SRAM, and it never goes to DRAM."""
        if r in keep or node.op not in STREAM_PRODUCERS or not uses.get(r):
            return False
        if not self.arch.cascade and (len(uses[r]) != 1 or any(kinds[k] != "none" for k in range(i + 1, uses[r][0]))):
            return False   # without cascades: a two-op hand-off to the very next op only
        last = uses[r][-1]
        for k in range(i + 1, last + 1):
            if kinds[k] == "none":
                continue
            if kinds[k] not in ("tensor", "vector") or nodes[k].op not in STREAM_CONSUMERS:
                return False
        for j in uses[r]:
            consumer = nodes[j]
            if consumer.op in TENSOR_OPS:
                ins = [self.types.find(t.name) if t is not None and t.name else "" for t in consumer.inputs]
                # the weights (or a matmul's second operand) are needed whole; the activation
                # input and a fused residual are read row by row
                if len(ins) > 1 and ins[1] == r:
                    return False
        return True

    # weights ----------------------------------------------------------------------------------
    def weight_bytes(self, node: gs.Node) -> int:
        """Bytes of the node's compile-time inputs at their deployed types (biases INT32 in W8A16;
        vector-op parameters at activation width)."""
        total = 0
        types = self.types
        for idx, t in enumerate(node.inputs):
            if t is None or not t.name or not types.is_const(t):
                continue
            shape = _shape(t)
            n = int(math.prod(shape)) if shape is not None else 1
            if node.op in TENSOR_OPS and idx == 2:
                code = types.bias(node, t)
            elif node.op in TENSOR_OPS:
                code = types.of(t)
            else:
                code = types.of(t)
                if self.precision == "w8a16" and code == "int8":
                    code = "int16"
            total += n * BYTES[code]
        return total

    # compute commands -------------------------------------------------------------------------
    def tensor_command(self, node: gs.Node) -> Command:
        """MACs, padded MACs (rows to the row granularity, input and output channels to the
        channel granularity) and the output elements of a convolution or matmul."""
        g, rg = self.arch.tensor.channel_granularity, self.arch.tensor.row_granularity
        types = self.types
        x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
        xs, ws_, ys = _shape(x), _shape(w), _shape(y)
        if xs is None or ws_ is None or ys is None:
            raise BuildError(f"'{self.nm(node)}' ({node.op}) has operands without static shapes")
        if node.op in ("Conv", "FusedConv", "ConvTranspose"):
            grp = int(node.attrs.get("group", 1))
            k = int(math.prod(ws_[2:])) if len(ws_) > 2 else 1
            if node.op == "ConvTranspose":
                rows = xs[0] * int(math.prod(xs[2:]))
                cin_g, cout_g = xs[1] // grp, ws_[1]
            else:
                rows = ys[0] * int(math.prod(ys[2:]))
                cin_g, cout_g = ws_[1], ys[1] // grp
            macs = grp * rows * cin_g * k * cout_g
            padded = grp * pad(rows, rg) * contraction(cin_g, k, g) * pad(cout_g, g)
            if cin_g == 1 and cout_g == 1 and grp > 1:
                # depthwise: the channels take the output lanes, the kernel taps the contraction
                padded = pad(rows, rg) * pad(k, g) * pad(grp, g)
        else:  # MatMul / FusedMatMul / Gemm
            if node.op == "Gemm":
                m, kk = (xs[1], xs[0]) if node.attrs.get("transA", 0) else (xs[0], xs[1])
                n = ws_[0] if node.attrs.get("transB", 0) else ws_[1]
                batch = 1
            else:
                xs2 = (1,) + tuple(xs) if len(xs) == 1 else tuple(xs)
                ws2 = tuple(ws_) + (1,) if len(ws_) == 1 else tuple(ws_)
                m, kk, n = xs2[-2], xs2[-1], ws2[-1]
                batch = int(math.prod(ys[:-2])) if len(ys) > 2 else 1
            macs = batch * m * kk * n
            padded = batch * pad(m, rg) * pad(kk, g) * pad(n, g)
        return Command("tensor", self.nm(node), node.op, macs=int(macs), padded_macs=int(padded),
                       out_elements=_elements(y), precision=types.rate_key(node), dispatches=1)

    def vector_command(self, node: gs.Node) -> Command:
        if node.op in INPUT_SIZED:
            elements = _elements(node.inputs[0])
        else:
            elements = sum(_elements(t) for t in node.outputs if t is not None and t.name)
        x = node.inputs[0] if node.op in INPUT_SIZED or not node.outputs else node.outputs[0]
        width = min(BYTES[self.types.of(x)], 4)
        return Command("vector", self.nm(node), node.op, elements=int(elements),
                       passes=vector_passes(node, self.arch.vector.passes), dispatches=1, elem_bytes=width)
