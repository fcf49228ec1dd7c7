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
   assertion, a segfault) is caught and reported instead of ending the compile. The child stays up
   for the next build of the same process (models up to :data:`KEEP_WORKER_BYTES`) and is started
   again after it died.

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

# The child: it reads one JSON request per line ({"path": ..., "levels": [...]}) and creates one
# session per level, announcing each on stdout first ("start I", so that when it dies by a signal the
# parent knows which one), then "ok", or "fail I <message>" for a Python-level error. It stays up for
# the next request (a compile in a long-lived process, the test suite: one start-up, not one per
# build) and ends when its stdin closes (the parent exited) or it dies (it is started again).
_CHILD = r"""
import json, sys
import onnxruntime as ort
for line in sys.stdin:
    req = json.loads(line)
    for i, level in enumerate(req["levels"]):
        print(f"start {i}", flush=True)
        opts = ort.SessionOptions()
        if level != "default":
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        opts.log_severity_level = 3
        try:
            sess = ort.InferenceSession(req["path"], opts, providers=["CPUExecutionProvider"])
            del sess
        except Exception as e:
            text = " ".join(str(e).split())
            print(f"fail {i} {type(e).__name__}: {text[:400]}", flush=True)
            break
    else:
        print("ok", flush=True)
    try:  # hand the session's memory back: the child waits for the next build
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
"""


class _Worker:
    """The child process that loads models in onnxruntime (:data:`_CHILD`). A thread reads its
    answers line by line into a queue (so a timeout never hangs on a buffered pipe); its stderr
    goes to a temporary file, read when it dies (a C++ assertion's message)."""

    def __init__(self):
        import queue
        import tempfile
        import threading

        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # EOF: the child ended

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, path: Path, levels: list[str], timeout: float) -> tuple[str, list[str]]:
        """Send one request; returns ("ok" | "fail" | "died" | "timeout", the lines it answered)."""
        import json
        import queue

        try:
            self.proc.stdin.write(json.dumps({"path": str(path), "levels": levels}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # it died before the request
            self.proc.wait()
            return "died", []
        lines: list[str] = []
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return "timeout", lines
            if line is None:
                self.proc.wait()
                return "died", lines
            lines.append(line)
            if line == "ok" or line.startswith("fail "):
                return line.split(" ", 1)[0], lines

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self.err.close()


_worker: _Worker | None = None

#: the loading child stays up for the next build after models up to this size (weights included)
KEEP_WORKER_BYTES = 256 << 20


def _model_bytes(path: Path) -> int:
    """The model file and the external data files beside it that follow its name."""
    try:
        return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))
    except OSError:
        return 0


def _load_in_child(path: Path, levels: list[str], timeout: float) -> tuple[str, list[str], int | None, str]:
    """Ask the worker (started if needed) to load ``path``; (outcome, lines, exit status, stderr)."""
    global _worker
    if _worker is None or not _worker.alive():
        if _worker is not None:
            _worker.close()
        try:
            _worker = _Worker()
        except OSError as e:
            return "died", [], None, f"cannot start a process to load it in: {e}"
    outcome, lines = _worker.request(path, levels, timeout)
    if outcome in ("died", "timeout"):
        w, _worker = _worker, None
        if outcome == "timeout":
            w.proc.kill()
        w.proc.wait()
        err = w.stderr()
        status = w.proc.returncode
        w.close()
        return outcome, lines, status, err
    return outcome, lines, None, ""


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
    outcome, lines, status, err = _load_in_child(path.resolve(), levels, timeout)
    if _worker is not None and _model_bytes(path) > KEEP_WORKER_BYTES:
        _worker.close()  # a large model: do not keep a process that has held it around
        globals()["_worker"] = None
    started = [int(line.split()[1]) for line in lines if line.startswith("start ")]
    which = SESSIONS[started[-1]][0] if started else "a session"
    version = _ort_version()
    if outcome == "timeout":
        raise _fail(path, last_pass, f"did not load in onnxruntime within {timeout:.0f} s (creating a session with "
                                     f"{which})")
    if outcome == "died":
        if status is not None and status < 0:
            try:
                sig = signal.Signals(-status).name
            except ValueError:
                sig = f"signal {-status}"
            how = f"aborts onnxruntime {version} ({sig})"
        else:
            how = f"ends onnxruntime {version}'s process (exit status {status})"
        detail = _last_line(err)
        raise _fail(path, last_pass, f"{how} creating a session with {which}" + (f": {detail}" if detail else ""))
    if outcome == "fail":
        message = lines[-1].split(" ", 2)[2] if len(lines[-1].split(" ", 2)) > 2 else "no message"
        raise _fail(path, last_pass, f"does not load in onnxruntime {version} with {which}: {message}")
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
