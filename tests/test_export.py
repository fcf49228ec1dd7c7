"""edgefc export: tiny-scale exports against torch, interface names/shapes, topology, error paths."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest

from edgefc import ort as edgefc_ort
from edgefc.cli import main
from edgefc.errors import ExportError
from edgefc.models import configs
from edgefc.models import export as ex
from tests import needs

try:
    import torch
except ModuleNotFoundError:
    torch = None

COMPONENTS = ("text-encoder", "unet", "vae-decoder")


def _run(path, feeds):
    sess = edgefc_ort.session(path)
    return sess.run(None, feeds)


def _torch_outputs(component, arch, **kw):
    module, inputs = ex.build_model(component, arch, **kw)
    with torch.no_grad():
        out = module(*inputs)
    out = (out,) if isinstance(out, torch.Tensor) else out
    feeds = {n: x.numpy() for n, x in zip(ex.INPUT_NAMES[component], inputs)}
    return feeds, [o.numpy() for o in out]


def _assert_close(got, want, rtol=1e-4):
    assert got.shape == want.shape
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)
    assert err <= rtol, f"max error {err:.3g} relative to the largest output, want <= {rtol}"


def _shape(value_info):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def _cli(args, capfd):
    """Run `edgefc ARGS` in-process; returns (exit status, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code, capfd.readouterr().err


# --- tiny exports ------------------------------------------------------------------------------

@needs.torch
@pytest.mark.parametrize("component", COMPONENTS)
def test_tiny_export_matches_torch(tiny_models, component):
    feeds, want = _torch_outputs(component, "bk-sdm-tiny", scale="tiny")
    got = _run(tiny_models[component], feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _assert_close(g, w)


@needs.torch
@pytest.mark.parametrize("component", COMPONENTS)
def test_tiny_dynamo_export_matches_torch(tiny_dynamo, component):
    """--exporter dynamo: torch's default exporter, same interface, opset 18 or later, same numbers."""
    feeds, want = _torch_outputs(component, "bk-sdm-tiny", scale="tiny")
    model = onnx.load(str(tiny_dynamo[component]), load_external_data=False)
    assert [i.name for i in model.graph.input] == ex.INPUT_NAMES[component]
    assert [o.name for o in model.graph.output] == ex.OUTPUT_NAMES[component]
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    got = _run(tiny_dynamo[component], feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _assert_close(g, w)


def test_unknown_exporter_and_bad_opset_are_user_errors(tmp_path, capfd):
    with pytest.raises(ExportError, match="unknown exporter 'jit'"):
        ex.export_component("unet", "bk-sdm-tiny", tmp_path / "u.onnx", scale="tiny", exporter="jit")
    rc, err = _cli(["export", "unet", "--scale", "tiny", "--exporter", "jit", "-o", str(tmp_path / "u.onnx")], capfd)
    assert rc == 2 and "jit" in err and "Traceback" not in err
    with pytest.raises(ExportError, match="from opset 18 on; for opset 17 use --exporter torchscript"):
        ex.export_component("unet", "bk-sdm-tiny", tmp_path / "u.onnx", scale="tiny", exporter="dynamo", opset=17)
    assert not list(tmp_path.iterdir())


@needs.torch
@pytest.mark.parametrize("component", COMPONENTS)
def test_every_parameter_is_its_own_initializer(tiny_models, component):
    """ONNX initializer elements == torch parameters: nothing merged (the exporter merges equal
    tensors, e.g. all-zero biases) and nothing but the weights stored."""
    module, _ = ex.build_model(component, "bk-sdm-tiny", scale="tiny")
    assert ex.count_parameters(tiny_models[component]) == sum(p.numel() for p in module.parameters())


@needs.torch
def test_tiny_sd15_unet_matches_torch(tiny_sd15_unet):
    feeds, want = _torch_outputs("unet", "sd-v1.5", scale="tiny")
    _assert_close(_run(tiny_sd15_unet, feeds)[0], want[0])


def test_interface_names_shapes_and_opset(tiny_models):
    d = configs.text_hidden_size("bk-sdm-tiny", "tiny")
    expect = {
        "text-encoder": ({"input_ids": (onnx.TensorProto.INT64, [1, 77])},
                         {"last_hidden_state": (onnx.TensorProto.FLOAT, [1, 77, d]),
                          "pooler_output": (onnx.TensorProto.FLOAT, [1, d])}),
        "unet": ({"sample": (onnx.TensorProto.FLOAT, [1, 4, 8, 8]),
                  "timestep": (onnx.TensorProto.INT64, [1]),
                  "encoder_hidden_states": (onnx.TensorProto.FLOAT, [1, 77, d])},
                 {"out_sample": (onnx.TensorProto.FLOAT, [1, 4, 8, 8])}),
        "vae-decoder": ({"latent_sample": (onnx.TensorProto.FLOAT, [1, 4, 8, 8])},
                        {"sample": (onnx.TensorProto.FLOAT, [1, 3, 64, 64])}),
    }
    for component, (inputs, outputs) in expect.items():
        model = onnx.load(str(tiny_models[component]))
        onnx.checker.check_model(model)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [ex.OPSET]
        got_in = {i.name: (i.type.tensor_type.elem_type, _shape(i)) for i in model.graph.input}
        got_out = {o.name: (o.type.tensor_type.elem_type, _shape(o)) for o in model.graph.output}
        assert got_in == inputs, component
        assert got_out == outputs, component


def _softmax_count(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)["Softmax"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_attention_count_matches_config(tiny_models, component):
    expected = configs.expected_attention_count(component, "bk-sdm-tiny", "tiny")
    assert expected == configs.expected_attention_count(component, "bk-sdm-tiny", "full")
    assert _softmax_count(tiny_models[component]) == expected


def test_sd15_attention_count_matches_config(tiny_sd15_unet):
    expected = configs.expected_attention_count("unet", "sd-v1.5", "tiny")
    assert expected == configs.expected_attention_count("unet", "sd-v1.5", "full")
    assert _softmax_count(tiny_sd15_unet) == expected


def test_config_topology_is_the_papers():
    # shared/PAPER_FIGURES.md: 9 transformer blocks (3 per resolution) / 16 (5/5/5 + 1 mid).
    assert configs.expected_transformer_blocks("unet", "bk-sdm-tiny") == 9
    assert [n for _, n in configs.unet_attention_layout(configs.get_config("unet", "bk-sdm-tiny"))] == [1, 1, 1, 2, 2, 2]
    assert configs.expected_attention_count("unet", "bk-sdm-tiny") == 18
    assert configs.expected_transformer_blocks("unet", "sd-v1.5") == 16
    assert configs.expected_attention_count("unet", "sd-v1.5") == 32
    assert configs.expected_attention_count("text-encoder", "sd-v1.5") == 12
    assert configs.expected_attention_count("vae-decoder", "bk-sdm-tiny") == 1
    for component in COMPONENTS:
        for arch in configs.ARCHS:
            full, tiny = configs.get_config(component, arch), configs.get_config(component, arch, "tiny")
            for key in ("down_block_types", "up_block_types", "mid_block_type", "layers_per_block",
                        "num_hidden_layers"):
                assert full.get(key) == tiny.get(key), (component, arch, key)


def test_bk_sdm_tiny_has_no_mid_block(tiny_models, tiny_sd15_unet):
    assert configs.get_config("unet", "bk-sdm-tiny", "tiny")["mid_block_type"] is None
    bk = onnx.load(str(tiny_models["unet"]))
    assert not any("mid_block" in n.name for n in bk.graph.node)
    assert not any("mid_block" in t.name for t in bk.graph.initializer)
    sd = onnx.load(str(tiny_sd15_unet))  # the check can fail: SD-v1.5 has one
    assert any("mid_block" in n.name for n in sd.graph.node)


@needs.torch
def test_full_configs_have_the_paper_parameter_counts():
    """Parameter counts of the full-size configs, built on the meta device (no memory, no time)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        models = {
            ("unet", "bk-sdm-tiny"): UNet2DConditionModel(**configs.get_config("unet", "bk-sdm-tiny")),
            ("unet", "sd-v1.5"): UNet2DConditionModel(**configs.get_config("unet", "sd-v1.5")),
            ("text-encoder", "sd-v1.5"): CLIPTextModel(CLIPTextConfig(**configs.get_config("text-encoder", "sd-v1.5"))),
        }
        vae = AutoencoderKL(**configs.get_config("vae-decoder", "sd-v1.5"))
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    counts[("vae-decoder", "sd-v1.5")] = sum(p.numel() for m in (vae.decoder, vae.post_quant_conv)
                                             for p in m.parameters())
    for key, n in counts.items():
        want = configs.PAPER_PARAMETERS[key]
        assert abs(n - want) / want < 0.005, f"{key}: {n / 1e6:.2f} M, paper {want / 1e6:.1f} M"


@needs.torch
def test_non_square_size(tmp_path):
    out = ex.export_component("unet", "bk-sdm-tiny", tmp_path / "u.onnx", scale="tiny", height=96, width=64,
                              progress=False)
    model = onnx.load(str(out))
    assert _shape(model.graph.input[0]) == [1, 4, 12, 8]
    assert _shape(model.graph.output[0]) == [1, 4, 12, 8]
    feeds, want = _torch_outputs("unet", "bk-sdm-tiny", scale="tiny", height=96, width=64)
    _assert_close(_run(out, feeds)[0], want[0])


@needs.torch
def test_seed_changes_weights(tmp_path, tiny_models):
    out = ex.export_component("vae-decoder", "bk-sdm-tiny", tmp_path / "v.onnx", scale="tiny", seed=1,
                              progress=False)
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tiny_models["vae-decoder"])).graph.initializer}
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], b[k]) for k in a)


# --- weights from a local diffusers folder -----------------------------------------------------

@needs.torch
@pytest.mark.parametrize("component", COMPONENTS)
def test_weights_folder(tmp_path, component, capfd):
    """A folder saved by save_pretrained is loaded (not the random build) and exported."""
    module, _ = ex.build_model(component, "bk-sdm-tiny", scale="tiny", seed=7)
    inner = next(iter(module.children()))
    if component == "vae-decoder":  # the wrapper holds decoder parts; save a whole AutoencoderKL
        from diffusers import AutoencoderKL

        torch.manual_seed(7)
        inner = AutoencoderKL(**configs.get_config("vae-decoder", "bk-sdm-tiny", "tiny"))
    inner.save_pretrained(tmp_path / "pipe" / ex.WEIGHTS_SUBFOLDER[component])
    out = tmp_path / "out" / "m.onnx"
    code, err = _cli(["export", component, "--weights", str(tmp_path / "pipe"), "--height", "64",
                      "--width", "64", "-o", str(out)], capfd)
    assert code == 0, err
    feeds, want = _torch_outputs(component, "bk-sdm-tiny", weights=tmp_path / "pipe", height=64, width=64)
    got = _run(out, feeds)
    for g, w in zip(got, want):
        _assert_close(g, w)
    # the loaded weights, not seed-0 random ones
    random_module, _ = ex.build_model(component, "bk-sdm-tiny", scale="tiny", height=64, width=64)
    with torch.no_grad():
        random = random_module(*(torch.from_numpy(x) for x in feeds.values()))
    random = random[0] if isinstance(random, tuple) else random
    assert not np.allclose(got[0], random.numpy(), rtol=1e-3, atol=1e-4)


# --- external data -----------------------------------------------------------------------------

@needs.torch
def test_consolidate_external_data(tmp_path):
    """Per-tensor data files (what the exporter writes over 2 GB) become one file, same results."""
    src = onnx.load(str(ex.export_component("unet", "bk-sdm-tiny", tmp_path / "a" / "u.onnx", scale="tiny",
                                            progress=False)))
    folder = tmp_path / "b"
    folder.mkdir()
    onnx.save(src, str(folder / "u.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)
    assert len(list(folder.iterdir())) > 10
    assert ex._consolidate_external_data(folder / "u.onnx", "u.onnx.data")
    assert sorted(p.name for p in folder.iterdir()) == ["u.onnx", "u.onnx.data"]
    feeds, want = _torch_outputs("unet", "bk-sdm-tiny", scale="tiny")
    _assert_close(_run(folder / "u.onnx", feeds)[0], want[0])
    assert ex.count_parameters(folder / "u.onnx") == ex.count_parameters(tmp_path / "a" / "u.onnx")


# --- errors: one line, exit status 2, nothing left behind --------------------------------------

def _assert_user_error(code, err, words, folder):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    # progress lines ("[1/3] build ...") may come first; then exactly one error line, last
    assert lines and lines[-1].startswith("error: "), err
    assert all(line.startswith(("[", " ")) for line in lines[:-1]), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[-1], (w, lines[-1])
    assert not folder.exists() or list(folder.iterdir()) == [], "output or temporary files left behind"


@pytest.mark.parametrize("args, words", [
    (["unet", "--height", "100"], ["--height 100", "multiple of 32"]),
    (["unet", "--arch", "sd-v1.5", "--width", "96"], ["--width 96", "multiple of 64"]),
    (["unet", "--scale", "tiny", "--height", "48"], ["multiple of 32"]),
    (["vae-decoder", "--height", "516"], ["multiple of 8"]),
    (["vae-decoder", "--height", "0"], ["--height 0"]),
])
def test_bad_size(tmp_path, capfd, args, words):
    out = tmp_path / "out"
    code, err = _cli(["export", *args, "-o", str(out / "m.onnx")], capfd)
    _assert_user_error(code, err, words, out)


def test_missing_weights_folder(tmp_path, capfd):
    out = tmp_path / "out"
    code, err = _cli(["export", "unet", "--weights", str(tmp_path / "nope"), "-o", str(out / "m.onnx")], capfd)
    _assert_user_error(code, err, ["does not exist"], out)


@pytest.mark.parametrize("component", COMPONENTS)
def test_missing_weights_subfolder(tmp_path, capfd, component):
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)
    out = tmp_path / "out"
    code, err = _cli(["export", component, "--weights", str(tmp_path / "pipe"), "-o", str(out / "m.onnx")],
                     capfd)
    _assert_user_error(code, err, [ex.WEIGHTS_SUBFOLDER[component] + "/config.json"], out)


@needs.torch
def test_broken_weights_subfolder(tmp_path, capfd):
    sub = tmp_path / "pipe" / "unet"
    sub.mkdir(parents=True)
    (sub / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')  # no weights file
    out = tmp_path / "out"
    code, err = _cli(["export", "unet", "--weights", str(tmp_path / "pipe"), "--height", "64", "--width", "64",
                      "-o", str(out / "m.onnx")], capfd)
    _assert_user_error(code, err, ["cannot load weights"], out)


def test_tiny_with_weights_is_an_error(tmp_path, capfd):
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "unet" / "config.json").write_text("{}")
    out = tmp_path / "out"
    code, err = _cli(["export", "unet", "--scale", "tiny", "--weights", str(tmp_path / "pipe"),
                      "-o", str(out / "m.onnx")], capfd)
    _assert_user_error(code, err, ["--scale tiny"], out)


def test_bad_output_name(tmp_path, capfd):
    code, err = _cli(["export", "unet", "--scale", "tiny", "-o", str(tmp_path / "out" / "m.txt")], capfd)
    _assert_user_error(code, err, [".onnx"], tmp_path / "out")


@pytest.mark.parametrize("missing", ["torch", "diffusers", "transformers"])
def test_backend_not_installed(tmp_path, capfd, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    out = tmp_path / "out"
    code, err = _cli(["export", "unet", "--scale", "tiny", "-o", str(out / "m.onnx")], capfd)
    _assert_user_error(code, err, [missing, "pip install 'edgefc[models]'"], out)


@needs.torch
def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    out = tmp_path / "out" / "deeper"
    with pytest.raises(KeyboardInterrupt):
        ex.export_component("unet", "bk-sdm-tiny", out / "m.onnx", scale="tiny", progress=False)
    assert list(tmp_path.iterdir()) == []  # no temporary files, and the folders it made are gone
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "m.onnx").write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        ex.export_component("unet", "bk-sdm-tiny", tmp_path / "keep" / "m.onnx", scale="tiny", progress=False)
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["m.onnx"]
    assert (tmp_path / "keep" / "m.onnx").read_bytes() == b"previous"  # the old output is untouched


@needs.torch
def test_output_folder_is_a_file(tmp_path, capfd):
    (tmp_path / "f").write_text("x")
    code, err = _cli(["export", "unet", "--scale", "tiny", "-o", str(tmp_path / "f" / "m.onnx")], capfd)
    _assert_user_error(code, err, ["is a file, not a folder"], tmp_path / "nothing")
    assert (tmp_path / "f").read_text() == "x"


def test_cli_subprocess_error():
    """The installed `edgefc` command: one line on stderr, status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-c", "from edgefc.cli import main; main()", "export", "unet",
                           "--height", "100", "-o", "never.onnx"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        ("error: --height 100 is not a positive multiple of 32 "
         "(the bk-sdm-tiny U-Net downsamples the 1/8 latent 2 times).")]


def test_api_rejects_unknown_names(tmp_path):
    with pytest.raises(ExportError, match="unknown arch"):
        ex.export_component("unet", "sd-xl", tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="unknown component"):
        ex.export_component("vae-encoder", "sd-v1.5", tmp_path / "m.onnx")


# --- full size (slow) --------------------------------------------------------------------------

@needs.torch
@pytest.mark.slow
@pytest.mark.parametrize("component, arch", [("unet", "bk-sdm-tiny"), ("unet", "sd-v1.5"),
                                             ("text-encoder", "bk-sdm-tiny"), ("vae-decoder", "bk-sdm-tiny")])
def test_full_size_parameter_count(tmp_path, component, arch):
    out = ex.export_component(component, arch, tmp_path / f"{component}-{arch}.onnx", progress=False)
    n = ex.count_parameters(out)
    want = configs.PAPER_PARAMETERS[(component, arch)]
    assert abs(n - want) / want < 0.005, f"{n / 1e6:.2f} M parameters, paper {want / 1e6:.1f} M"
    assert _softmax_count(out) == configs.expected_attention_count(component, arch)
    files = sorted(p.name for p in tmp_path.iterdir())
    if (component, arch) == ("unet", "sd-v1.5"):  # 3.4 GB: weights in one external data file
        assert files == [out.name, out.name + ".data"]
    else:
        assert files == [out.name]


@needs.torch
def test_weights_folder_of_another_topology(tmp_path, capfd):
    """An SD-v1.5-shaped U-Net under --arch bk-sdm-tiny: exported with a warning; a size its extra
    downsampling cannot divide is an error."""
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**configs.get_config("unet", "sd-v1.5", "tiny")).save_pretrained(tmp_path / "pipe" / "unet")
    out = tmp_path / "out"
    code, err = _cli(["export", "unet", "--weights", str(tmp_path / "pipe"), "--height", "96", "--width", "64",
                      "-o", str(out / "m.onnx")], capfd)
    _assert_user_error(code, err, ["--height 96", "multiple of 64"], out)
    code, err = _cli(["export", "unet", "--weights", str(tmp_path / "pipe"), "--height", "64", "--width", "64",
                      "-o", str(out / "m.onnx")], capfd)
    assert code == 0
    assert "warning: " in err and "bk-sdm-tiny topology" in err
    assert _softmax_count(out / "m.onnx") == configs.expected_attention_count("unet", "sd-v1.5")
