"""The cost model: cycles per Program command from the target's numbers alone (PERFORMANCE.md).
Every formula takes the frozen :class:`~edgefc.targets.description.Architecture` and reads its
typed sections.

One formula per command kind, shared by every op (no per-op or per-table-row constants):

* DMA (``load``/``store``), per instance::

      cycles = dma.latency_cycles + bus_bytes / (dma.bandwidth_bytes_per_s * dma.efficiency / clock.hz)
      bus_bytes = bytes * dma.burst_bytes / min(run_bytes, dma.burst_bytes)

  (a transfer made of runs shorter than a DRAM burst wastes the rest of each burst, as in Arm
  Vela's memory-transfer efficiency);
* tensor engine, per instance::

      cycles = padded_macs / (tensor.macs_per_cycle * tensor.rate[precision] * tensor.efficiency)
               + out_elements / tensor.output_elements_per_cycle + handoffs * handoff.cycles

* vector engine, per instance::

      cycles = elements * sum(passes_c * vector.cycles_per_element[c]) / vector.lanes
               + handoffs * handoff.cycles

  (INT8 elements: ``vector.int8.elements_per_lane`` per lane, exp / divide at
  ``vector.int8.exp`` / ``vector.int8.divide``: 256-entry table lookups);

* host: ``host.sync_cycles + elements * host.cycles_per_element``.

A command costs ``repeat`` times one instance. Launching an op takes ``dispatch.cycles``
(``Command.dispatches``: 1 on the op's first engine command; a fused attention is one op); the
command processor prepares the next op while the current one runs, so an op occupies the NPU for
at least its dispatch time:

    op cycles = max(sum of its commands' cycles, dispatch.cycles * its dispatches)

The schedule that turns command cycles into a timeline is pluggable (:class:`Schedule`). The
default, ``overlap`` (:class:`OverlapSchedule`), runs an op's DMA beside its compute; ops run one
after another. ``sequential`` (:class:`SequentialSchedule`) runs every command one after another,
each op followed by the part of its dispatch its own work did not hide.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefc.errors import TargetError
from edgefc.targets.description import Architecture
from edgefc.targets.program import Command, Program

# --- one formula per command kind ------------------------------------------------------------

def dma_cycles(a: Architecture, nbytes: float, run_bytes: float = 0) -> float:
    """One DMA transfer of ``nbytes`` made of contiguous runs of ``run_bytes`` (0: one block)."""
    if nbytes <= 0:
        return 0.0
    run = nbytes if run_bytes <= 0 else min(run_bytes, nbytes)
    bus_bytes = nbytes * a.dma.burst_bytes / min(run, a.dma.burst_bytes)
    return a.dma.latency_cycles + bus_bytes / a.dma.bytes_per_cycle


def tensor_cycles(a: Architecture, padded_macs: float, out_elements: float, precision: str,
                  handoffs: int = 0) -> float:
    """One tensor-engine op: padded MACs at the precision's rate, then the output write-back."""
    t = a.tensor
    try:
        rate = t.rate[precision]
    except KeyError:
        raise TargetError(f"the target has no tensor.rate for precision '{precision}'") from None
    return (padded_macs / (t.macs_per_cycle * rate * t.efficiency)
            + out_elements / t.output_elements_per_cycle + handoffs * a.handoff.cycles)


def vector_cycles(a: Architecture, elements: float, passes, handoffs: int = 0, elem_bytes: int = 2) -> float:
    """One vector-engine op: element passes per op class over ``vector.lanes`` lanes. INT8
    elements take the INT8 path: ``vector.int8.elements_per_lane`` per lane, and the
    exponential and division by a table lookup (``vector.int8.exp`` / ``.divide``)."""
    v = a.vector
    if elem_bytes == 1:
        per_element = sum(n * v.int8_cycles_per_element[c] for c, n in passes) / v.int8_elements_per_lane
    else:
        per_element = sum(n * v.cycles_per_element[c] for c, n in passes)
    return elements * per_element / v.lanes + handoffs * a.handoff.cycles


