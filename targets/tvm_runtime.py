"""The NPU runtime and the loaded TVM build (DESIGN.md "TVM lowering").

:class:`NpuProgram` executes one NPU program of ``npu_programs.json`` command by command with the
numpy kernels (``targets/tvm_kernels.py``) -- conv2d, matmul, each attention tile, norms, int16/int8
quantize/dequantize exactly as written -- and writes the outputs in place. It is registered as a
packed function under the program's symbol, which the Relax VM calls like any extern; it is the
reference NPU for this machine (on the phone the NPU driver provides the same symbols, and
``host_aarch64.so`` calls them the same way). Each program carries the Program's commands of the
nodes it runs; ``NpuProgram.trace`` records, in order, the nodes whose commands were executed.
:class:`TvmRunner` loads a build folder (``host_local.so``, ``npu_programs.json``,
``host_params.bin``, ``tvm.json``) and runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgefc.errors import BuildError
from edgefc.targets.tvm_kernels import _ACC, KERNELS

BUILD_FILES = ("tvm.json", "npu_programs.json", "host_local.so")


class NpuProgram:
    """Executes one NPU program (numpy); ``run(inputs) -> outputs``."""

    def __init__(self, program: dict):
        self.program = program
        self.n_in = len(program["inputs"])
        last: dict[int, int] = {}
        flat = [o for cmd in program["commands"] for o in cmd["ops"]]
        # the command each op belongs to: its graph nodes join the trace when it starts
        self.starts = {}
        i = 0
        for cmd in program["commands"]:
            self.starts[i] = [n for n in cmd.get("nodes", ()) if n in program.get("program", {})]
            i += len(cmd["ops"])
        for i, o in enumerate(flat):
            for r in _refs(o["args"]):
                last[r] = i
        keep = set(_refs(program["outputs"]))
        self.flat = flat
        self.trace: list[str] = []   # graph nodes whose Program commands were executed, in order
        self.free_after: dict[int, list[int]] = {}
        for r, i in last.items():
            if r not in keep:
                self.free_after.setdefault(i, []).append(r)

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        env: dict[int, Any] = {spec["id"]: x for spec, x in zip(self.program["inputs"], inputs)}
        self.trace = []
        for i, o in enumerate(self.flat):
            for node in self.starts.get(i, ()):
                if not self.trace or self.trace[-1] != node:
                    self.trace.append(node)
            args = [_value(a, env) for a in o["args"]]
            op = o["op"]
            if op == "bind":  # the composite's output: stored at its declared type
                res = args[0]
                if o["dtype"] is not None and not isinstance(res, (tuple, list)):
                    res = np.asarray(res).astype(o["dtype"], copy=False)
            elif op == "tuple_get_item":
                res = args[0][o["attrs"]["index"]]
            else:
                res = KERNELS[op](args, o["attrs"], o["shape"], o["dtype"])
                if o["dtype"] is not None and not isinstance(res, tuple):
                    # inside a composite, fp16 values stay in the fp32 accumulators of the fused
                    # kernel; they are rounded to fp16 when the composite writes its output
                    res = np.asarray(res).astype(_ACC.get(o["dtype"], o["dtype"]), copy=False)
            env[o["out"]] = res
            for r in self.free_after.get(i, ()):
                env.pop(r, None)
        return [np.asarray(_value(r, env)) for r in self.program["outputs"]]

    def packed(self):
        """The function the Relax VM calls: (inputs..., outputs...) in destination-passing style."""

        def fn(*args):
            ins = [np.from_dlpack(a) for a in args[: self.n_in]]
            outs = self.run(ins)
            for dst, res in zip(args[self.n_in:], outs):
                dst.copyfrom(np.ascontiguousarray(res.astype(np.dtype(str(dst.dtype)), copy=False)))

        return fn


def _refs(x) -> list[int]:
    out = []
    if isinstance(x, dict):
        if "v" in x:
            out.append(x["v"])
        for key in ("tuple",):
            if key in x:
                out.extend(_refs(x[key]))
    elif isinstance(x, list):
        for e in x:
            out.extend(_refs(e))
    return out


def _value(a, env):
    if a is None:
        return None
    if "v" in a:
        return env[a["v"]]
    if "shape" in a:
        return a["shape"]
    if "tuple" in a:
        return [_value(f, env) for f in a["tuple"]]
    if "const" in a:
        return np.asarray(a["const"], dtype=a["dtype"]).reshape(a["shape"])
    if "lit" in a:
        return a["lit"]
    raise ValueError(f"bad NPU program argument {a}")


def register_program(program: dict) -> None:
    """Make the program callable by the Relax VM under its symbol."""
    import tvm

    tvm.register_global_func(program["symbol"], NpuProgram(program).packed(), override=True)


def load_programs(path) -> list[dict]:
    with open(path) as f:
        return json.load(f)["programs"]


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
            programs = load_programs(d / "npu_programs.json")
        except (json.JSONDecodeError, KeyError, OSError) as e:
            raise BuildError(f"{d} has an unreadable TVM build description ({type(e).__name__}); rebuild it") from None
        if self.meta.get("params") and not (d / "host_params.bin").is_file():
            raise BuildError(f"{d} is incomplete: host_params.bin is missing")
        if [p["symbol"] for p in programs] != self.meta.get("npu_programs"):
            raise BuildError(f"{d}: npu_programs.json does not belong to this build; rebuild it")
        for p in programs:
            register_program(p)
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
        # np.asarray keeps a 0-d input 0-d (np.ascontiguousarray makes it 1-d)
        args = [tvm.runtime.tensor(np.asarray(feeds[s["name"]], dtype=s["dtype"], order="C")) for s in self.inputs]
        out = self.vm["main"](*args, *self.params)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return {name: o.numpy() for name, o in zip(self.outputs, outs)}


def load_build(build_dir) -> TvmRunner:
    return TvmRunner(build_dir)
