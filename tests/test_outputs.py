"""Issue 18 items 2, 3 and 7: what ``-o`` may overwrite (the build marker, ``--force``, the input
model never removed, ``-o .``), every output path checked before any work (one ``error:`` line,
exit status 2), output files with a plain file's permissions, and ``--json-result``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import edgefc
from edgefc import staging
from edgefc.errors import OutputError
from tests.cli import assert_user_error, run_cli
from tests.synthetic import mlp_model

FAST = ("--passes", "canonicalize")


@pytest.fixture
def mlp(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    return path


def _compile(*args, cwd=None):
    return run_cli("compile", *args, *FAST, cwd=cwd)


# --- -o onto an existing folder ----------------------------------------------------------------------

def _api(model, out, **kw):
    return edgefc.compile(model, None, passes=["canonicalize"], output=out, **kw)


def test_compiling_into_the_folder_of_the_input_keeps_the_input(tmp_path):
    """Issue 18 item 2: ``edgefc compile m2/dyn.onnx --shape x=2x8 -o m2`` removed m2/dyn.onnx."""
    m2 = tmp_path / "m2"
    m2.mkdir()
    onnx.save(mlp_model(dynamic_batch=True), str(m2 / "dyn.onnx"))
    (m2 / "notes.txt").write_text("mine")
    rc, text = _compile(str(m2 / "dyn.onnx"), "--shape", "x=2x8", "-o", str(m2))
    assert_user_error(rc, text, "not empty and not an edgefc build", "--force")
    assert sorted(p.name for p in m2.iterdir()) == ["dyn.onnx", "notes.txt"]
    _api(m2 / "dyn.onnx", m2, shapes={"x": (2, 8)}, force=True)
    assert (m2 / "dyn.onnx").is_file() and (m2 / "notes.txt").read_text() == "mine"
    assert {"model.onnx", "report.json", staging.MARKER} <= {p.name for p in m2.iterdir()}
    # a second compile into it replaces the build's files and keeps the others, without force
    _api(m2 / "dyn.onnx", m2, shapes={"x": (2, 8)})
    assert (m2 / "dyn.onnx").is_file() and (m2 / "notes.txt").read_text() == "mine"
    assert not list(m2.glob(".edgefc-tmp-*"))


def test_dot_output_never_empties_the_current_folder(tmp_path, mlp, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.py").write_text("print(1)")
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match="not an edgefc build"):
        _api(mlp, ".")
    _api(mlp, ".", force=True)
    assert (work / "keep.py").read_text() == "print(1)" and (work / "model.onnx").is_file()
    _api(mlp, ".")  # now a build, with a file of mine beside it
    assert (work / "keep.py").is_file() and work.is_dir() and Path.cwd() == work


def test_the_input_model_is_never_replaced_even_with_force(tmp_path):
    build = tmp_path / "b"
    build.mkdir()
    onnx.save(mlp_model(), str(build / "model.onnx"))
    before = (build / "model.onnx").read_bytes()
    rc, text = _compile(str(build / "model.onnx"), "-o", str(build), "--force")
    assert_user_error(rc, text, "would replace the input")
    with pytest.raises(OutputError, match="would replace the input"):
        _api(build / "model.onnx", build)
    assert (build / "model.onnx").read_bytes() == before


def test_recompiling_a_build_into_itself_is_refused(tmp_path, mlp):
    out = tmp_path / "b"
    _api(mlp, out)
    with pytest.raises(OutputError, match="would replace the input"):
        _api(out / "model.onnx", out)
    assert (out / "model.onnx").is_file()


def test_replacing_a_build_removes_only_its_files(tmp_path, mlp):
    out = tmp_path / "b"
    edgefc.compile(mlp, "exynos2400", passes=["canonicalize", "fuse"], dump_after=["fuse"], output=out)
    marker = json.loads((out / staging.MARKER).read_text())
    assert set(marker["files"]) == {"model.onnx", "report.json", "profile.json", "after-fuse.onnx"}
    (out / "mine.txt").write_text("x")
    _api(mlp, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([staging.MARKER, "mine.txt", "model.onnx", "report.json"])


def test_older_builds_without_a_marker_are_recognised(tmp_path, mlp):
    out = tmp_path / "old"
    _api(mlp, out)
    (out / staging.MARKER).unlink()
    assert staging.build_files(out) is not None
    _api(mlp, out)
    (out / staging.MARKER).unlink()
    (out / "x.txt").write_text("")
    assert staging.build_files(out) is None


def test_empty_folder_is_fine_and_a_file_is_not(tmp_path, mlp):
    (tmp_path / "empty").mkdir()
    _api(mlp, tmp_path / "empty")
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        _api(mlp, tmp_path / "f")


# --- output paths checked before any work --------------------------------------------------------------

def test_unwritable_build_folders_are_one_line(tmp_path, mlp):
    (tmp_path / "mk.py").write_text("")
    rc, text = run_cli("compile", str(mlp), "-o", "mk.py/sub", cwd=tmp_path)
    assert_user_error(rc, text, "-o mk.py/sub", "is a file")
    assert "canonicalize" not in text  # refused before any pass ran
    for where, needle in (("/proc/edgefc-x", "cannot write"), (tmp_path / "mk.py", "not a folder"),
                          (tmp_path / "mk.py" / "sub", "is a file")):
        with pytest.raises(OutputError, match=needle):
            _api(mlp, where)


def test_read_only_folder(tmp_path, mlp):
    """An existing folder nothing may be written into: an immutable one (``chattr +i``, refused even
    to root), else ``/proc/self`` (where no file can be created) when chattr is not available."""
    ro = tmp_path / "ro"
    ro.mkdir()
    immutable = subprocess.run(["chattr", "+i", str(ro)], capture_output=True, check=False).returncode == 0
    try:
        with pytest.raises(OutputError, match="cannot write into"):
            _api(mlp, (ro if immutable else Path("/proc/self")) / "b")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=False)


def test_output_checks_in_python():
    with pytest.raises(OutputError, match="does not exist"):
        staging.check_output_file("/nonexistent-dir-edgefc/x.csv", "--csv")
    with pytest.raises(OutputError, match="cannot write"):
        staging.check_output_file("/proc/x.csv", "--csv")
    assert staging.check_output_file("/dev/null", "--csv") == Path("/dev/null")


# --- permissions --------------------------------------------------------------------------------------

def test_profile_outputs_and_build_files_are_0644_under_umask_022(tmp_path, mlp):
    code = ("import os, sys; os.umask(0o022); from edgefc.cli import main; main()")
    out = tmp_path / "b"
    files = {k: tmp_path / f"p.{k}" for k in ("json", "csv", "trace", "plot")}
    for args in (["compile", str(mlp), "-o", str(out)],
                 ["profile", str(mlp), "--json", str(files["json"]), "--csv", str(files["csv"]),
                  "--trace", str(files["trace"]), "--plot", str(files["plot"])]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    for f in [*files.values(), *(p for p in out.iterdir())]:
        assert f.stat().st_mode & 0o777 == 0o644, (f, oct(f.stat().st_mode))


# --- --json-result ----------------------------------------------------------------------------------

def test_json_result_for_ci(tmp_path, mlp):
    res = tmp_path / "r.json"
    rc, text = run_cli("compile", str(mlp), "-o", str(tmp_path / "b"), "--json-result", str(res), "--quiet")
    assert rc == 0, text
    assert "canonicalize" not in text  # --quiet: no per-pass lines
    data = json.loads(res.read_text())
    assert data["status"] == "ok" and data["exit_status"] == 0 and data["build"] == str(tmp_path / "b")
    assert data["files"] == ["model.onnx", "profile.json", "report.json"]
    assert [p["name"] for p in data["passes"]][0] == "canonicalize" and data["profile"]["total_ms"] > 0
    rc, text = run_cli("compile", str(tmp_path / "missing.onnx"), "--json-result", str(res))
    assert_user_error(rc, text, "model file not found")
    data = json.loads(res.read_text())
    assert data == {"status": "error", "exit_status": 2, "error": f"model file not found: {tmp_path / 'missing.onnx'}"}


def test_json_result_path_is_checked_first(tmp_path, mlp):
    rc, text = run_cli("compile", str(mlp), "-o", str(tmp_path / "b"), "--json-result", str(tmp_path / "no" / "r.json"))
    assert_user_error(rc, text, "--json-result", "does not exist")
    assert not (tmp_path / "b").exists()


# --- the Python API --------------------------------------------------------------------------------

def test_api_refuses_a_foreign_folder_unless_forced(tmp_path, mlp):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "a.txt").write_text("a")
    with pytest.raises(OutputError, match="not an edgefc build"):
        edgefc.compile(mlp, None, passes=["canonicalize"], output=out)
    edgefc.compile(mlp, None, passes=["canonicalize"], output=out, force=True)
    assert (out / "a.txt").read_text() == "a" and (out / "model.onnx").is_file()


def test_stale_inside_staging_of_a_killed_forced_run_is_removed(tmp_path, mlp):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "a.txt").write_text("a")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f".edgefc-tmp-{dead.pid}-xyz").mkdir()
    _api(mlp, out, force=True)
    assert not list(out.glob(".edgefc-tmp-*")) and (out / "a.txt").is_file()


def test_a_failed_compile_leaves_no_parent_folders_it_created(tmp_path, mlp):
    from edgefc.registry import is_known

    if not is_known("fails-in-test-outputs"):
        @edgefc.register_pass("fails-in-test-outputs")
        class Fails(edgefc.Pass):
            """Raises (a pass that fails after the staging folder exists)."""

            def run(self, graph, ctx):
                raise edgefc.errors.PassError("this pass always fails")

    out = tmp_path / "new" / "deeper" / "b"
    with pytest.raises(edgefc.errors.PassError, match="always fails"):
        edgefc.compile(mlp, None, passes=["canonicalize", "fails-in-test-outputs"], output=out)
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == [mlp]
