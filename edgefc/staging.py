"""Build folders written atomically: a staging folder beside the destination, renamed at the end.

``edgefc compile -o build/unet`` writes into ``build/.unet.tmp-<pid>-<random>`` and renames it to
``build/unet`` only when everything is written, so an error, Ctrl-C or SIGTERM (what CI time-outs
and process managers send; the CLI turns it into the same clean-up as Ctrl-C) leaves nothing
half-written. A run killed outright (SIGKILL, power loss) cannot clean up after itself: the next
run into the same place removes the staging folders whose process is gone. Folders are created
with the permissions the umask gives (``mkdtemp`` alone would make them 0700, unreadable by
other users and containers).

What ``-o`` may replace (:func:`plan_output`, :func:`commit`): every build folder holds a marker
file, :data:`MARKER` (JSON: the edgefc version and the files the build wrote). A missing or empty
folder, or an edgefc build (the marker, or an older build: ``report.json`` with ``passes`` beside
only files a build writes), is written by renaming the staging folder into place; the files of
the build it replaces go, anything else in it stays. Any other non-empty folder is refused (one
line, exit 2) unless ``--force``, which writes the build's files into it, replacing same-named
files, and keeps everything else. The input model (and its external data) is never replaced or
removed, whatever the flags; ``-o .`` (or a folder holding the current directory) is written file
by file, never renamed away. Before any work, :func:`check_output_folder` and
:func:`check_output_file` make sure an output can be written at all (a missing parent folder, a
file where a folder is needed, /proc, a read-only or immutable folder: one line, exit 2).

Temporary folders (:func:`temp_dir`, e.g. quantization's ``edgefc-quant-PID-*``) carry their
process id, so the next run removes those of a run killed outright once that process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgefc.errors import OutputError

#: staging folders of an older edgefc (no process id in the name) are removed after this long
LEGACY_STALE_SECONDS = 3600


def umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def make_dir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """``tempfile.mkdtemp`` with the mode a plain ``mkdir`` would get (0777 less the umask)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~umask())
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(output: Path) -> list[Path]:
    """Remove the staging (``.NAME.tmp-PID-*``) and replaced (``.NAME.old-PID``) folders beside
    ``output`` whose process no longer runs. Returns what was removed."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.(?:tmp-(\d+)-.+|old-(\d+)|tmp-[^-]+)$")
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        pid = m.group(1) or m.group(2)
        if pid is not None:
            stale = int(pid) != os.getpid() and not _alive(int(pid))
        else:  # an older edgefc's staging folder (no process id): stale once untouched for a while
            try:
                stale = time.time() - p.stat().st_mtime > LEGACY_STALE_SECONDS
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def staging_dir(output: Path) -> Path:
    """A fresh staging folder beside ``output`` (after removing stale ones of killed runs)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    return make_dir(f".{output.name}.tmp-{os.getpid()}-", output.parent)


def remove_stale_inside(folder: Path) -> list[Path]:
    """Remove the staging folders (``.edgefc-tmp-PID-*``) that a killed run writing file by file
    into ``folder`` (``--force``, ``-o .``) left inside it."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = re.match(r"^\.edgefc-tmp-(\d+)-.+$", p.name)
        if m and p.is_dir() and not p.is_symlink() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# --- temporary folders that name their process -----------------------------------------------------

@contextlib.contextmanager
def temp_dir(kind: str):
    """A temporary folder ``edgefc-KIND-PID-*`` in the system's temporary directory, removed on exit
    (also on Ctrl-C / SIGTERM, which unwind). Folders of the same kind whose process is gone (a run
    killed outright) are removed first."""
    root = Path(tempfile.gettempdir())
    pattern = re.compile(rf"^edgefc-{re.escape(kind)}-(\d+)-.+$")
    try:
        entries = list(root.iterdir())
    except OSError:
        entries = []
    for p in entries:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"edgefc-{kind}-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- can an output be written at all? ---------------------------------------------------------------

def _probe(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (None if it can): creates and removes one."""
    try:
        fd, name = tempfile.mkstemp(prefix=".edgefc-probe-", dir=folder)
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return None