def vector_command_cycles(a: Architecture, c: Command, handoffs: bool = True) -> float:
    """One instance of a vector command: its passes over ``elements`` at ``elem_bytes``, its
    ``lut_passes`` over the same elements on the INT8 path, its ``post_passes`` over
    ``post_elements`` (a deferred-normalisation softmax: the 16-bit row max and subtraction, the
    table-lookup exponential and 8-bit row sum, then the division of the output tile), and, with
    ``handoffs``, its hand-offs."""
    return (vector_cycles(a, c.elements, c.passes, c.handoffs if handoffs else 0, c.elem_bytes)
            + (vector_cycles(a, c.elements, c.lut_passes, 0, 1) if c.lut_passes else 0.0)
            + (vector_cycles(a, c.post_elements, c.post_passes, 0, 2) if c.post_passes else 0.0))


def host_cycles(a: Architecture, elements: float) -> float:
    """One op run by the host CPU (NPU cycles): a synchronisation plus per-element work."""
    return a.host.sync_cycles + elements * a.host.cycles_per_element


def command_cycles(a: Architecture, c: Command) -> float:
    """Cycles of a whole command (all ``repeat`` instances; dispatch is charged per op, see
    :func:`op_cycles`)."""
    if c.kind in ("load", "store"):
        one = dma_cycles(a, c.bytes, c.run_bytes)
    elif c.kind == "tensor":
        one = tensor_cycles(a, c.padded_macs, c.out_elements, c.precision, c.handoffs)
    elif c.kind == "vector":
        one = vector_command_cycles(a, c)
    elif c.kind == "host":
        one = host_cycles(a, c.elements)
    else:
        raise ValueError(f"unknown command kind {c.kind!r}")
    return one * c.repeat


def roofline_cycles(a: Architecture, c: Command) -> float:
    """Cycles of a whole command (all instances) on its engine at the engine's peak rate for it
    (PERFORMANCE.md "Roofline"): tensor -- padded MACs at ``tensor.macs_per_cycle *
    tensor.rate[precision]`` (no efficiency, write-back or hand-off); vector -- its element passes
    over ``vector.lanes``, each pass at its class's cycles per element (the INT8 path for 1-byte
    elements; no hand-off); DMA -- its bytes at the peak ``dma.bandwidth_bytes_per_s`` (no
    efficiency, latency or burst waste); host -- its elements at ``host.cycles_per_element`` (no
    synchronisation). Dispatch is not in it."""
    if c.kind in ("load", "store"):
        one = c.bytes / a.dma.peak_bytes_per_cycle
    elif c.kind == "tensor":
        one = c.padded_macs / (a.tensor.macs_per_cycle * a.tensor.rate[c.precision])
    elif c.kind == "vector":
        one = vector_command_cycles(a, c, handoffs=False)
    elif c.kind == "host":
        one = c.elements * a.host.cycles_per_element
    else:
        raise ValueError(f"unknown command kind {c.kind!r}")
    return one * c.repeat


def op_cycles(a: Architecture, commands) -> float:
    """Cycles of one op: its commands back to back, at least its dispatch time."""
    work = sum(command_cycles(a, c) for c in commands)
    return max(work, a.dispatch_cycles * sum(c.dispatches for c in commands))


def op_groups(program: Program) -> list[tuple[int, int]]:
    """``(first, end)`` command index ranges of the ops, in program order (an op's commands are
    contiguous: the lowering emits them while it handles that op)."""
    groups, start = [], 0
    cmds = program.commands
    for i in range(1, len(cmds) + 1):
        if i == len(cmds) or cmds[i].op != cmds[start].op:
            groups.append((start, i))
            start = i
    return groups


# --- schedules ------------------------------------------------------------------------------

