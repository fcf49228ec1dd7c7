"""Issue 18 item 4: progress as it happens. Per-pass lines reach a log or pipe when each pass ends
(not at the end of the compile), evaluation progress comes per sample, the SQNR measurement says
what it does and how to skip it, ``--quiet`` prints no progress; killed runs' quantization folders
are removed by the next run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

import edgefc
from edgefc import staging
from tests.synthetic import mlp_model

_SLOW_PLUGIN = '''
import time
from pathlib import Path
import edgefc

@edgefc.register_pass("slow")
class Slow(edgefc.Pass):
    """Waits (for the progress test)."""

    def run(self, graph, ctx):
        Path({marker!r}).touch()
        time.sleep(120)
        return graph
'''


@pytest.fixture
def mlp(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    return path


def test_per_pass_lines_reach_a_pipe_as_each_pass_ends(tmp_path, mlp):
    plugin = tmp_path / "slow.py"
    marker = tmp_path / "slow-started"
    plugin.write_text(_SLOW_PLUGIN.format(marker=str(marker)))
    proc = subprocess.Popen([sys.executable, "-c", "from edgefc.cli import main; main()", "compile", str(mlp),
                             "--plugin", str(plugin), "--passes", "canonicalize,slow", "-o", str(tmp_path / "b")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "timed out"
            time.sleep(0.05)
        time.sleep(0.5)
        os.set_blocking(proc.stdout.fileno(), False)
        said = (proc.stdout.read() or b"").decode()
        assert said.lstrip().startswith("canonicalize") and " s  nodes " in said, said
    finally:
        proc.kill()
        proc.communicate()


def _cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-c", "from edgefc.cli import main; main()", *args], capture_output=True,
                          text=True, check=False, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


def test_evaluation_progress_per_sample_and_how_to_skip_it(tmp_path, mlp):
    rc, out, err = _cli("compile", str(mlp), "--precision", "w8a16", "--calib-samples", "2", "--eval-samples", "3",
                        "-o", str(tmp_path / "b"))
    assert rc == 0, err
    assert "quantize: measuring SQNR vs FP32 on 3 generated inputs" in err and "--eval-samples 0 skips it" in err, err
    for i in (1, 2, 3):
        assert f"  evaluating (deployed): {i}/3 done" in err, err
    assert "\r" not in err  # no progress bars in a log
    assert "  handover: model.onnx" in err
    rc, out, err = _cli("compile", str(mlp), "--precision", "w8a16", "--calib-samples", "1", "--eval-samples", "1",
                        "-o", str(tmp_path / "b"), "--quiet")
    assert rc == 0, err
    assert err == "" and [ln.split(":")[0] for ln in out.splitlines()] == ["fusion", "precision", "tiling", "target",
                                                                          "build"], out


def test_quantization_folders_of_killed_runs_are_removed(tmp_path, monkeypatch, mlp):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"edgefc-quant-{dead.pid}-abc"
    alive = tmp_path / f"edgefc-quant-{os.getppid()}-def"   # a run still going: kept
    older = tmp_path / "edgefc-quant-xyz"                    # no process id: not ours to judge
    for p in (stale, alive, older):
        (p / "sub").mkdir(parents=True)
    edgefc.compile(mlp, "exynos2400", options={"precision": "w8a16", "calib_samples": 1, "eval_samples": 0,
                                               "progress": False})
    assert not stale.exists() and alive.exists() and older.exists()
    assert not list(tmp_path.glob(f"edgefc-quant-{os.getpid()}-*"))  # its own folder is gone too
    with staging.temp_dir("quant") as d:
        assert d.name.startswith(f"edgefc-quant-{os.getpid()}-") and d.is_dir()
    assert not d.exists()
