"""Lowering of a compiled graph to Apache TVM (Relax): NPU programs + host library, built from
the Program (DESIGN.md "TVM lowering").

``edgefc compile ... --emit tvm`` calls :func:`emit_tvm` from the target's ``write_artifacts``
step, with the Program the profile priced. The steps, in order:

1. **Import** (``tvm_import``): the compiled ONNX graph -> Relax ``main``, with converters of ours
   for Attention-23, TiledAttention (its tiles are ``edgefc.attention.tile_grid``'s) and the
   edgefc local functions; every call is stamped with the ONNX node it came from.
2. **Partition by the Program** (before ``LegalizeOps``): ``FuseOpsByPattern`` with the
   ``edgefc_npu`` composites (``tvm_patterns``) groups the calls of the nodes the Program placed on
   the NPU -- the patterns' check rejects every call of a node the Program put on the host --
   and ``MergeCompositeFunctions`` merges neighbouring composites into one NPU function per
   region. A node the Program put on the NPU whose calls no kernel can execute is a BuildError.
3. **Partition report** (``report.json["partition"]``): every ONNX node with where it runs
   (npu / host / split, as built), its engine, MACs (plain and padded) and precision from the
   Program, and for host work the Program's reason; ``npu_mac_share``; fallback reasons counted.
4. **Codegen** (``tvm_codegen``): each NPU function becomes an NPU program (``npu_programs.json``,
   with the Program's commands of the nodes it runs) and its call a ``call_dps_packed`` to the
   program's symbol.
5. **Weights**: tensors of 1 KiB or more move out of the executable into ``host_params.bin``.
6. **Build** (``tvm_build``): ``host_local.so`` and ``host_aarch64.so`` for the target file's
   ``[host.cpu]``.

``edgefc run`` loads the build with ``tvm_runtime.load_build`` and runs it in the Relax VM.
"""

from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgefc.errors import BuildError
from edgefc.targets import tvm_codegen, tvm_import, tvm_node_stamps
from edgefc.targets.tvm_build import find_cross_linker, write_tvm_files
from edgefc.targets.tvm_kernels import kernel_rejects
from edgefc.targets.tvm_patterns import PREFIX, pattern_table, placement_check

PARAM_MIN_BYTES = 1024  # constants this large leave the executable for host_params.bin


@dataclass
class Lowering:
    """The result of :func:`lower`: a module ready to build and what the build folder records."""

    mod: object
    programs: list[dict]
    params: list[tuple[str, object]]  # (name, tvm.runtime.Tensor), the trailing params of main
    inputs: list[dict]
    outputs: list[str]
    partition: dict
    seconds: dict = field(default_factory=dict)


def partition_module(mod, host_nodes: set[str]):
    """``FuseOpsByPattern`` (the ``edgefc_npu`` composites, never over a node in ``host_nodes``) +
    ``MergeCompositeFunctions``."""
    from tvm import relax

    pats = pattern_table(placement_check(host_nodes))[::-1]   # highest priority first: fused composites win
    mod = relax.transform.FuseOpsByPattern(pats, bind_constants=False, annotate_codegen=False)(mod)
    return relax.transform.MergeCompositeFunctions()(mod)


def _program_ops(program) -> dict[str, dict]:
    """Per graph node: the Program's engine, MACs, padded MACs and tensor precision."""
    out: dict[str, dict] = {}
    for name, engine in program.placement.items():
        out[name] = {"engine": engine, "macs": 0, "padded_macs": 0, "precision": None}
    for c in program.commands:
        if c.kind == "tensor" and c.op in out:
            o = out[c.op]
            o["macs"] += c.macs * c.repeat
            o["padded_macs"] += c.padded_macs * c.repeat
            o["precision"] = c.precision
    return out


def _main_calls(func) -> list:
    """The operator calls of ``main``, in order."""
    from tvm import ir, relax

    return [b.value for block in func.body.blocks for b in block.bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, ir.Op)]


def _signature(call) -> tuple:
    """What makes two calls interchangeable: the operator and the types of its result and arguments."""
    return (call.op.name, str(call.ty), tuple(str(getattr(a, "ty", a)) for a in call.args))


def _npu_calls(mod) -> list[tuple[object, list]]:
    """``(NPU function's GlobalVar, [every call in it, in execution order])`` for the NPU functions
    ``main`` calls (composites are walked at their call sites, the order the codegen serialises
    them in)."""
    from tvm import ir, relax

    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if not (isinstance(v, relax.Call) and isinstance(v.op, ir.GlobalVar)):
                continue
            f = mod[v.op]
            if not (isinstance(f, relax.Function) and f.attrs and "Codegen" in f.attrs):
                continue
            comps, calls = {}, []
            for fb in (x for blk in f.body.blocks for x in blk.bindings):
                if isinstance(fb.value, relax.Function):
                    comps[fb.var] = fb.value
                elif isinstance(fb.value, relax.Call) and (fb.value.op in comps or isinstance(fb.value.op, relax.Function)):
                    comp = comps.get(fb.value.op, fb.value.op)
                    calls += [cb.value for blk in comp.body.blocks for cb in blk.bindings
                              if isinstance(cb.value, relax.Call)]
            out.append((v.op, calls))
    return out


