"""Lowering of a compiled graph to Apache TVM (Relax): NPU partitions + host library.

Paper/DESIGN.md "TVM lowering". ``edgefc compile ... --emit tvm`` calls :func:`emit_tvm` from the
target's ``write_artifacts`` step. The steps, in order:

1. **Import** (``tvm_import``): the compiled ONNX graph -> Relax ``main``, with converters of ours
   for Attention-23, TiledAttention and the edgefc local functions.
2. **Partition** (before ``LegalizeOps``, where the patterns still see Relax ops):
   ``FuseOpsByPattern`` with the ``edgefc_npu`` pattern table (``tvm_npu``) wraps every
   NPU-eligible composite in a function, ``MergeCompositeFunctions`` merges neighbouring
   composites into one NPU function per region.
3. **Partition report** (``report.json["partition"]``): every ONNX node with where it runs
   (npu / host / split), its MACs and, for host work, the reason; ``npu_mac_share``; fallback
   reasons counted.
4. **Codegen** (``RunCodegen`` -> ``relax.ext.edgefc_npu``): each NPU function becomes an NPU
   program (``npu_programs.json``) and its call a ``call_dps_packed`` to the program's symbol.
5. **Weights**: tensors of 1 KiB or more move out of the executable into ``host_params.bin``
   (``tvm.runtime.save_param_dict``), so the library stays small at full size.
6. **Build**: ``relax.build`` for this machine (``host_local.so``) and for the phone's CPU
   (the target file's ``[host.cpu]``; for the Exynos 2400 the tag ``samsung/exynos2400-cpu``:
   aarch64 Linux, Cortex-X4), linked by a cross linker
   (``python -m ziglang cc``, or ``aarch64-linux-gnu-gcc``, or ``$EDGEFC_AARCH64_CC``) into
   ``host_aarch64.so``.

``edgefc run`` loads the local build with :func:`load_build` (which registers the NPU programs
with the numpy NPU runtime) and runs it in the Relax VM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgefc.errors import BuildError
from edgefc.targets import tvm_import, tvm_npu

LOCAL_TARGET = {"kind": "llvm"}

PARAM_MIN_BYTES = 1024  # constants this large leave the executable for host_params.bin
BUILD_FILES = ("tvm.json", "npu_programs.json", "host_local.so")


def host_cpu(target) -> dict:
    """The phone's application CPU as a TVM target dict, from the target file's ``[host.cpu]``
    (``tag``, ``mtriple``, ``mcpu``, ``mattr``, ``num_cores``)."""
    tag, triple = target["host.cpu.tag"], target["host.cpu.mtriple"]
    if not tag or not triple:
        raise BuildError(f"target '{target.name}' describes no host CPU ([host.cpu] tag and mtriple) to build for")
    return {"tag": tag, "kind": "llvm", "mtriple": triple, "mcpu": target["host.cpu.mcpu"] or "generic",
            "mattr": list(target["host.cpu.mattr"]), "num-cores": int(target["host.cpu.num_cores"]),
            "keys": ["arm_cpu", "cpu"] if triple.startswith("aarch64") else ["cpu"]}


def phone_target(target):
    """The TVM target of the target file's host CPU, registered as its tag (idempotent)."""
    import tvm
    from tvm.target import tag as tags

    cpu = host_cpu(target)
    if cpu["tag"] not in (tags.list_tags() or {}):
        tags.register_tag(cpu["tag"], {k: v for k, v in cpu.items() if k != "tag"}, override=True)
    return tvm.target.Target(cpu["tag"])


# ---------------------------------------------------------------------------------------------
# Import + partition + report


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


def _op_name(call) -> str | None:
    return getattr(call.op, "name", None)


def _bindings(func):
    for block in func.body.blocks:
        yield from block.bindings


def partition_module(mod):
    """``FuseOpsByPattern`` (edgefc_npu patterns) + ``MergeCompositeFunctions``."""
    from tvm import relax

    pats = tvm_npu.patterns()
    mod = relax.transform.FuseOpsByPattern(pats, bind_constants=False, annotate_codegen=False)(mod)
    return relax.transform.MergeCompositeFunctions()(mod)


