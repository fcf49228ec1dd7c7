"""Core: loading, the pass registry and manager, canonicalize, and the compile CLI's error paths."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edgefc
from edgefc import ort
from edgefc.cli import cli
from tests.cli import assert_user_error, run_cli
from tests.synthetic import mlp_model, save_with_escaping_external_data, save_with_external_data


@pytest.fixture
def mlp(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save_model(mlp_model(), str(path))
    return path




# --- loading ---------------------------------------------------------------------------------

def test_load_runs_shape_inference(mlp):
    graph = edgefc.load(mlp)
    assert graph.tensors()["mm"].shape == [2, 16]


def test_load_external_data_roundtrip(tmp_path):
    path = save_with_external_data(mlp_model(), tmp_path / "m.onnx")
    graph = edgefc.load(path)
    out = edgefc.save(graph, tmp_path / "copy" / "m.onnx")
    feeds = ort.random_inputs(graph)
    np.testing.assert_array_equal(ort.run(str(path), feeds)["y"], ort.run(str(out), feeds)["y"])


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(edgefc.ir, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(edgefc.ir, "EXTERNAL_TENSOR_MIN_BYTES", 100)
    out = edgefc.save(edgefc.load(save_with_external_data(mlp_model(), tmp_path / "m.onnx")), tmp_path / "o" / "m.onnx")
    model = onnx.load(str(out), load_external_data=False)
    external = [t for t in model.graph.initializer if onnx.external_data_helper.uses_external_data(t)]
    assert external
    # the data file holds exactly the external tensors' bytes, where their entries say
    spans = []
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "m.onnx.data"
        spans.append((int(info.get("offset", 0)), int(info["length"])))
        assert int(info["length"]) == int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    assert (tmp_path / "o" / "m.onnx.data").stat().st_size == max(o + n for o, n in spans)
    reloaded = onnx.load(str(out))
    original = {t.name: onnx.numpy_helper.to_array(t) for t in mlp_model().graph.initializer}
    for t in reloaded.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), original[t.name])
    assert list((tmp_path / "o").iterdir()).__len__() == 2  # no temporary folder left


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "no-external-data", "escaping", "short-data"])
def test_load_errors(tmp_path, case):
    path = tmp_path / "m.onnx"
    if case == "garbage":
        path.write_bytes(b"not an onnx model")
    elif case == "truncated":
        onnx.save_model(mlp_model(), str(path))
        path.write_bytes(path.read_bytes()[:150])
    elif case in ("no-external-data", "short-data"):
        save_with_external_data(mlp_model(), path)
        data = tmp_path / "weights.bin"
        if case == "short-data":
            data.write_bytes(data.read_bytes()[:10])
        else:
            data.unlink()
    elif case == "escaping":
        path = save_with_escaping_external_data(tmp_path / "sub")
    with pytest.raises(edgefc.ModelLoadError) as e:
        edgefc.load(path)
    msg = str(e.value)
    assert "\n" not in msg
    if case in ("no-external-data", "short-data"):
        assert "weights.bin" in msg
    if case == "escaping":
        assert "leaves the model's folder" in msg


# --- passes ------------------------------------------------------------------------------------

def test_canonicalize_removes_noops_and_keeps_numerics(mlp):
    graph = edgefc.load(mlp)
    feeds = ort.random_inputs(graph, seed=1)
    ref = ort.run(str(mlp), feeds)
    out = edgefc.PassManager(["canonicalize"]).run(graph, edgefc.PassContext())
    ops = [n.op for n in out.nodes]
    assert "Identity" not in ops and "Cast" not in ops and "Reshape" not in ops, ops
    assert out.opset == 23
    assert [t.name for t in out.outputs] == ["y"]
    ort.check(ref, ort.run(edgefc.ir.to_model(out), feeds), 1e-6)


def test_canonicalize_needs_static_shapes(tmp_path):
    path = tmp_path / "dyn.onnx"
    onnx.save_model(mlp_model(dynamic_batch=True), str(path))
    with pytest.raises(edgefc.ShapeError, match="--shape x="):
        edgefc.compile(path, None, passes=["canonicalize"])
    result = edgefc.compile(path, None, passes=["canonicalize"], shapes={"x": (3, 8)})
    assert result.report["outputs"][0]["shape"] == [3, 16]


def test_register_pass_duplicate_id_is_an_error():
    @edgefc.register_pass("dup-test", namespace="test")
    def dup(graph, ctx):
        return graph

    try:
        with pytest.raises(edgefc.PassError, match="already registered"):
            edgefc.register_pass("dup-test", namespace="test")(dup)
    finally:
        edgefc.registry.unregister_pass("test::dup-test")


def test_pass_lookup_by_id_and_short_name():
    assert edgefc.get_pass("canonicalize").id == "edgefc::canonicalize"
    assert edgefc.get_pass("edgefc::canonicalize").name == "canonicalize"
    with pytest.raises(edgefc.PassError, match="unknown pass 'nope'"):
        edgefc.get_pass("nope")


def test_pass_manager_records_time_and_node_counts(mlp):
    pm = edgefc.PassManager(["canonicalize"])
    pm.run(edgefc.load(mlp))
    (rec,) = pm.records
    assert rec.name == "canonicalize" and rec.nodes_before == 6 and rec.nodes_after == 3
    assert 0 < rec.seconds < 60 and rec.as_dict()["seconds"] == rec.seconds


def test_verify_names_the_pass_that_breaks_numerics(mlp):
    @edgefc.register_pass("break-it", namespace="test")
    def break_it(graph, ctx):
        graph.nodes[0].inputs[1].values = graph.nodes[0].inputs[1].values * 1.01  # perturb the weight
        return graph

    try:
        with pytest.raises(edgefc.VerificationError, match="pass 'break-it' changed output 'y'"):
            edgefc.compile(mlp, None, passes=["canonicalize", "break-it"], verify=True)
        result = edgefc.compile(mlp, None, passes=["canonicalize"], verify=True)
        assert result.records[0].verify_rel_error <= 1e-6
    finally:
        edgefc.registry.unregister_pass("test::break-it")


def test_compile_writes_build_and_dump(mlp, tmp_path):
    out = tmp_path / "build"
    edgefc.compile(mlp, "exynos2400", output=out, passes=["canonicalize"], dump_after=["canonicalize"])
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "exynos2400"
    assert report["passes"][0]["name"] == "canonicalize"
    assert report["inputs"] == [{"name": "x", "shape": [2, 8], "dtype": "float32"}]
    # the dump after the last pass is the built graph itself
    built, dumped = onnx.load(str(out / "model.onnx")), onnx.load(str(out / "after-canonicalize.onnx"))
    assert [n.op_type for n in dumped.graph.node] == [n.op_type for n in built.graph.node]
    assert len(built.graph.node) == report["passes"][0]["nodes_after"] == 3
    feeds = ort.random_inputs(built)
    np.testing.assert_array_equal(ort.run(built, feeds)["y"], ort.run(dumped, feeds)["y"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "mlp.onnx"]  # no temp folders left


# --- CLI: every user error is one line, exit 2, nothing left behind -------------------------------

def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    good = tmp_path / "good.onnx"
    onnx.save_model(mlp_model(), str(good))
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good.read_bytes()[:150])
    (tmp_path / "ext").mkdir()
    ext = save_with_external_data(mlp_model(), tmp_path / "ext" / "m.onnx")
    (tmp_path / "ext" / "weights.bin").unlink()
    esc = save_with_escaping_external_data(tmp_path / "esc")
    (tmp_path / "linked").mkdir()
    linked = save_with_external_data(mlp_model(), tmp_path / "linked" / "m.onnx")
    os.link(tmp_path / "linked" / "weights.bin", tmp_path / "weights-link.bin")  # onnx refuses a hard-linked data file
    dyn = tmp_path / "dyn.onnx"
    onnx.save_model(mlp_model(dynamic_batch=True), str(dyn))
    return {
        "missing file": ([str(tmp_path / "nope.onnx")], "not found"),
        "not onnx": ([str(garbage)], "not a readable ONNX model"),
        "truncated": ([str(trunc)], "not a readable ONNX model"),
        "missing external data": ([str(ext)], "weights.bin"),
        "escaping external data": ([str(esc)], "leaves the model's folder"),
        "hard-linked external data": ([str(linked)], "cannot read its external data"),
        "dynamic input": ([str(dyn)], "--shape x="),
        "unknown pass": ([str(good), "--passes", "canonicalize,nope"], "unknown pass 'nope'"),
        "unknown target": ([str(good), "--target", "no-such-npu"], "unknown target 'no-such-npu'"),
        "bad shape": ([str(good), "--shape", "x=2xq"], "bad --shape"),
        "missing plugin": ([str(good), "--plugin", str(tmp_path / "nope.py")], "plugin file not found"),
    }


def test_cli_user_errors_exit_2_with_one_line_and_no_output(tmp_path):
    for case, (args, needle) in _bad_inputs(tmp_path).items():
        out_dir = tmp_path / f"out-{case.replace(' ', '-')}"
        rc, out = run_cli("compile", *args, "--target" if "--target" not in args else "--verify",
                          *(["exynos2400"] if "--target" not in args else []), "-o", str(out_dir))
        assert_user_error(rc, out, needle)
        assert not out_dir.exists(), case
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out_dir.name}")], case


def test_bad_target_file_names_the_field(tmp_path, mlp):
    toml = tmp_path / "npu.toml"
    toml.write_text('[target]\nname = "x"\nkind = "npu"\n[clock]\nhz = "fast"\n')
    rc, out = run_cli("compile", str(mlp), "--target", str(toml), "-o", str(tmp_path / "o"))
    assert_user_error(rc, out, "clock.hz")


def test_custom_pass_plugin_as_in_readme(tmp_path, mlp):
    plugin = tmp_path / "my_pass.py"
    plugin.write_text(textwrap.dedent('''
        import edgefc

        @edgefc.register_pass("my-pass")
        class CountRelus(edgefc.Pass):
            """Tag every Relu with a name prefix and count them in the report."""

            def run(self, graph, ctx):
                relus = [n for n in graph.nodes if n.op == "Relu"]
                for n in relus:
                    n.name = "mine/" + n.name
                ctx.report["my-pass"] = {"relus": len(relus)}
                return graph
    '''))
    out = tmp_path / "build"
    rc, text = run_cli("compile", str(mlp), "--plugin", str(plugin), "--passes", "canonicalize,my-pass", "-o", str(out))
    assert rc == 0, text
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["canonicalize", "my-pass"]
    assert report["my-pass"] == {"relus": 1}
    model = onnx.load(str(out / "model.onnx"))
    assert any(n.name.startswith("mine/") for n in model.graph.node)
    rc, text = run_cli("passes", "--plugin", str(plugin))
    assert "user::my-pass" in text and "Tag every Relu" in text


def test_cli_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:", 1)[1].splitlines()
    names = cli.list_commands(click.Context(cli))
    assert len(names) >= 8 and "compile" in names and "profile" in names
    # one row per command (wrapped descriptions continue deeper indented), each with its description
    rows = [line.split(None, 1) for line in listed if re.match(r"^  \S", line)]
    assert sorted(r[0] for r in rows) == sorted(names), result.output
    assert all(len(r) == 2 and r[1].strip() for r in rows), result.output


def test_every_compile_flag_is_in_help_and_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### `edgefc compile", 1)[1].split("\n### ", 1)[0]
    result = CliRunner().invoke(cli, ["compile", "--help"])
    assert result.exit_code == 0, result.output
    command = cli.get_command(click.Context(cli), "compile")
    flags = [o for p in command.params if p.param_type_name == "option" for o in p.opts if o.startswith("--")]
    assert len(flags) >= 19

    def names(flag, text):
        return re.search(rf"(^|[\s`,]){re.escape(flag)}([\s`=,]|$)", text, re.M)

    missing_help = [f for f in flags if not names(f, result.output)]
    missing_readme = [f for f in flags if not names(f, section)]
    assert missing_help == [] and missing_readme == [], (missing_help, missing_readme)


# --- pipelines are data, pass options are typed ---------------------------------------------------

def test_pipelines_expand_to_their_passes_and_unknown_names_fail(mlp):
    from edgefc.registry import expand, list_pipelines

    fusions = [f"edgefc::{n}" for n in list_pipelines()["fuse"]]
    assert len(fusions) == 8 and expand(["canonicalize", "fuse"]) == ["edgefc::canonicalize", *fusions]
    assert expand(["npu"]) == ["edgefc::canonicalize", *fusions, "edgefc::quantize", "edgefc::mlt"]
    pm = edgefc.PassManager(["canonicalize", "fuse"])
    pm.run(edgefc.load(mlp))
    assert [r.name for r in pm.records] == ["canonicalize", *(f.split("::")[1] for f in fusions)]
    with pytest.raises(edgefc.PassError, match="unknown pass 'fusee'.*pipelines: default, fuse, npu"):
        edgefc.PassManager(["canonicalize", "fusee"])
    with pytest.raises(edgefc.PassError, match="already the name of a pipeline"):
        edgefc.register_pass("fuse")(lambda g, c: g)
    assert edgefc.default_pipeline(edgefc.get_target("exynos2400"), {"no_mlt": True, "precision": "fp32"}) == \
        ["canonicalize", "fuse"]


def test_no_fuse_edits_the_pipeline_and_dump_after_names_single_fusions(mlp, tmp_path):
    res = edgefc.compile(mlp, None, output=tmp_path / "b", options={"no_fuse": ("attention", "fuse-gelu")},
                         dump_after=["fuse-identity", "fuse"])
    names = [r.name for r in res.records]
    assert "fuse-attention" not in names and "fuse-gelu" not in names and "fuse-layernorm" in names
    assert res.report["fusion"]["skipped"] == ["fuse-gelu", "fuse-attention"]
    assert (tmp_path / "b" / "after-fuse-identity.onnx").is_file() and (tmp_path / "b" / "after-fuse.onnx").is_file()


@pytest.mark.parametrize("options, message", [
    ({"precison": "fp16"}, "unknown option 'precison'"),
    ({"calib_samples": "3"}, "pass 'quantize' option 'calib_samples' must be int or None, got '3'"),
    ({"no_mlt": "yes"}, "pass 'mlt' option 'no_mlt' must be bool"),
    ({"emit": 3}, "pass 'compile' option 'emit' must be a list of str"),
])
def test_unknown_or_mistyped_compile_options_are_errors(mlp, tmp_path, options, message):
    with pytest.raises(edgefc.PassError, match=message):
        edgefc.compile(mlp, None, output=tmp_path / "o", options=options)
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.onnx"]  # failed before any work: nothing written


def test_custom_pass_declares_typed_options_as_in_readme(mlp):
    from dataclasses import dataclass

    @dataclass
    class ScaleOptions:
        factor: float = 1.0
        label: str | None = None

        def __post_init__(self):
            if self.factor <= 0:
                raise ValueError(f"option 'factor' must be positive, got {self.factor}")

    seen = []

    @edgefc.register_pass("scale-probe", options=ScaleOptions)
    def scale_probe(graph, ctx):
        seen.append((ctx.option("factor"), ctx.option("label")))
        return graph

    try:
        edgefc.PassManager([edgefc.get_pass("scale-probe", factor=2)]).run(edgefc.load(mlp))
        edgefc.compile(mlp, None, passes=["scale-probe"], options={"factor": 3, "label": "x"})
        assert seen == [(2.0, None), (3.0, "x")]
        with pytest.raises(edgefc.PassError, match="pass 'scale-probe' has no option 'factr'"):
            edgefc.get_pass("scale-probe", factr=2)
        with pytest.raises(edgefc.PassError, match="pass 'scale-probe' option 'factor' must be float"):
            edgefc.get_pass("scale-probe", factor="2")
        with pytest.raises(edgefc.PassError, match="pass 'scale-probe': option 'factor' must be positive"):
            edgefc.compile(mlp, None, passes=["scale-probe"], options={"factor": -1.0})
    finally:
        edgefc.registry.unregister_pass("scale-probe")


def test_cli_mistyped_pass_option_is_one_line(mlp, tmp_path):
    rc, out = run_cli("compile", str(mlp), "--passes", "canonicalize,fuse-nope", "-o", str(tmp_path / "o"))
    assert_user_error(rc, out, "unknown pass 'fuse-nope'")
    assert not (tmp_path / "o").exists()
