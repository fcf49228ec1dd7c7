"""Running the real ``edgefc`` entry point as a user does, for the CLI error-path tests."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, cwd=None) -> tuple[int, str]:
    """Run ``edgefc ARGS`` in a subprocess; (exit status, stdout + stderr)."""
    proc = subprocess.run([sys.executable, "-c", "from edgefc.cli import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def assert_user_error(rc: int, out: str, *needles: str, status: int = 2) -> None:
    """Exit status 2 (or ``status``), no traceback, exactly one line besides the progress lines a
    command prints as it goes (indented: ``  canonicalize  0.12 s ...``), starting with
    ``error:`` and containing every needle."""
    assert rc == status, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("  ")]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
