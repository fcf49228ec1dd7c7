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
        one = vector_cycles(a, c.elements, c.passes, c.handoffs, c.elem_bytes)
    elif c.kind == "host":
        one = host_cycles(a, c.elements)
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
    command (non-zero only after an op's last command), and the makespan."""

    starts: list[float]
    idle: list[float]
    total: float
    hidden: list[float] = None   # per command: cycles that ran beside other commands of its op

    def __post_init__(self):
        if self.hidden is None:
            self.hidden = [0.0] * len(self.starts)


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
        return Timeline(starts, idle, t)


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
    dispatch time; ops run one after another. The default schedule (PERFORMANCE.md)."""

    name = "overlap"

    def run(self, program, cycles, arch):
        starts, idle, t = [0.0] * len(cycles), [0.0] * len(cycles), 0.0
        hidden = [0.0] * len(cycles)
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
            t += max(work, floor)
        return Timeline(starts, idle, t, hidden)


SCHEDULES = {"overlap": OverlapSchedule, "sequential": SequentialSchedule}