def attribute_npu_ops(before: list, mod) -> dict:
    """The ONNX node of every op in every NPU function: ``{GlobalVar: [node, ...]}``.

    Partitioning shares one composite function between structurally equal uses, so the node
    stamps inside a composite cannot say which use is which. The calls that went to the NPU are
    ``before`` (``main``'s calls before partitioning, each stamped with its node) without those
    left in ``main``; each NPU op takes the first of them with the same operator and types (calls
    that are structurally equal have equal MACs, bytes and precision)."""
    left = collections.Counter((_signature(c), tvm_node_stamps.node_of(c)) for c in _main_calls(mod["main"]))
    pool: dict[tuple, collections.deque] = {}
    for c in before:
        key = (_signature(c), tvm_node_stamps.node_of(c))
        if left[key]:
            left[key] -= 1
        else:
            pool.setdefault(key[0], collections.deque()).append(key[1])
    out = {}
    for gv, calls in _npu_calls(mod):
        nodes = []
        for call in calls:
            queue = pool.get(_signature(call))
            if not queue:
                raise BuildError(f"the NPU partition holds a {call.op.name} the graph does not; cannot attribute it")
            nodes.append(queue.popleft())
        out[gv] = nodes
    return out


def partition_report(before: list, mod, nodes: list[tuple[str, str]], program) -> dict:
    """Which ONNX node runs where in the partitioned ``mod`` (npu / host / split: its calls in
    ``main`` before partitioning, ``before``, against those still there), beside what the
    Program decided for it (engine, MACs, precision, the reason for the host). ``disagreements``
    lists the nodes whose placement as built differs from the Program's (a BuildError in
    :func:`lower`)."""
    from tvm import relax

    total_calls = collections.Counter(tvm_node_stamps.node_of(c) for c in before)
    host_calls: dict[str, list] = {}
    for call in _main_calls(mod["main"]):
        host_calls.setdefault(tvm_node_stamps.node_of(call), []).append(call)
    decided = _program_ops(program)
    ops, disagreements = [], []
    fallbacks: dict[str, int] = {}
    total = npu = 0
    for name, op_type in nodes:
        if not total_calls[name]:
            continue
        host = host_calls.get(name, [])
        d = decided.get(name, {"engine": "none", "macs": 0, "padded_macs": 0, "precision": None})
        where = "npu" if not host else "host" if len(host) == total_calls[name] else "split"
        entry = {"name": name, "op_type": op_type, "where": where, "engine": d["engine"], "macs": int(d["macs"]),
                 "padded_macs": int(d["padded_macs"]), "precision": d["precision"], "reason": None}
        total += d["macs"]
        npu += d["macs"] if where == "npu" else 0
        if host:
            reason = program.host_reasons.get(name)
            if reason is None:
                reason = next((r for r in map(kernel_rejects, host) if r), "not part of any NPU pattern match")
            entry["reason"] = reason
            fallbacks[reason] = fallbacks.get(reason, 0) + 1
            if where == "split":
                entry["host_ops"] = [c.op.name.removeprefix("relax.") for c in host]
        if (d["engine"] == "host" and where != "host") or (d["engine"] in ("tensor", "vector") and where != "npu"):
            disagreements.append(f"{name} ({op_type}): the Program says {d['engine']}, built on {where}"
                                 + (f" ({entry['reason']})" if entry["reason"] else ""))
        ops.append(entry)
    n_funcs = sum(1 for _gv, f in mod.functions.items()
                  if isinstance(f, relax.Function) and f.attrs and "Codegen" in f.attrs)
    return {
        "ops": ops,
        "npu_mac_share": (npu / total) if total else 1.0,
        "npu_macs": int(npu),
        "total_macs": int(total),
        "npu_functions": n_funcs,
        "fallbacks": dict(sorted(fallbacks.items(), key=lambda kv: -kv[1])),
        "counts": {w: sum(1 for o in ops if o["where"] == w) for w in ("npu", "host", "split")},
        "disagreements": disagreements,
    }


def _rename_symbols(mod, tag: str):
    """Give every NPU function a global symbol unique to this build (``edgefc_npu.<tag>.<n>``), so
    several builds (text encoder, U-Net, VAE) can live in one process."""
    from tvm import relax

    n = 0
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and func.attrs and "Codegen" in func.attrs:
            mod[gv] = func.with_attr("global_symbol", f"{PREFIX}{tag}.{n}")
            n += 1
    return mod