@dataclass
class Timeline:
    """A schedule's result: start cycle of every command, the exposed dispatch (idle) after each
    command (non-zero only after an op's last command), and the makespan.

    ``hidden``: per command, cycles that ran beside other commands (an op's time is the sum of its
    commands' cycles less their hidden cycles, plus its idle); ``instances``: command index ->
    start of each of its ``repeat`` instances, where a schedule interleaves them (a pipelined
    attention); ``exposed_dma``: op -> cycles its DMA added to the op's time beyond its compute."""

    starts: list[float]
    idle: list[float]
    total: float
    hidden: list[float] = None
    instances: dict = None
    exposed_dma: dict = None

    def __post_init__(self):
        if self.hidden is None:
            self.hidden = [0.0] * len(self.starts)
        if self.instances is None:
            self.instances = {}
        if self.exposed_dma is None:
            self.exposed_dma = {}


class Schedule:
    """Turns priced commands into a :class:`Timeline`.

    Subclass to model overlap (e.g. a double-buffered schedule running DMA beside compute);
    ``Profile`` and every view only read the timeline.
    """

    name = "schedule"

    def run(self, program: Program, cycles: list[float], arch: Architecture) -> Timeline:
        raise NotImplementedError


class SequentialSchedule(Schedule):
    """Commands execute one after another, as in the paper's baseline measurements; an op shorter
    than its dispatch time leaves the engines idle for the rest of it."""

    name = "sequential"

    def run(self, program, cycles, arch):
        starts, idle, t = [0.0] * len(cycles), [0.0] * len(cycles), 0.0
        exposed: dict[str, float] = {}
        cmds = program.commands
        for first, end in op_groups(program):
            begin = t
            for i in range(first, end):
                starts[i] = t
                t += cycles[i]
            floor = arch.dispatch_cycles * sum(cmds[i].dispatches for i in range(first, end))
            if t - begin < floor:
                idle[end - 1] = floor - (t - begin)
                t = begin + floor
            exposed[cmds[first].op] = sum(cycles[i] for i in range(first, end) if cmds[i].kind in DMA)
        return Timeline(starts, idle, t, exposed_dma=exposed)


def is_chain(cmds) -> bool:
    """Whether an op's commands form a dependent chain that cannot overlap: the steps of an
    attention block (each consumes the previous one's result: QK^T -> S_in spill -> softmax ->
    S_out spill -> S x V; the paper's Table 6 times them one after another) and host ops."""
    return any(c.role or c.kind == "host" for c in cmds)


def overlapped_op_cycles(a: Architecture, cmds, cycles) -> tuple[float, float]:
    """(work cycles, dispatch floor) of one op under the overlapped schedule:

        work = max(exposed latency + compute, transfers)

    compute: the op's tensor / vector commands back to back; transfers: its DMA commands
    (weights, streamed activations, spills, each with its own latency) back to back on the DMA
    engine, running beside the compute through double buffers (the weight buffer, the stripe
    buffers); exposed latency: the first transfer's ``dma.latency_cycles``, which the engines wait
    for (Arm Vela's estimator likewise takes the max of the NPU cycles and the memory-access
    cycles of a pass, with the memory latency added per transfer). A dependent chain
    (:func:`is_chain`) is the sum of its commands."""
    floor = a.dispatch_cycles * sum(c.dispatches for c in cmds)
    if is_chain(cmds):
        return float(sum(cycles)), floor
    compute = transfer = 0.0
    first_latency = None
    for c, cyc in zip(cmds, cycles):
        if c.kind in ("load", "store"):
            transfer += cyc
            if first_latency is None and c.bytes > 0:
                first_latency = a.dma.latency_cycles
        else:
            compute += cyc
    return max((first_latency or 0.0) + compute, transfer), floor


