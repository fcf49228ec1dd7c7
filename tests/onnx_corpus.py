"""The onnx package's operator tests as a corpus for ``edgefc.compile`` (issue 12, item 7).

Each case (``onnx.backend.test.case.node.collect_testcases``) is a small model with inputs and
reference outputs. A case counts when onnxruntime runs the original and reproduces the reference
(otherwise it says nothing about edgefc: ``n/a``). Then ``edgefc.compile`` (in-process, fp32,
no MLT, the default NPU pipeline otherwise) must either

* ``ok``: give a model that onnxruntime runs and whose outputs match the original's strictly
  (:func:`edgefc.ort.compare`: same names, shapes, dtypes, non-finite values; relative error
  within ``TOLERANCE``) and the case's reference, or
* ``refused``: raise a user-facing :class:`edgefc.EdgefcError` (one line, exit 2 on the CLI),

and never ``crash`` (any other exception, or a pass's unexpected exception reported as
:class:`edgefc.errors.InternalError`) nor be ``wrong``.

Run as a script for the whole corpus or another stride: ``python -m tests.onnx_corpus [EVERY]
[OFFSET] [--default | --precision=P]`` prints every verdict that is not ``ok``/``n/a`` and the counts; with
``--default`` the compile runs the default pipeline (quantization, tiling: lossy, so only the
outputs' names, shapes and dtypes are checked).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import edgefc
from edgefc import ort
from edgefc.errors import EdgefcError, InternalError

#: compiled vs original in onnxruntime (fp32 build: reassociation by fusion only).
TOLERANCE = 1e-4
#: the same for a model with FP16 outputs: one FP16 ulp at the output's scale (2^-10), what
#: computing a fused op in one step instead of rounding each step of its decomposition changes
FP16_TOLERANCE = 2.0 ** -10
#: onnxruntime on the original vs the case's reference (the corpus's own tolerance, rtol 1e-3).
REFERENCE_TOLERANCE = 1e-3


@dataclass
class Verdict:
    name: str
    status: str  # ok | refused | crash | wrong | n/a
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.status} {self.name}: {self.reason}" if self.reason else f"{self.status} {self.name}"


def cases(every: int = 1, offset: int = 0) -> list:
    """The operator tests sorted by name, every ``every``-th from ``offset``."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sorted(collect_testcases(None), key=lambda c: c.name)[offset::every]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


#: the corpus's compile options: fp32 and no tiling, so the result must match exactly
EXACT = {"precision": "fp32", "no_mlt": True}


def run_case(case, folder: Path, options: dict | None = None) -> Verdict:
    """Compile one case into ``folder`` with ``options`` (default :data:`EXACT`) and judge it.
    With other options (quantization: lossy) only the outputs' names, shapes and dtypes are
    checked."""
    exact = options is None
    options = EXACT if options is None else options
    if not case.data_sets:
        return Verdict(case.name, "n/a", "no data set")
    inputs, expected = case.data_sets[0]
    model = case.model
    init = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in init]
    if len(inputs) != len(names) or not all(isinstance(a, np.ndarray) for a in list(inputs) + list(expected)):
        return Verdict(case.name, "n/a", "sequence, map or optional inputs/outputs")
    feeds = dict(zip(names, inputs))
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    try:
        original = ort.run(str(path), feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime cannot run the original as given
        return Verdict(case.name, "n/a", f"onnxruntime cannot run the original: {_first_line(e)}")
    reference = dict(zip(original, expected))
    if len(expected) != len(original) or not ort.compare(reference, original).within(REFERENCE_TOLERANCE):
        return Verdict(case.name, "n/a", "onnxruntime does not reproduce the reference on the original")
    shapes = {n: a.shape for n, a in feeds.items()}
    try:
        edgefc.compile(path, "exynos2400", output=folder / "build", shapes=shapes,
                       options=dict(options))
    except InternalError as e:
        return Verdict(case.name, "crash", str(e))
    except EdgefcError as e:
        return Verdict(case.name, "refused", str(e).splitlines()[0] if str(e) else type(e).__name__)
    except Exception as e:  # noqa: BLE001 - any other exception is a crash
        return Verdict(case.name, "crash", _first_line(e))
    try:
        compiled = ort.run(str(folder / "build" / "model.onnx"), feeds)
    except Exception as e:  # noqa: BLE001 - the compiled model does not run: a wrong answer
        return Verdict(case.name, "wrong", f"the compiled model does not run in onnxruntime: {_first_line(e)}")
    if not exact:
        diff = ort.compare(original, compiled)
        if diff.reason and "nan" not in diff.reason and "inf" not in diff.reason:
            return Verdict(case.name, "wrong", f"vs the original in onnxruntime: {diff.reason}")
        return Verdict(case.name, "ok")
    low = any(a.dtype in (np.float16,) for a in original.values())
    for against, what, tol in ((original, "the original in onnxruntime", FP16_TOLERANCE if low else TOLERANCE),
                               (reference, "the case's reference", REFERENCE_TOLERANCE)):
        diff = ort.compare(against, compiled)
        if not diff.within(tol):
            return Verdict(case.name, "wrong", f"vs {what}: {diff.describe()}")
    return Verdict(case.name, "ok")


def run_all(selected, progress=None, options: dict | None = None) -> list[Verdict]:
    verdicts = []
    for case in selected:
        with tempfile.TemporaryDirectory(prefix="edgefc-corpus-") as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                verdicts.append(run_case(case, Path(tmp), options))
        if progress:
            progress(verdicts[-1])
    return verdicts


def summary(verdicts: list[Verdict]) -> str:
    counts = {s: sum(v.status == s for v in verdicts) for s in ("ok", "refused", "wrong", "crash", "n/a")}
    runnable = len(verdicts) - counts["n/a"]
    return (f"{len(verdicts)} cases, {runnable} runnable ({counts['n/a']} that onnxruntime cannot run or reproduce left "
            f"out): {counts['ok']} compiled and matched, {counts['refused']} refused, {counts['wrong']} wrong, "
            f"{counts['crash']} crashed")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    every = int(args[0]) if args else 1
    offset = int(args[1]) if len(args) > 1 else 0
    start = time.perf_counter()
    selected = cases(every, offset)
    options = {} if "--default" in sys.argv else None  # --default: the default pipeline (quantization, tiling)
    for a in sys.argv[1:]:
        if a.startswith("--precision="):
            options = {"precision": a.split("=", 1)[1]}
    verdicts = run_all(selected, progress=lambda v: v.status in ("ok", "n/a") or print(v, flush=True), options=options)
    print(summary(verdicts), f"in {time.perf_counter() - start:.0f} s")
