"""Control flow priced by its bodies: ``If``, ``Loop`` and ``Scan`` in the Program (issue 22).

The NPU runs straight-line programs; the host drives control flow. A control-flow node stays one
op of the Program, placed on the host (``placement``: no NPU kernel for it), and its commands are:

* one host round trip per decision the host takes (``host.sync_cycles``): an ``If``'s condition,
  each iteration's condition of a ``Loop`` whose body computes it; none for a ``Scan`` (a fixed
  number of iterations);
* then the commands of the body it runs, lowered like any graph (each body op on the engine
  placement gives it, its weights and activations by DMA):

  - ``If``: the branch it takes when the condition is a compile-time constant; otherwise the
    dearer of the two (priced by the cost model), and the Program says so;
  - ``Loop``: the body once per iteration, the trip count a compile-time constant (``M``); when
    only the body's condition ends it, one iteration, and the Program says so;
  - ``Scan``: the body once per element along the scan axis of its first scan input.

:func:`control_flow_commands` gives the commands and the note (``Program.host_reasons``, shown
by ``edgefc profile`` under its table). A body whose shapes are not static is priced as one host
op, and the note says why.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.errors import BuildError
from edgefc.targets.cost_model import op_cycles, op_groups
from edgefc.targets.program import Command

CONTROL_FLOW = ("If", "Loop", "Scan")


def _priced(arch, program) -> float:
    return float(sum(op_cycles(arch, program.commands[a:b]) for a, b in op_groups(program)))


def _ms(arch, cycles: float) -> str:
    return f"{cycles / arch.clock_hz * 1e3:.3g} ms"


def _constant(t) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def outer_reads(node: gs.Node) -> list[gs.Tensor]:
    """The tensors of the enclosing graph the bodies of ``node`` read by name (ONNX's implicit
    inputs of If / Loop / Scan: not its inputs, not made inside the bodies)."""
    out, seen = [], set()
    for sub in (v for v in node.attrs.values() if isinstance(v, gs.Graph)):
        inner = {t.name for t in sub.inputs}
        for g in [sub, *sub.subgraphs(recursive=True)]:
            inner |= {t.name for n in g.nodes for t in n.outputs} | {t.name for t in g.inputs}
        for g in [sub, *sub.subgraphs(recursive=True)]:
            for n in g.nodes:
                for t in n.inputs:
                    if t is not None and t.name and t.name not in inner and t.name not in seen:
                        seen.add(t.name)
                        out.append(t)
    return out


def reads(node: gs.Node) -> list[gs.Tensor]:
    """Everything ``node`` reads: its inputs, and for a control-flow node what its bodies read of
    the enclosing graph (:func:`outer_reads`)."""
    extra = outer_reads(node) if any(isinstance(v, gs.Graph) for v in node.attrs.values()) else []
    return list(node.inputs) + [t for t in extra if t not in node.inputs]


def control_flow_commands(node: gs.Node, name: str, arch, precision: str, lower) -> tuple[list[Command], str]:
    """(commands, note) of control-flow ``node`` (named ``name`` in the Program); ``lower(graph,
    arch, precision)`` lowers a body (the lowering's own entry point)."""
    op = node.op

    def body(graph: gs.Graph):
        try:
            return lower(graph, arch, precision)
        except BuildError as e:
            return str(e)

    sync = Command("host", name, op)   # one host round trip (the decision), no elements
    if op == "If":
        branches = {k: node.attrs[k] for k in ("then_branch", "else_branch")}
        cond = _constant(node.inputs[0])
        if cond is not None and cond.size == 1:
            taken = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
            prog = body(branches[taken])
            if isinstance(prog, str):
                return [sync], f"If: its {taken} has no static shapes ({prog}); priced as one host op"
            return [sync, *_renamed(prog, name, 1)], f"If: priced by the branch it takes, {taken} (the condition is a constant)"
        progs = {k: body(g) for k, g in branches.items()}
        bad = [k for k, p in progs.items() if isinstance(p, str)]
        if bad:
            return [sync], f"If: its {bad[0]} has no static shapes ({progs[bad[0]]}); priced as one host op"
        cost = {k: _priced(arch, p) for k, p in progs.items()}
        dear = max(cost, key=cost.get)
        other = "else_branch" if dear == "then_branch" else "then_branch"
        return [sync, *_renamed(progs[dear], name, 1)], (
            f"If: priced by its dearer branch, {dear} ({_ms(arch, cost[dear])}; {other} {_ms(arch, cost[other])}): "
            f"the condition is known only at run time")
    graph = node.attrs["body"]
    prog = body(graph)
    if isinstance(prog, str):
        return [sync], f"{op}: its body has no static shapes ({prog}); priced as one host op"
    if op == "Loop":
        trips = _constant(node.inputs[0]) if node.inputs and node.inputs[0].name else None
        cond_out = graph.outputs[0] if graph.outputs else None
        cond_fixed = cond_out is not None and isinstance(cond_out, gs.Constant) and bool(np.asarray(cond_out.values).all())
        if trips is not None and trips.size == 1 and int(trips.reshape(-1)[0]) >= 0:
            n = int(trips.reshape(-1)[0])
            decisions = [] if cond_fixed else [dataclasses.replace(sync, repeat=max(n, 1))]
            return [*decisions, *_renamed(prog, name, n)], (
                f"Loop: priced as {n} iterations of its body (the trip count is a constant)"
                + ("" if cond_fixed else "; the host checks the body's condition every iteration"))
        return [sync, *_renamed(prog, name, 1)], ("Loop: the trip count is known only at run time; priced as one "
                                                  "iteration of its body")
    # Scan: iterations along the scan axis of the first scan input
    n_scan = int(node.attrs.get("num_scan_inputs", 1))
    first = node.inputs[len(node.inputs) - n_scan] if n_scan else None
    axes = list(node.attrs.get("scan_input_axes", [0] * n_scan))
    shape = first.shape if first is not None else None
    try:
        n = int(shape[axes[0] % len(shape)])
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return [*_renamed(prog, name, 1)], "Scan: its scan length is known only at run time; priced as one iteration"
    return _renamed(prog, name, n), f"Scan: priced as {n} iterations of its body (the scan axis length)"


def _renamed(program, name: str, times: int) -> list[Command]:
    """The body's commands as commands of the control-flow op ``name``, each ``times`` over
    (launches charged once per body op, as for any repeated command)."""
    return [dataclasses.replace(c, op=name, repeat=c.repeat * max(times, 0)) for c in program.commands]