class OverlapSchedule(Schedule):
    """DMA runs beside the engines (double buffering within the SRAM budget): an op lasts
    ``max(compute, transfers) + exposed latency`` (:func:`overlapped_op_cycles`), at least its
    dispatch time; ops run one after another. The schedule the target was fitted under.

    A Program lowered with mechanisms (``targets/schedule.py``) carries their decisions, and
    this schedule carries them out (:meth:`run_ahead`): attention blocks marked ``pipelined`` run
    as a pipeline across the engines (:func:`pipelined_block`), and the ``ahead`` bytes of a load
    move during the previous op, on a DMA engine that runs ahead of the compute engines."""

    name = "overlap"

    def run(self, program, cycles, arch):
        if any(c.ahead or c.pipelined or c.cascade >= 0 for c in program.commands):
            return self.run_ahead(program, cycles, arch)
        starts, idle, t = [0.0] * len(cycles), [0.0] * len(cycles), 0.0
        hidden = [0.0] * len(cycles)
        exposed: dict[str, float] = {}
        cmds = program.commands
        for first, end in op_groups(program):
            group = cmds[first:end]
            work, floor = overlapped_op_cycles(arch, group, cycles[first:end])
            if is_chain(group):
                s = t
                for i in range(first, end):
                    starts[i] = s
                    s += cycles[i]
            else:
                s_dma = t
                s_eng = t + (arch.dma.latency_cycles if any(c.kind in ("load", "store") and c.bytes > 0
                                                        for c in group) else 0.0)
                for i in range(first, end):
                    if cmds[i].kind in ("load", "store"):
                        starts[i] = s_dma
                        s_dma += cycles[i]
                    else:
                        starts[i] = s_eng
                        s_eng += cycles[i]
            if work < floor:
                idle[end - 1] = floor - work
            # the part of the op's command cycles that ran beside others (shown on the op's DMA)
            hidden[end - 1 if is_chain(group) else first] += sum(cycles[first:end]) - work
            compute = sum(x for c, x in zip(group, cycles[first:end]) if c.kind not in DMA)
            exposed[group[0].op] = max(0.0, work - compute)
            t += max(work, floor)
        return Timeline(starts, idle, t, hidden, exposed_dma=exposed)

    def run_ahead(self, program, cycles, a):
        """The overlapped schedule with the Program's mechanism decisions carried out.

        Ops still run one after another on the compute engines (op k starts when op k-1 ends, at
        ``s_k``), but the DMA engine keeps its own clock and works through the transfers in
        program order: the ``ahead`` part of op k's loads starts at ``max(DMA free, s_{k-1})``
        (during op k-1, in the room the lowering found), the rest at ``max(DMA free, s_k)``. Op k's
        compute starts at ``s_k`` when its prefetched bytes are in, else once the first of them
        arrive (``dma.latency_cycles`` after they start), and ``s_k + latency`` when all its
        transfers are its own; it ends at ``max(compute end, its transfers' end)``, at least its
        dispatch time after ``s_k``. A pipelined attention block lasts :func:`pipelined_block`; a
        dependent chain the sum of its commands."""
        cmds = program.commands
        n = len(cmds)
        starts, idle, hidden = [0.0] * n, [0.0] * n, [0.0] * n
        instances: dict[int, list[float]] = {}
        exposed: dict[str, float] = {}
        t = prev_start = dma_free = 0.0
        lat = a.dma.latency_cycles
        for first, end in _units(program):
            group, cyc = cmds[first:end], cycles[first:end]
            floor = a.dispatch_cycles * sum(c.dispatches for c in group)
            s = t
            if any(c.pipelined for c in group):
                # what the op moves before its block (inputs stored, live tensors evicted, a mask
                # read) runs first; then the block's tiles as a pipeline
                u = s
                for i in range(first, end):
                    if not cmds[i].pipelined:
                        starts[i] = u
                        u += cycles[i]
                block = [i for i in range(first, end) if cmds[i].pipelined]
                work, path, rel = pipelined_block(a, [cmds[i] for i in block], [cycles[i] for i in block])
                for k, i in enumerate(block):
                    starts[i] = u + rel[k][0]
                    if len(rel[k]) > 1:
                        instances[i] = [u + x for x in rel[k]]
                work += u - s
                exp = work - path
                dma_free = max(dma_free, s + work)
            elif is_chain(group):
                u = s
                for i in range(first, end):
                    starts[i] = u
                    u += cycles[i]
                work = u - s
                exp = sum(x for c, x in zip(group, cyc) if c.kind in DMA)
                dma_free = max(dma_free, u)
            else:
                if group[0].cascade >= 0:   # a pipelined cascade: its ops' compute as a stripe pipeline
                    compute, shares = pipelined_cascade(a, group, cyc)
                else:
                    compute, shares = sum(x for c, x in zip(group, cyc) if c.kind not in DMA), None
                early = [ahead_cycles(a, c, x) for c, x in zip(group, cyc)]
                ahead_total = sum(early)
                rest_total = sum(x for c, x in zip(group, cyc) if c.kind in DMA) - ahead_total
                own = any(c.kind in DMA and c.bytes > 0 for c in group)
                a_start = a_end = s
                if ahead_total > 0:
                    a_start = max(dma_free, prev_start)
                    a_end = a_start + ahead_total
                    dma_free = a_end
                    c_start = s if a_end <= s else max(s, a_start + lat)
                else:
                    c_start = s + lat if own else s
                r_start = max(dma_free, s)
                r_end = r_start + rest_total
                if rest_total > 0:
                    dma_free = r_end
                u_a, u_r, u_e = a_start, r_start, c_start
                for k, i in enumerate(range(first, end)):
                    c = cmds[i]
                    if c.kind in DMA:
                        if early[k] > 0:
                            starts[i], u_a = u_a, u_a + early[k]
                            if cyc[k] > early[k]:
                                u_r += cyc[k] - early[k]
                        else:
                            starts[i], u_r = u_r, u_r + cyc[k]
                    else:
                        starts[i], u_e = u_e, u_e + cyc[k]
                end_t = max(c_start + compute, r_end if rest_total > 0 else s, a_end)
                work = end_t - s
                exp = max(0.0, work - compute)
                if shares is not None:   # each op of the cascade gets its share of the span
                    ops = list(dict.fromkeys(c.op for c in group))
                    floor = max(floor, 0.0)
                    span = max(work, floor)
                    for op in ops:
                        idx = [i for i in range(first, end) if cmds[i].op == op]
                        hidden[idx[0]] += sum(cycles[i] for i in idx) - span * shares[op]
                        exposed[op] = max(0.0, exp) * shares[op]
                    prev_start = s
                    t = s + span
                    continue
            if work < floor:
                idle[end - 1] = floor - work
            hidden[first] += sum(cyc) - work
            exposed[group[0].op] = max(0.0, exp)
            prev_start = s
            t = s + max(work, floor)
        return Timeline(starts, idle, t, hidden, instances, exposed)


