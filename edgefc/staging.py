"""Build folders written atomically: a staging folder beside the destination, renamed at the end.

``edgefc compile -o build/unet`` writes into ``build/.unet.tmp-<pid>-<random>`` and renames it to
``build/unet`` only when everything is written, so an error, Ctrl-C or SIGTERM (what CI time-outs
and process managers send; the CLI turns it into the same clean-up as Ctrl-C) leaves nothing
half-written. A run killed outright (SIGKILL, power loss) cannot clean up after itself: the next
run into the same place removes the staging folders whose process is gone. Folders are created
with the permissions the umask gives (``mkdtemp`` alone would make them 0700, unreadable by
other users and containers).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

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