def partition_report(before_main, after_mod, nodes: list[tuple[str, str]]) -> dict:
    """Which ONNX node runs where, from the bindings of ``main`` before and after partitioning.

    A binding of ``main`` that is still an operator call after partitioning runs on the host;
    every other operator binding went into an NPU function. Bindings are attributed to the
    ONNX node whose result variable (``onnx<k>``) closes the run they belong to.
    """
    from tvm import ir, relax

    host_names = set()
    for b in _bindings(after_mod["main"]):
        if isinstance(b.value, relax.Call) and isinstance(b.value.op, ir.Op):
            host_names.add(b.var.name)
    per_node: dict[int, list] = {}
    pending: list = []
    for b in _bindings(before_main):
        if isinstance(b.value, relax.Call) and isinstance(b.value.op, ir.Op):
            pending.append(b)
        m = tvm_import.NODE_VAR.match(b.var.name)
        if m:
            per_node.setdefault(int(m.group(1)), []).extend(pending)
            pending = []
    if pending:
        per_node.setdefault(len(nodes) - 1, []).extend(pending)
    ops = []
    fallbacks: dict[str, int] = {}
    total = npu = 0
    for k in sorted(per_node):
        binds = per_node[k]
        if not binds:
            continue
        name, op_type = nodes[k]
        macs = sum(tvm_npu.call_macs(b.value) for b in binds)
        host = [b for b in binds if b.var.name in host_names]
        host_macs = sum(tvm_npu.call_macs(b.value) for b in host)
        total += macs
        npu += macs - host_macs
        entry = {"name": name, "op_type": op_type, "where": "npu" if not host else "host" if len(host) == len(binds) else "split",
                 "macs": int(macs), "reason": None}
        if host:
            reasons = []
            for b in host:
                r = tvm_npu.host_reason(b.value) or "not part of any NPU pattern match"
                if r not in reasons:
                    reasons.append(r)
                fallbacks[r] = fallbacks.get(r, 0) + 1
            entry["reason"] = "; ".join(reasons)
            if entry["where"] == "split":
                entry["host_ops"] = [_op_name(b.value).removeprefix("relax.") for b in host]
        ops.append(entry)
    n_funcs = sum(1 for gv, f in after_mod.functions.items()
                  if isinstance(f, relax.Function) and f.attrs and "Codegen" in f.attrs)
    return {
        "ops": ops,
        "npu_mac_share": (npu / total) if total else 1.0,
        "npu_macs": int(npu),
        "total_macs": int(total),
        "npu_functions": n_funcs,
        "fallbacks": dict(sorted(fallbacks.items(), key=lambda kv: -kv[1])),
        "counts": {w: sum(1 for o in ops if o["where"] == w) for w in ("npu", "host", "split")},
    }


def _rename_symbols(mod, tag: str):
    """Give every NPU function a global symbol unique to this build (``edgefc_npu.<tag>.<n>``), so
    several builds (text encoder, U-Net, VAE) can live in one process."""
    from tvm import relax

    n = 0
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and func.attrs and "Codegen" in func.attrs:
            mod[gv] = func.with_attr("global_symbol", f"{tvm_npu.PREFIX}{tag}.{n}")
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