DMA = ("load", "store")


def _units(program: Program) -> list[tuple[int, int]]:
    """The ops, with the consecutive ops of one pipelined cascade joined into one unit."""
    out: list[tuple[int, int]] = []
    cmds = program.commands
    for first, end in op_groups(program):
        c = cmds[first].cascade
        if out and c >= 0 and cmds[out[-1][0]].cascade == c:
            out[-1] = (out[-1][0], end)
        else:
            out.append((first, end))
    return out


def pipelined_cascade(a: Architecture, cmds, cycles) -> tuple[float, dict[str, float]]:
    """``(compute-path cycles, op -> its share of the unit)`` of a cascade whose ops run stripe by
    stripe as a pipeline across the engines (``pipelined-cascades``).

    With ``S`` stripes (the most any of its ops runs in) and ``n`` ops in program order, op j
    works on stripe ``k - j`` in stage k; each engine runs, in a stage, the stripes of its ops
    that are due, ``compute_j / S`` each, and a stage lasts as long as its busiest engine::

        path = sum over stages k = 0 .. S + n - 2 of max over engines e of
               sum over ops j on e with 0 <= k - j < S of compute_j / S

    Where consecutive ops are on different engines, every stripe hands off between them: one
    ``handoff.cycles`` on each side (as an attention tile does). A normalization at the head of
    the cascade computes its statistics (its ``reduce`` passes) over the whole input before its
    first stripe comes out: that part runs before the stages. The cascade's transfers run beside,
    as for one op. The unit's time is shared out among its ops by their compute."""
    ops: list[str] = list(dict.fromkeys(c.op for c in cmds))
    stripes = max(max(c.stripes for c in cmds), 1)
    comp = {op: 0.0 for op in ops}
    engine = {op: "dma" for op in ops}
    prologue = 0.0
    for c, x in zip(cmds, cycles):
        if c.kind not in DMA:
            if c.op == ops[0] and c.kind == "vector" and any(k == "reduce" for k, _ in c.passes):
                cpe = a.vector.int8_cycles_per_element if c.elem_bytes == 1 else a.vector.cycles_per_element
                per = sum(n * cpe[k] for k, n in c.passes)
                stats = x * sum(n * cpe[k] for k, n in c.passes if k == "reduce") / per if per else 0.0
                prologue += stats
                x -= stats
            comp[c.op] += x
            engine[c.op] = c.engine
    eng = [engine[op] for op in ops]
    work = [comp[op] for op in ops]
    for j in range(len(ops) - 1):
        if eng[j] != eng[j + 1] and "dma" not in (eng[j], eng[j + 1]):
            work[j] += stripes * a.handoff.cycles
            work[j + 1] += stripes * a.handoff.cycles
    n = len(ops)
    path = prologue
    for k in range(stripes + n - 1):
        load: dict[str, float] = {}
        for j in range(n):
            if 0 <= k - j < stripes and eng[j] != "dma":
                load[eng[j]] = load.get(eng[j], 0.0) + work[j] / stripes
        path += max(load.values(), default=0.0)
    work[0] += prologue
    total = sum(work)
    return path, ({op: w / total for op, w in zip(ops, work)} if total else {op: 1.0 / n for op in ops})


