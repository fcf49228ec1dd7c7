"""Building a lowered module (DESIGN.md "TVM lowering"): ``relax.build`` for this machine
(``host_local.so``) and for the phone's application CPU -- the target file's ``[host.cpu]``, for
the Exynos 2400 the tag ``samsung/exynos2400-cpu``: aarch64 Linux, Cortex-X4 -- linked by a
cross linker (``python -m ziglang cc``, ``aarch64-linux-gnu-gcc`` or ``$EDGEFC_AARCH64_CC``) into
``host_aarch64.so``; and writing the build folder (``npu_programs.json``, ``host_params.bin``,
``tvm.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgefc.errors import BuildError
from edgefc.staging import temp_dir
from edgefc.targets.description import Architecture

LOCAL_TARGET = {"kind": "llvm"}


def host_cpu(arch: Architecture) -> dict:
    """The phone's application CPU as a TVM target dict, from the target file's ``[host.cpu]``
    (``tag``, ``mtriple``, ``mcpu``, ``mattr``, ``num_cores``)."""
    cpu = arch.host.cpu
    if not cpu.tag or not cpu.mtriple:
        raise BuildError(f"target '{arch.name}' describes no host CPU ([host.cpu] tag and mtriple) to build for")
    return {"tag": cpu.tag, "kind": "llvm", "mtriple": cpu.mtriple, "mcpu": cpu.mcpu or "generic",
            "mattr": list(cpu.mattr), "num-cores": int(cpu.num_cores),
            "keys": ["arm_cpu", "cpu"] if cpu.mtriple.startswith("aarch64") else ["cpu"]}


def phone_target(arch: Architecture):
    """The TVM target of the target file's host CPU, registered as its tag (idempotent)."""
    import tvm
    from tvm.target import tag as tags

    cpu = host_cpu(arch)
    if cpu["tag"] not in (tags.list_tags() or {}):
        tags.register_tag(cpu["tag"], {k: v for k, v in cpu.items() if k != "tag"}, override=True)
    return tvm.target.Target(cpu["tag"])


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


def build(lowering, target):
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


def write_tvm_files(lowering, out_dir: Path, arch: Architecture | None = None, *, aarch64: bool = True,
                    progress=None) -> dict:
    """Build and write ``host_local.so``, ``host_aarch64.so``, ``npu_programs.json``,
    ``host_params.bin`` and ``tvm.json`` into ``out_dir``; returns the ``report["tvm"]`` section.
    ``arch``'s ``[host.cpu]`` is the phone CPU ``host_aarch64.so`` is built for."""
    import tvm

    out_dir = Path(out_dir)
    seconds = dict(lowering.seconds)
    cross = find_cross_linker() if aarch64 else None
    cpu = host_cpu(arch) if aarch64 else None
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
        ex_arm = build(lowering, phone_target(arch))
        with temp_dir("tvm") as work:  # edgefc-tvm-PID-*: removed by a later run if this one is killed
            ex_arm.export_library(str(out_dir / "host_aarch64.so"), fcompile=_cross_compile_fn(cross), workspace_dir=str(work))
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