def _lift_params(mod, min_bytes: int = PARAM_MIN_BYTES):
    """Constants of ``min_bytes`` or more in ``main`` become trailing parameters of ``main``."""
    from tvm import relax

    params: list[tuple[str, np.ndarray]] = []
    seen: dict[int, relax.Var] = {}

    @relax.expr_functor.mutator
    class Lifter(relax.PyExprMutator):
        def visit_generic_const_(self, const):
            arr = const.value
            if not hasattr(arr, "shape"):
                return const
            nbytes = int(np.prod(arr.shape)) * np.dtype(str(arr.dtype)).itemsize if arr.shape else 0
            if nbytes < min_bytes:
                return const
            key = const.__hash__()
            if key not in seen:
                name = f"p{len(params)}"
                seen[key] = relax.Var(name, relax.TensorType([int(d) for d in arr.shape], str(arr.dtype)))
                params.append((name, arr))
            return seen[key]

    main = mod["main"]
    if not isinstance(main, relax.Function):
        raise BuildError("the imported module has no Relax main function")
    lifter = Lifter(mod)
    body = lifter.visit_expr(main.body)
    if not params:
        return mod, []
    new_params = list(main.params) + [seen[k] for k in seen]
    new_main = relax.Function(new_params, body, main.ty.ret if hasattr(main.ty, "ret") else None,
                              main.is_pure, main.attrs, main.span)
    mod["main"] = new_main
    return mod, params


def lower(model: onnx.ModelProto, program, progress=None, consume: bool = False) -> Lowering:
    """Import, partition by ``program`` (the :class:`edgefc.targets.program.Program` of the same
    graph: its ``placement``), report and codegen ``model`` (the compiled graph, weights included).

    ``consume=True`` lets the lowering take ``model`` apart (its weights are dropped once TVM
    holds them), which keeps one copy of the weights in memory at full size."""

    def step(msg):
        if progress:
            progress(msg)

    seconds = {}
    t0 = time.perf_counter()
    step("tvm: import")
    prepared = tvm_import.prepare_model(model, copy=not consume)
    nodes = tvm_import.node_table(prepared)
    inputs = [{"name": vi.name, "shape": [d.dim_value for d in vi.type.tensor_type.shape.dim],
               "dtype": str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)))}
              for vi in prepared.graph.input if vi.name not in {t.name for t in prepared.graph.initializer}]
    outputs = [o.name for o in prepared.graph.output]
    mod = tvm_import.import_model(prepared)
    if consume or prepared is not model:
        del prepared.graph.initializer[:]  # TVM holds the weights now
    seconds["import"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step("tvm: partition (by the Program's placement)")
    host_nodes = {n for n, e in program.placement.items() if e == "host"}
    before = _main_calls(mod["main"])
    mod = partition_module(mod, host_nodes)
    partition = partition_report(before, mod, nodes, program)
    if partition["disagreements"]:
        bad = partition["disagreements"]
        raise BuildError(f"the TVM build cannot place {len(bad)} node(s) where the Program did: {bad[0]}"
                         + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    seconds["partition"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step("tvm: NPU codegen")
    import tvm_ffi

    tag = format(tvm_ffi.structural_hash(mod) & 0xFFFFFFFF, "08x")
    op_nodes = attribute_npu_ops(before, mod)
    mod = _rename_symbols(mod, tag)
    op_nodes = {str(mod[gv].attrs["global_symbol"]): n for gv, n in op_nodes.items()}
    mod, programs = tvm_codegen.run_codegen(mod, program, op_nodes)
    mod, params = _lift_params(mod)
    seconds["codegen"] = time.perf_counter() - t0
    partition["commands"] = sum(len(p["commands"]) for p in programs)
    return Lowering(mod, programs, params, inputs, outputs, partition, seconds)


def emit_tvm(graph, out_dir, ctx, report, program, arch) -> None:
    """``--emit tvm``: lower the compiled ``graph`` by its ``program`` (the one ``profile.json``
    prices) and write the TVM build into ``out_dir``, the phone library for ``arch``'s host CPU.

    Adds ``report["partition"]`` (and ``ctx.report["partition"]``) and ``report["tvm"]``.
    """
    from edgefc import ir

    def progress(msg):
        print(f"  {msg} ...", file=sys.stderr, flush=True)

    find_cross_linker()  # no linker: fail before any work
    lowering = lower(ir.to_model(graph), program, progress=progress, consume=True)
    report["partition"] = ctx.report["partition"] = lowering.partition
    report["tvm"] = write_tvm_files(lowering, Path(out_dir), arch, progress=progress)