def block_cycles(a: Architecture, cmds) -> float:
    """Cycles of one attention block's commands as the overlapped schedule times the block: the
    pipeline of :func:`pipelined_block` when its commands are ``pipelined`` (after any transfer the
    op makes first), else their sum (a dependent chain); at least its dispatch time. What the MLT
    solver asks the target for."""
    if not any(c.pipelined for c in cmds):
        return op_cycles(a, cmds)
    block = [c for c in cmds if c.pipelined]
    before = sum(command_cycles(a, c) for c in cmds if not c.pipelined)
    work = before + pipelined_block(a, block, [command_cycles(a, c) for c in block])[0]
    return max(work, a.dispatch_cycles * sum(c.dispatches for c in cmds))


def ahead_cycles(a: Architecture, c: Command, cycles: float) -> float:
    """The cycles of a load's ``ahead`` bytes (its first instance's, moved during the previous op):
    the whole command when all of it moves ahead, else the transfer of those bytes (one latency)."""
    if c.kind != "load" or c.ahead <= 0:
        return 0.0
    if c.ahead >= c.bytes and c.repeat == 1:
        return cycles
    return min(cycles, dma_cycles(a, min(c.ahead, c.bytes), c.run_bytes))


def pipelined_block(a: Architecture, cmds, cycles) -> tuple[float, float, list[list[float]]]:
    """One attention block whose tiles run as a pipeline across the engines (``pipelined-mlt``):
    ``(work cycles, compute-path cycles, per command the start of each instance, relative to the
    block's start)``.

    The tiles run head group by head group (K and V of a group loaded once, before its tiles),
    row tile by row tile. Tile i's QK^T runs in stage i, its softmax in stage i+1, its S x V in
    stage i+2: in stage k the vector engine runs softmax(k-1) while the tensor engine runs QK^T(k)
    then S x V(k-2) (S_in and S_out double-buffered, so the three tiles in flight never share a
    buffer). A stage lasts as long as its slower engine (each engine's hand-offs are its own
    time, so only the critical engine's count)::

        stage_k = max(K stall + QK_k,  V wait) + SV_{k-2}   vs   SM_{k-1}

    where the first tile of a later head group waits for its group's K (loaded once the previous
    group's last QK^T has read the buffer: the K stall), and its S x V for the group's V (loaded
    once the previous group's last S x V is done: the V wait). The Q and output tiles stream
    through double buffers beside the compute; the first K and Q load are exposed before stage 0,
    the last output store after the last stage::

        block = max(K_0 + Q_0 + sum(stage_k) + A_last, all transfers of the block)
    """
    roles = [c.role for c in cmds]
    per = [x / c.repeat for c, x in zip(cmds, cycles)]
    group_loads = [i for i, c in enumerate(cmds) if c.kind == "load" and c.tensor.endswith((":K", ":V"))]
    kv = {cmds[i].tensor.rsplit(":", 1)[1]: i for i in group_loads}
    k_cyc, v_cyc = per[kv["K"]], per[kv["V"]]
    n_groups = cmds[kv["K"]].repeat
    # the per-tile commands: parts of five (Q load, QK^T, softmax, S x V, store A), in order
    body = [i for i in range(len(cmds)) if i not in group_loads]
    parts = [body[j:j + 5] for j in range(0, len(body), 5)]
    for p in parts:
        assert [roles[i] for i in p] == ["load_qk", "qk_matmul", "softmax", "sv_matmul", "store_out"], roles
    # tile sequence: group by group; within a group the row parts in order, each its count
    tiles = []   # (group, part index, instance)
    for g in range(n_groups):
        for pi, p in enumerate(parts):
            count = cmds[p[0]].repeat // n_groups
            for r in range(count):
                tiles.append((g, pi, g * count + r))
    n = len(tiles)
    qk = [per[parts[pi][1]] for _, pi, _ in tiles]
    sm = [per[parts[pi][2]] for _, pi, _ in tiles]
    sv = [per[parts[pi][3]] for _, pi, _ in tiles]
    first_of_group = [i > 0 and tiles[i][0] != tiles[i - 1][0] for i in range(n)]
    rel: list[list[float]] = [[0.0] * c.repeat for c in cmds]
    q0, a_last = per[parts[tiles[0][1]][0]], per[parts[tiles[-1][1]][4]]
    t = k_cyc + q0                     # the first K and Q are in before stage 0
    rel[kv["K"]][0], rel[parts[tiles[0][1]][0]][tiles[0][2]] = 0.0, k_cyc
    rel[kv["V"]][0] = t
    path = 0.0
    for k in range(n + 2):
        kst = k_cyc if k < n and first_of_group[k] else 0.0
        vst = (v_cyc + kst) if k >= 2 and first_of_group[k - 2] else 0.0
        t_qk = kst + qk[k] if k < n else 0.0
        t_tensor = max(t_qk, vst) + (sv[k - 2] if k >= 2 else 0.0)
        t_vector = sm[k - 1] if 1 <= k <= n else 0.0
        stage = max(t_tensor, t_vector)
        path += max((qk[k] if k < n else 0.0) + (sv[k - 2] if k >= 2 else 0.0), t_vector)
        if k < n:
            g, pi, inst = tiles[k]
            rel[parts[pi][1]][inst] = t + kst
            if first_of_group[k]:
                rel[kv["K"]][g] = t
            if k + 1 < n:          # the next Q tile streams in during this stage
                g1, pi1, inst1 = tiles[k + 1]
                rel[parts[pi1][0]][inst1] = t
        if 1 <= k <= n:
            g, pi, inst = tiles[k - 1]
            rel[parts[pi][2]][inst] = t
        if k >= 2:
            g, pi, inst = tiles[k - 2]
            rel[parts[pi][3]][inst] = t + max(t_qk, vst)
            rel[parts[pi][4]][inst] = t + t_tensor
            if first_of_group[k - 2]:
                rel[kv["V"]][g] = t + kst
        t += stage
    total = t + a_last
    transfers = sum(x for c, x in zip(cmds, cycles) if c.kind in DMA)
    return max(total, transfers), path, rel


SCHEDULES = {"overlap": OverlapSchedule, "sequential": SequentialSchedule}