def _existing_ancestor(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path("/")


def check_output_folder(path: str | os.PathLike, option: str = "-o") -> Path:
    """Fail (one-line :class:`OutputError`) unless a folder can be written at ``path``: it is a
    folder or does not exist yet, and the nearest existing folder above it (which missing parents
    are created under) accepts new files. Creates nothing. Returns the absolute path."""
    p = Path(os.path.abspath(path))
    if p.exists() and not p.is_dir():
        raise OutputError(f"{option} {path}: exists and is not a folder")
    anc = _existing_ancestor(p)
    if not anc.is_dir():
        raise OutputError(f"{option} {path}: {anc} is a file, not a folder")
    where = p if p.exists() else anc
    why = _probe(where)
    if why is not None:
        raise OutputError(f"{option} {path}: cannot write into {where} ({why})")
    return p


def check_output_file(path: str | os.PathLike, option: str = "-o", *, protect=(), create_parents: bool = False) -> Path:
    """Fail (one-line :class:`OutputError`) unless a file can be written at ``path``: its folder
    exists (or, with ``create_parents``, can be created under the nearest existing folder) and
    accepts new files, ``path`` is not a folder, and it is none of the ``protect`` files (the
    command's inputs). An existing device or pipe (``/dev/null``) is accepted if writable.
    Creates nothing. Returns the absolute path."""
    p = Path(os.path.abspath(path))
    for q in protect:
        if q is not None and _same_file(p, Path(q)):
            raise OutputError(f"{option} {path}: that is an input of this command; choose another file")
    if p.is_dir():
        raise OutputError(f"{option} {path}: is a folder; give a file name")
    if p.exists() and not p.is_file():
        if os.access(p, os.W_OK):
            return p
        raise OutputError(f"{option} {path}: cannot write to it")
    anc = _existing_ancestor(p.parent)
    if not anc.is_dir():
        raise OutputError(f"{option} {path}: {anc} is a file, not a folder")
    if anc != p.parent and not create_parents:
        raise OutputError(f"{option} {path}: the output folder {p.parent} does not exist")
    why = _probe(anc)
    if why is not None:
        raise OutputError(f"{option} {path}: cannot write into {anc} ({why})")
    return p


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# --- build folders: what -o may replace ---------------------------------------------------------------

#: the marker every build folder holds: JSON with the edgefc version and the files the build wrote
MARKER = ".edgefc-build"

#: names a build writes (an older build without the marker is recognised by holding only these)
BUILD_FILE_PATTERNS = (r"model\.onnx", r"model\.onnx\.data", r"report\.json", r"profile\.json", r"after-.+\.onnx",
                       r"after-.+\.onnx\.data", r"host_local\.so", r"host_aarch64\.so", r"npu_programs\.json",
                       r"host_params\.bin", r"tvm\.json", re.escape(MARKER))


def _is_build_file_name(name: str) -> bool:
    return any(re.fullmatch(pat, name) for pat in BUILD_FILE_PATTERNS)


def build_files(folder: Path) -> list[str] | None:
    """The files of the edgefc build in ``folder`` (its marker's list, or for an older build every
    entry), or None if ``folder`` is no edgefc build."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            files = None
        if isinstance(files, list) and all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..") for f in files):
            return [f for f in files if f != MARKER] + [MARKER]
        return None
    try:
        names = [p.name for p in folder.iterdir()]
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(report, dict) and "passes" in report and all(_is_build_file_name(n) for n in names):
        return names
    return None


def write_marker(folder: Path, files: list[str], info: dict | None = None) -> None:
    """Write :data:`MARKER` into ``folder`` listing ``files`` (atomically)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("edgefc")
    except PackageNotFoundError:  # pragma: no cover - a source checkout without installation
        v = "unknown"
    body = {"edgefc_build": 1, "edgefc": v, "files": sorted(set(files) - {MARKER}), **(info or {})}
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, folder / MARKER)


@dataclass
class OutputPlan:
    """Where and how a build folder is written (:func:`plan_output`)."""

    path: Path
    #: "rename": staged beside ``path`` and renamed into place (a missing or empty folder, or an
    #: edgefc build with nothing else in it); "into": staged inside ``path``, files moved in one by
    #: one (``--force`` into another folder, a build with other files beside it, ``-o .``)
    mode: str
    protect: list[Path] = field(default_factory=list)
    old_files: list[str] = field(default_factory=list)
    staging: Path | None = None
    #: parent folders that did not exist and were created for the build (removed again on failure)
    created: list[Path] = field(default_factory=list)


def _entries(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir()]
    except OSError:
        return []


