"""The sessions a component runs in (split out of :mod:`edgefc.models.pipeline`): onnxruntime on
an ONNX file, or a build's local TVM library (``edgefc compile --emit tvm``), behind one
``inputs`` / ``run(feeds)`` interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefc.errors import BuildError


@dataclass
class InputSpec:
    """One model input: its static shape (ints; -1 where dynamic) and numpy dtype."""

    shape: list[int]
    dtype: np.dtype


class Runner:
    """One component's model in an onnxruntime CPU session (graph optimisations on)."""

    backend = "onnxruntime"

    def __init__(self, component: str, path: Path):
        from edgefc import ort

        self.component, self.path = component, Path(path)
        try:  # graph optimisations on; no arena: one run per session, lower peak memory
            self.session = ort.session(self.path, optimize=True, arena=False)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BuildError(f"onnxruntime cannot load {self.path}: {first}") from None
        self.inputs = {i.name: InputSpec([d if isinstance(d, int) else -1 for d in i.shape],
                                         np.dtype(_ORT_TYPES.get(i.type, np.float32)))
                       for i in self.session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        typed = {n: np.ascontiguousarray(v, dtype=self.inputs[n].dtype) for n, v in feeds.items()}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, typed)))


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32}


class TvmRunner:
    """A build's local TVM library (``edgefc compile --emit tvm``) in the Relax VM, NPU composites
    through edgefc's NPU runtime (:func:`edgefc.targets.tvm_runtime.load_build`, as ``edgefc run``)."""

    backend = "tvm"

    def __init__(self, component: str, path: Path):
        from edgefc.targets import tvm_runtime

        self.component, self.path = component, Path(path)
        self.build = tvm_runtime.load_build(self.path.parent)
        self.inputs = {i["name"]: InputSpec(list(i["shape"]), np.dtype(i["dtype"])) for i in self.build.inputs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        typed = {n: np.ascontiguousarray(v, dtype=self.inputs[n].dtype) for n, v in feeds.items()}
        return self.build.run(typed)


RUNTIMES = ("auto", "onnxruntime", "tvm")


def has_tvm_build(path: Path) -> bool:
    """Whether ``path`` is a build's model.onnx with a local TVM build beside it."""
    path = Path(path)
    if path.name != "model.onnx":
        return False
    try:
        from edgefc.targets.tvm_runtime import BUILD_FILES
    except ImportError:  # TVM (or the lowering) is not installed: onnxruntime runs the build
        return False
    return all((path.parent / f).is_file() for f in BUILD_FILES)


def open_runner(component: str, path: Path, runtime: str = "auto"):
    """The session a component runs in: the build's TVM library when it has one (``auto``/``tvm``),
    else onnxruntime on the ONNX file. Tests replace this to see which files are loaded."""
    if runtime != "onnxruntime" and has_tvm_build(path):
        return TvmRunner(component, path)
    return Runner(component, path)