def lower(model: onnx.ModelProto, progress=None, consume: bool = False) -> Lowering:
    """Import, partition, report and codegen ``model`` (the compiled graph, weights included).

    ``consume=True`` lets the lowering take ``model`` apart (its weights are dropped once TVM
    holds them), which keeps one copy of the weights in memory at full size."""
    from tvm import relax

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
    step("tvm: partition")
    before_main = mod["main"]
    mod = partition_module(mod)
    partition = partition_report(before_main, mod, nodes)
    seconds["partition"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step("tvm: NPU codegen")
    import tvm_ffi

    tag = format(tvm_ffi.structural_hash(mod) & 0xFFFFFFFF, "08x")
    mod = _rename_symbols(mod, tag)
    tvm_npu.COLLECTED.clear()
    mod = relax.transform.RunCodegen()(mod)
    programs = [tvm_npu.COLLECTED[s] for s in sorted(tvm_npu.COLLECTED, key=lambda s: int(s.rsplit(".", 1)[1]))]
    tvm_npu.COLLECTED.clear()
    mod, params = _lift_params(mod)
    seconds["codegen"] = time.perf_counter() - t0
    partition["commands"] = sum(len(p["commands"]) for p in programs)
    return Lowering(mod, programs, params, inputs, outputs, partition, seconds)


# ---------------------------------------------------------------------------------------------
# Build


def find_cross_linker() -> list[str]:
    """The command that links an aarch64 Linux shared library, or a BuildError saying how to get one.

    Tried in order: ``$EDGEFC_AARCH64_CC`` (a command line), ``python -m ziglang cc -target
    aarch64-linux-gnu`` (PyPI ``ziglang``, in the dev extra), ``aarch64-linux-gnu-gcc``.
    """
    env = os.environ.get("EDGEFC_AARCH64_CC")
    if env:
        cmd = env.split()
        if not cmd or not shutil.which(cmd[0]):
            raise BuildError(f"EDGEFC_AARCH64_CC='{env}' does not name an executable aarch64 linker")
        return cmd
    try:
        import ziglang  # noqa: F401

        return [sys.executable, "-m", "ziglang", "cc", "-target", "aarch64-linux-gnu"]
    except ImportError:
        pass
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    if gcc:
        return [gcc]
    raise BuildError("no aarch64 cross linker found for host_aarch64.so: `pip install ziglang` (in edgefc's dev "
                     "extra), or install gcc-aarch64-linux-gnu, or set EDGEFC_AARCH64_CC")


def _cross_compile_fn(cmd: list[str]):
    def fcompile(output, objects, options=None):
        args = [*cmd, "-shared", "-fPIC", "-o", output, *objects]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, check=False)
        except OSError as e:
            raise BuildError(f"cannot run the aarch64 linker '{cmd[0]}': {e.strerror or e}") from None
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise BuildError(f"linking host_aarch64.so failed: {msg[-1] if msg else 'unknown error'}")

    fcompile.output_format = "so"
    return fcompile


def build(lowering: Lowering, target):
    """``relax.build`` of the lowered module for ``target``."""
    import tvm
    from tvm import relax

    target = tvm.target.Target(target) if isinstance(target, dict) else target
    with target:
        return relax.build(lowering.mod, target=target)


def _check_elf_aarch64(path: Path) -> None:
    head = path.read_bytes()[:20]
    if head[:4] != b"\x7fELF" or int.from_bytes(head[18:20], "little") != 183:
        raise BuildError(f"{path.name} is not an AArch64 ELF shared library")


def write_build(lowering: Lowering, out_dir: Path, target=None, *, aarch64: bool = True, progress=None) -> dict:
    """Build and write ``host_local.so``, ``host_aarch64.so``, ``npu_programs.json``,
    ``host_params.bin`` and ``tvm.json`` into ``out_dir``; returns the ``report["tvm"]`` section.
    ``target`` (its ``[host.cpu]``) is the phone CPU ``host_aarch64.so`` is built for."""
    import tvm

    out_dir = Path(out_dir)
    seconds = dict(lowering.seconds)
    cross = find_cross_linker() if aarch64 else None
    cpu = host_cpu(target) if aarch64 else None
    t0 = time.perf_counter()
    if progress:
        progress("tvm: build for this machine (llvm)")
    ex = build(lowering, LOCAL_TARGET)
    ex.export_library(str(out_dir / "host_local.so"))
    seconds["build_local"] = time.perf_counter() - t0
    if aarch64:
        t0 = time.perf_counter()
        if progress:
            progress(f"tvm: cross-compile for {cpu['tag']}")
        ex_arm = build(lowering, phone_target(target))
        with tempfile.TemporaryDirectory(prefix="edgefc-tvm-") as work:
            ex_arm.export_library(str(out_dir / "host_aarch64.so"), fcompile=_cross_compile_fn(cross), workspace_dir=work)
        _check_elf_aarch64(out_dir / "host_aarch64.so")
        seconds["build_aarch64"] = time.perf_counter() - t0
    (out_dir / "npu_programs.json").write_text(json.dumps({"programs": lowering.programs}) + "\n")
    if lowering.params:
        tvm.runtime.save_param_dict_to_file(dict(lowering.params), str(out_dir / "host_params.bin"))
    meta = {
        "format": 1,
        "inputs": lowering.inputs,
        "outputs": lowering.outputs,
        "params": [n for n, _ in lowering.params],
        "npu_programs": [p["symbol"] for p in lowering.programs],
        "local_target": LOCAL_TARGET,
        "phone_target": cpu,
        "tvm_version": tvm.__version__,
    }
    (out_dir / "tvm.json").write_text(json.dumps(meta, indent=2) + "\n")
    files = [f for f in ("host_local.so", "host_aarch64.so", "npu_programs.json", "host_params.bin", "tvm.json")
             if (out_dir / f).exists()]
    return {
        "files": files,
        "local_target": LOCAL_TARGET,
        "phone_target": cpu["tag"] if cpu else None,
        "cross_linker": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cross)) if cross else None,
        "npu_programs": len(lowering.programs),
        "npu_commands": sum(len(p["commands"]) for p in lowering.programs),
        "host_params": len(lowering.params),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def emit_tvm(graph, out_dir, ctx, report) -> None:
    """``--emit tvm``: lower the compiled ``graph`` and write the TVM build into ``out_dir``.

    Adds ``report["partition"]`` (and ``ctx.report["partition"]``) and ``report["tvm"]``.
    """
    from edgefc import ir

    def progress(msg):
        print(f"  {msg} ...", file=sys.stderr, flush=True)

    find_cross_linker()  # no linker: fail before any work
    lowering = lower(ir.to_model(graph), progress=progress, consume=True)
    report["partition"] = ctx.report["partition"] = lowering.partition
    report["tvm"] = write_build(lowering, Path(out_dir), ctx.target, progress=progress)