def plan_output(path: str | os.PathLike, *, force: bool = False, protect=(), option: str = "-o") -> OutputPlan:
    """Decide how the build folder ``path`` is written, or refuse (one-line :class:`OutputError`),
    before any work (module docstring). ``protect``: the input model and its external data."""
    out = check_output_folder(path, option)
    protect = [Path(os.path.abspath(q)) for q in protect if q is not None]
    cwd = Path.cwd().resolve()
    holds_cwd = out.exists() and (out.resolve() == cwd or out.resolve() in cwd.parents)
    if not out.exists():
        return OutputPlan(out, "rename", protect)
    names = [n for n in _entries(out) if not re.match(r"^\.edgefc-tmp-\d+-", n)]
    files = build_files(out) if names else []
    for q in protect:
        if q.parent.resolve() == out.resolve() and (q.name in (files or []) or _is_build_file_name(q.name)):
            raise OutputError(f"{option} {path}: the build would replace the input {q}; write it to another folder")
    if files is None:
        if not force:
            raise OutputError(f"{option} {path}: the folder is not empty and not an edgefc build "
                              f"({len(names)} entr{'y' if len(names) == 1 else 'ies'}, e.g. {sorted(names)[0]}); "
                              f"choose another folder, or add --force to write the build's files into it "
                              f"(other files are kept)")
        files = []
    foreign = [n for n in names if n not in files]
    mode = "into" if (foreign or holds_cwd) else "rename"
    return OutputPlan(out, mode, protect, [f for f in files if f in names])


def start(plan: OutputPlan) -> Path:
    """Create the staging folder of ``plan`` (removing stale ones of killed runs) and return it."""
    if plan.mode == "rename":
        plan.created = [q for q in plan.path.parents if not q.exists()]
        plan.staging = staging_dir(plan.path)
    else:
        remove_stale_inside(plan.path)
        plan.staging = make_dir(f".edgefc-tmp-{os.getpid()}-", plan.path)
    return plan.staging


def abort(plan: OutputPlan) -> None:
    """Remove the staging folder of ``plan`` and the parent folders created for it if they are
    still empty (nothing else)."""
    if plan.staging is not None:
        shutil.rmtree(plan.staging, ignore_errors=True)
        plan.staging = None
    for q in plan.created:  # innermost first
        with contextlib.suppress(OSError):
            q.rmdir()


def commit(plan: OutputPlan, info: dict | None = None) -> Path:
    """Move the staged build into place (after writing its marker). In ``rename`` mode the folder
    is renamed into place and the old build (its files only) removed; in ``into`` mode each file
    replaces its namesake and the old build's files the new one does not write are removed. The
    protected files are never touched."""
    tmp, out = plan.staging, plan.path
    new = sorted(p.name for p in tmp.iterdir())
    for q in plan.protect:
        if q.parent.resolve() == out.resolve() and q.name in set(new) | set(plan.old_files):
            raise OutputError(f"-o {out}: the build would replace the input {q}; write it to another folder")
    write_marker(tmp, new, info)
    new.append(MARKER)
    if plan.mode == "rename":
        if out.exists():
            names = _entries(out)
            if any(n not in plan.old_files for n in names):  # someone put files there meanwhile: keep them
                plan.mode = "into"
        if plan.mode == "rename":
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
            plan.staging = None
            return out
        # fall through: the staging folder is beside; move file by file (same file system)
    for name in new:
        if name != MARKER:
            os.replace(tmp / name, out / name)
    for name in plan.old_files:
        if name not in new and name != MARKER and not any(q == out / name for q in plan.protect):
            with contextlib.suppress(OSError):
                (out / name).unlink()
    os.replace(tmp / MARKER, out / MARKER)
    shutil.rmtree(tmp, ignore_errors=True)
    plan.staging = None
    return out


# --- single files, written atomically with a plain file's permissions ------------------------------

def write_file(path: str | os.PathLike, write) -> Path:
    """Write one output file atomically: ``write(tmp_path)`` fills a temporary file beside ``path``,
    which gets the mode a plain ``open(path, "w")`` would give (0666 less the umask: 0644 under
    022, not ``mkstemp``'s 0600) and is renamed onto ``path``; on any error it is removed. A
    device or pipe (``/dev/null``, ``/dev/stdout``) is written directly."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        write(path)
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_file(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_file` of a text."""
    return write_file(path, lambda p: Path(p).write_text(text))
