"""The handover check: every model a build holds is loaded the way its users load it before the
build folder is moved into place.

A compiler must not hand over an artifact it has not loaded itself (DESIGN.md). Before
``edgefc compile`` renames its staging folder into place, each ``.onnx`` file in it passes

1. ``onnx.checker.check_model(path, full_check=True)`` (given the path, so models over 2 GB with
   external data are checked without loading their weights into a protobuf), and
2. an onnxruntime session created with onnxruntime's *default* session options (every graph
   optimisation on, ``ORT_ENABLE_ALL``: what ``onnxruntime.InferenceSession(path)`` does) and one
   with graph optimisations off (``ORT_DISABLE_ALL``: what edgefc's own sessions and ``--verify``
   use), one session creation each, in a child process, so that an abort inside onnxruntime (a C++
   assertion, a segfault) is caught and reported instead of ending the compile.

A failure is :class:`HandoverError`: an internal error (a bug in edgefc, never the user's input)
with its own exit status, :data:`EXIT_STATUS` (3), a message naming the last pass that ran, and
nothing written (the staging folder is removed). Issue 18 item 1 is the case that motivated it:
every W8A16 build with a tiled attention aborted onnxruntime under its default options, and
nothing noticed because every edgefc session switched optimisations off.

Node names are kept unique by :func:`unique_node_names`, which the pass manager applies after
every pass (onnxruntime refuses a graph with two nodes of the same name; ONNX's version converter
writes such names, e.g. ``ConstantOfShape_opset23_ConstantOfShape`` for every converted node).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from edgefc.errors import InternalError

#: exit status of ``edgefc`` when a build fails its handover check (0: success, 2: a user error)
EXIT_STATUS = 3

#: the sessions the child creates, in order: (name in messages, onnxruntime level attribute or None
#: for the untouched default ``SessionOptions()``)
SESSIONS = (("default session options (all graph optimisations, ORT_ENABLE_ALL)", None),
            ("graph optimisations off (ORT_DISABLE_ALL)", "ORT_DISABLE_ALL"))

# The child: one session per entry of SESSIONS, announcing each on stdout first (so that when it
# dies by a signal the parent knows which one), then "ok". A Python-level error is one line on stderr.
_CHILD = r"""
import sys
import onnxruntime as ort
path, levels = sys.argv[1], sys.argv[2:]
for i, level in enumerate(levels):
    print(i, flush=True)
    opts = ort.SessionOptions()
    if level != "default":
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        text = " ".join(str(e).split())
        print(f"{type(e).__name__}: {text[:400]}", file=sys.stderr, flush=True)
        sys.exit(1)
print("ok", flush=True)
"""


class HandoverError(InternalError):
    """A compiled model fails ``onnx.checker`` or does not load in onnxruntime: a bug in edgefc (or
    in a plugin pass), reported as one line with exit status :data:`EXIT_STATUS`."""

    exit_status = EXIT_STATUS


def _ort_version() -> str:
    try:
        from importlib.metadata import version

        return version("onnxruntime")
    except Exception:  # pragma: no cover - onnxruntime is a dependency
        return "?"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


def _fail(path: Path, last_pass: str | None, what: str) -> HandoverError:
    after = f"after pass '{last_pass}'" if last_pass else "with no pass run"
    return HandoverError(f"internal error: the compiled model {path.name} ({after}) {what}; "
                         f"the build was not written (a bug in edgefc or a plugin pass: please report it)")


def check_model_file(path: str | os.PathLike, last_pass: str | None = None, *, timeout: float = 3600) -> dict:
    """Check the ONNX file ``path`` as it is handed over (module docstring): ``onnx.checker`` with
    ``full_check`` and an onnxruntime session per entry of :data:`SESSIONS` in a child process.

    Returns what was checked (``report.json`` ``"handover"``); raises :class:`HandoverError` naming
    ``last_pass`` on the first failure.
    """
    path = Path(path)
    start = time.perf_counter()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError, ...
        raise _fail(path, last_pass, f"fails onnx.checker (full check): {type(e).__name__}: "
                                     f"{_last_line(str(e)) or 'no message'}") from None
    checked = time.perf_counter()
    levels = ["default" if level is None else level for _, level in SESSIONS]
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), *levels], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise _fail(path, last_pass, f"did not load in onnxruntime within {timeout:.0f} s") from None
    if proc.returncode != 0:
        started = [line for line in proc.stdout.split() if line.isdigit()]
        which = SESSIONS[int(started[-1])][0] if started else "a session"
        version = _ort_version()
        if proc.returncode < 0:
            try:
                sig = signal.Signals(-proc.returncode).name
            except ValueError:
                sig = f"signal {-proc.returncode}"
            detail = _last_line(proc.stderr)
            raise _fail(path, last_pass, f"aborts onnxruntime {version} ({sig}) creating a session with {which}"
                                         + (f": {detail}" if detail else ""))
        raise _fail(path, last_pass, f"does not load in onnxruntime {version} with {which}: "
                                     f"{_last_line(proc.stderr) or f'exit status {proc.returncode}'}")
    return {"file": path.name, "onnx_checker": "full_check",
            "onnxruntime": _ort_version(), "sessions": [name for name, _ in SESSIONS],
            "seconds": {"checker": round(checked - start, 3), "onnxruntime": round(time.perf_counter() - checked, 3)}}


# --- node names ---------------------------------------------------------------------------------

def _subgraphs(node: gs.Node):
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, gs.Graph))


def unique_node_names(graph: gs.Graph) -> int:
    """Rename nodes so that no two nodes of ``graph`` (its subgraphs included) share a non-empty
    name: the second ``n`` becomes ``n_2`` (or the next free suffix). Returns how many were renamed.
    Unnamed nodes stay unnamed (ONNX and onnxruntime allow any number of them)."""
    nodes: list[gs.Node] = []
    todo = [graph]
    while todo:
        g = todo.pop()
        for node in g.nodes:
            nodes.append(node)
            todo.extend(_subgraphs(node))
    taken = {n.name for n in nodes if n.name}
    seen: set[str] = set()
    renamed = 0
    for node in nodes:
        if not node.name:
            continue
        if node.name in seen:
            k = 2
            while f"{node.name}_{k}" in taken:
                k += 1
            node.name = f"{node.name}_{k}"
            taken.add(node.name)
            renamed += 1
        seen.add(node.name)
    return renamed