# ---------------------------------------------------------------------------------------------
# Running a build


class TvmRunner:
    """A loaded TVM build: ``run(feeds) -> {output name: array}``."""

    def __init__(self, build_dir: str | os.PathLike):
        import tvm
        from tvm import relax

        d = Path(build_dir)
        if not d.is_dir():
            raise BuildError(f"build folder not found: {d}")
        missing = [f for f in BUILD_FILES if not (d / f).is_file()]
        if missing:
            raise BuildError(f"{d} has no TVM build ({', '.join(missing)} missing): compile with --emit tvm")
        try:
            self.meta = json.loads((d / "tvm.json").read_text())
            programs = tvm_npu.load_programs(d / "npu_programs.json")
        except (json.JSONDecodeError, KeyError, OSError) as e:
            raise BuildError(f"{d} has an unreadable TVM build description ({type(e).__name__}); rebuild it") from None
        if self.meta.get("params") and not (d / "host_params.bin").is_file():
            raise BuildError(f"{d} is incomplete: host_params.bin is missing")
        if [p["symbol"] for p in programs] != self.meta.get("npu_programs"):
            raise BuildError(f"{d}: npu_programs.json does not belong to this build; rebuild it")
        for p in programs:
            tvm_npu.register_program(p)
        try:
            lib = tvm.runtime.load_module(str(d / "host_local.so"))
        except Exception as e:  # noqa: BLE001 (TVM raises its own error types for unloadable libraries)
            raise BuildError(f"cannot load {d / 'host_local.so'}: {str(e).strip().splitlines()[-1][:200]}") from None
        self.vm = relax.VirtualMachine(lib, tvm.cpu())
        self.params = []
        if self.meta.get("params"):
            pd = tvm.runtime.load_param_dict_from_file(str(d / "host_params.bin"))
            self.params = [pd[n] for n in self.meta["params"]]
        self.inputs = self.meta["inputs"]
        self.outputs = self.meta["outputs"]

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        names = [i["name"] for i in self.inputs]
        missing = [n for n in names if n not in feeds]
        extra = [n for n in feeds if n not in names]
        if missing or extra:
            raise BuildError(f"inputs do not match the model: expected {', '.join(names)}"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unknown {', '.join(extra)}" if extra else ""))
        for spec in self.inputs:
            a = feeds[spec["name"]]
            if list(a.shape) != list(spec["shape"]):
                raise BuildError(f"input '{spec['name']}' has shape {list(a.shape)}, the model expects {spec['shape']}")
            if np.issubdtype(a.dtype, np.floating) != np.issubdtype(np.dtype(spec["dtype"]), np.floating):
                raise BuildError(f"input '{spec['name']}' has dtype {a.dtype}, the model expects {spec['dtype']}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        self.check_feeds(feeds)
        args = [tvm.runtime.tensor(np.ascontiguousarray(feeds[s["name"]].astype(s["dtype"], copy=False)))
                for s in self.inputs]
        out = self.vm["main"](*args, *self.params)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return {name: o.numpy() for name, o in zip(self.outputs, outs)}


def load_build(build_dir) -> TvmRunner:
    return TvmRunner(build_dir)
