"""edgefc generate: tiny-scale end to end (exported and compiled components), seeds, sizes, errors."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import PIL.Image as PIL
import pytest

from edgefc.cli import main
from edgefc.models import pipeline
from tests import needs

COMPONENTS = ("text-encoder", "unet", "vae-decoder")


def _cli(args, capsys):
    """Run `edgefc ARGS` in-process; returns (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture()
def cache(tmp_path, monkeypatch, tiny_models):
    """$EDGEFC_CACHE in a fresh folder, pre-filled with the session's tiny 64x64 exports (so only tests
    that ask for another size export anything)."""
    root = tmp_path / "cache"
    folder = root / "bk-sdm-tiny-tiny-64x64"
    folder.mkdir(parents=True)
    for c, path in tiny_models.items():
        (folder / f"{c}.onnx").symlink_to(path)
    monkeypatch.setenv("EDGEFC_CACHE", str(root))
    return root


@pytest.fixture()
def spy(monkeypatch):
    """Record every model file the pipeline opens and how often each component runs."""
    opened: dict[str, Path] = {}
    runs: dict[str, int] = {c: 0 for c in COMPONENTS}
    real = pipeline.open_runner

    def open_runner(component, path, runtime="auto"):
        runner = real(component, path, runtime)
        opened[component] = Path(path)
        run = runner.run

        def counted(feeds):
            runs[component] += 1
            return run(feeds)

        runner.run = counted
        return runner

    monkeypatch.setattr(pipeline, "open_runner", open_runner)
    return opened, runs


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, tiny_models):
    """A build folder with the three tiny components compiled (canonicalize only) by `edgefc compile`.
    The U-Net sits under a name of its own, so it is found by its inputs."""
    root = tmp_path_factory.mktemp("builds")
    names = {"text-encoder": "text-encoder", "unet": "my-unet-build", "vae-decoder": "vae-decoder"}
    for c, name in names.items():
        with pytest.raises(SystemExit) as e:
            main(["compile", str(tiny_models[c]), "--passes", "canonicalize", "-o", str(root / name)])
        assert e.value.code == 0
    return root


# --- sizes and argument handling ----------------------------------------------------------------

def test_default_sizes_without_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEFC_CACHE", str(tmp_path / "c"))
    full = pipeline.plan("a cat", output=tmp_path / "a.png")
    assert (full.height, full.width, full.scale, full.steps) == (512, 512, "full", 2)
    assert full.export_dir == tmp_path / "c" / "bk-sdm-tiny-full-512x512"
    tiny = pipeline.plan("a cat", output=tmp_path / "a.png", scale="tiny")
    assert (tiny.height, tiny.width) == (64, 64)
    assert not (tmp_path / "c").exists(), "planning must not export anything"

    seen = {}

    def fake_run(p, progress=True):  # the CLI's parsed and resolved arguments, without running them
        seen["plan"] = p
        return type("R", (), {"output": p.output, "backends": {}})()

    monkeypatch.setattr(pipeline, "run_plan", fake_run)
    code, _, stderr = _cli(["generate", "--prompt", "a cute cat", "-o", str(tmp_path / "img.png")], capsys)
    assert code == 0, stderr
    p = seen["plan"]
    assert (p.height, p.width, p.steps, p.seed, p.guidance, p.scale) == (512, 512, 2, 0, 1.0, "full")
    assert p.runs == {"text-encoder": 1, "unet": 2, "vae-decoder": 1}


def test_guidance_doubles_the_passes(tmp_path):
    p = pipeline.plan("x", output=tmp_path / "a.png", steps=4, guidance=3.0)
    assert p.cfg and p.runs == {"text-encoder": 2, "unet": 8, "vae-decoder": 1}


# --- end to end on the exported tiny models -----------------------------------------------------

@needs.diffusers
def test_generate_tiny_writes_png(cache, spy, tmp_path, capsys):
    out = tmp_path / "x.png"
    code, stdout, stderr = _cli(["generate", "--prompt", "a cute cat", "--scale", "tiny", "--steps", "2",
                                 "-o", str(out)], capsys)
    assert code == 0, stderr
    assert _png_size(out) == (64, 64)
    opened, runs = spy
    assert opened == {c: cache / "bk-sdm-tiny-tiny-64x64" / f"{c}.onnx" for c in COMPONENTS}
    assert runs == {"text-encoder": 1, "unet": 2, "vae-decoder": 1}
    assert "LCM steps" in stderr and "[3/4] VAE decoder" in stderr
    assert str(out) in stdout
    img = np.asarray(PIL.open(out))
    assert img.shape == (64, 64, 3) and img.std() > 0  # not a blank image
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temp file left


@needs.diffusers
def test_custom_size_exports_once_then_reuses(cache, tmp_path, monkeypatch, tiny_models):
    from edgefc.models import export

    folder = cache / "bk-sdm-tiny-tiny-128x64"
    folder.mkdir()
    # the text encoder does not depend on the image size: reuse it, export the U-Net and VAE decoder
    (folder / "text-encoder.onnx").symlink_to(tiny_models["text-encoder"])
    calls = []
    real = export.export_component

    def counting(component, arch, output, **kw):
        calls.append((component, kw["height"], kw["width"], kw["scale"]))
        return real(component, arch, output, **kw)

    monkeypatch.setattr(export, "export_component", counting)
    r = pipeline.generate("a dog", steps=1, output=tmp_path / "a.png", height=128, width=64, scale="tiny",
                          progress=False)
    assert sorted(calls) == [("unet", 128, 64, "tiny"), ("vae-decoder", 128, 64, "tiny")]
    assert _png_size(r.output) == (64, 128) and r.image.shape == (128, 64, 3)
    assert r.timesteps == [999]
    r2 = pipeline.generate("a dog", steps=1, output=tmp_path / "b.png", height=128, width=64, scale="tiny",
                           progress=False)
    assert len(calls) == 2, "the second run must reuse the cached exports"
    assert np.array_equal(r.image, r2.image)


@needs.diffusers
def test_same_seed_same_image(cache, tmp_path):
    kw = {"steps": 2, "scale": "tiny", "progress": False}
    a = pipeline.generate("a red bicycle", output=tmp_path / "a.png", seed=7, **kw)
    b = pipeline.generate("a red bicycle", output=tmp_path / "b.png", seed=7, **kw)
    c = pipeline.generate("a red bicycle", output=tmp_path / "c.png", seed=8, **kw)
    d = pipeline.generate("a blue boat", output=tmp_path / "d.png", seed=7, **kw)
    assert a.timesteps == [999, 499]
    assert np.array_equal(a.image, b.image)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert not np.array_equal(a.image, c.image), "the seed must change the image"
    assert not np.array_equal(a.image, d.image), "the prompt must change the image"


@needs.diffusers
def test_generate_many_opens_each_model_once_and_matches_generate(cache, spy, tmp_path):
    kw = {"steps": 2, "scale": "tiny"}
    prompts, seeds = ["a red bicycle", "a blue boat", "a red bicycle"], [7, 3, 8]
    outs = [tmp_path / f"m{i}.png" for i in range(3)]
    opened = []
    real = pipeline.open_runner

    def counting(component, path, runtime="auto"):
        opened.append(component)
        return real(component, path, runtime)

    pipeline.open_runner, saved = counting, pipeline.open_runner
    try:
        many = pipeline.generate_many(prompts, seeds, outs, **kw)
    finally:
        pipeline.open_runner = saved
    assert sorted(opened) == sorted(COMPONENTS)  # once each for three images
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        one = pipeline.generate(p, output=tmp_path / f"o{i}.png", seed=s, progress=False, **kw)
        assert np.array_equal(one.image, many[i].image)
        assert outs[i].read_bytes() == (tmp_path / f"o{i}.png").read_bytes()


@needs.diffusers
def test_four_steps_with_guidance(cache, spy, tmp_path):
    r = pipeline.generate("a cat", steps=4, guidance=2.5, output=tmp_path / "g.png", scale="tiny", progress=False)
    _, runs = spy
    assert runs == {"text-encoder": 2, "unet": 8, "vae-decoder": 1} == r.plan.runs
    assert len(r.timesteps) == 4 and r.timesteps[0] == 999 and r.timesteps == sorted(r.timesteps, reverse=True)
    plain = pipeline.generate("a cat", steps=4, output=tmp_path / "p.png", scale="tiny", progress=False)
    assert not np.array_equal(r.image, plain.image), "guidance must change the image"


@needs.diffusers
def test_vae_input_is_scaled_latent(cache, tmp_path, monkeypatch):
    """The VAE decoder receives denoised / 0.18215 (diffusers' AutoencoderKL.decode convention)."""
    seen = {}
    real = pipeline.open_runner

    def open_runner(component, path, runtime="auto"):
        runner = real(component, path, runtime)
        run = runner.run

        def spy_run(feeds):
            out = run(feeds)
            if component == "unet":
                seen["unet_out"] = out["out_sample"]
                seen["sample"] = feeds["sample"]
                seen["t"] = int(feeds["timestep"][0])
            if component == "vae-decoder":
                seen["z"] = feeds["latent_sample"]
            return out

        runner.run = spy_run
        return runner

    monkeypatch.setattr(pipeline, "open_runner", open_runner)
    pipeline.generate("a cat", steps=1, output=tmp_path / "a.png", scale="tiny", progress=False)
    from diffusers import LCMScheduler

    s = LCMScheduler()
    s.set_timesteps(1)
    a = float(s.alphas_cumprod[seen["t"]])
    x0 = (seen["sample"] - np.sqrt(1 - a) * seen["unet_out"]) / np.sqrt(a)
    c_skip, c_out = (float(v) for v in s.get_scalings_for_boundary_condition_discrete(seen["t"]))
    denoised = c_out * x0 + c_skip * seen["sample"]
    np.testing.assert_allclose(seen["z"], denoised / 0.18215, rtol=1e-4, atol=1e-4)


# --- compiled builds ----------------------------------------------------------------------------

@needs.diffusers
def test_build_uses_compiled_artifacts(cache, spy, tiny_build, tmp_path, capsys):
    out = tmp_path / "b.png"
    code, _, stderr = _cli(["generate", "--prompt", "a cute cat", "--steps", "2", "--build", str(tiny_build),
                            "-o", str(out)], capsys)
    assert code == 0, stderr
    opened, runs = spy
    assert opened == {"text-encoder": tiny_build / "text-encoder" / "model.onnx",
                      "unet": tiny_build / "my-unet-build" / "model.onnx",
                      "vae-decoder": tiny_build / "vae-decoder" / "model.onnx"}
    assert runs == {"text-encoder": 1, "unet": 2, "vae-decoder": 1}
    assert _png_size(out) == (64, 64)  # the build's size
    # canonicalize keeps the numerics: the same image as from the exported models
    ref = pipeline.generate("a cute cat", steps=2, output=tmp_path / "ref.png", scale="tiny", progress=False)
    got = np.asarray(PIL.open(out)).astype(int)
    assert np.abs(got - ref.image.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def tvm_build(tmp_path_factory, tiny_models, tiny_build):
    """The tiny build with its U-Net compiled (canonicalize, fuse) with --emit tvm."""
    pytest.importorskip("tvm")
    root = tmp_path_factory.mktemp("tvm-builds")
    for c in ("text-encoder", "vae-decoder"):
        shutil.copytree(tiny_build / c, root / c)
    passes = "canonicalize,fuse" if "fuse" in _registered_passes() else "canonicalize"
    with pytest.raises(SystemExit) as e:
        main(["compile", str(tiny_models["unet"]), "--passes", passes, "--emit", "tvm", "-o", str(root / "unet")])
    assert e.value.code == 0
    return root


def _registered_passes():
    import edgefc

    return {pid.split("::")[-1] for pid in edgefc.list_passes()}


@needs.diffusers
def test_build_with_tvm_library_runs_through_tvm(cache, spy, tvm_build, tmp_path, capsys):
    out = tmp_path / "t.png"
    code, stdout, stderr = _cli(["generate", "--prompt", "a cute cat", "--build", str(tvm_build), "-o", str(out)],
                                capsys)
    assert code == 0, stderr
    assert "unet tvm" in stdout and "text-encoder onnxruntime" in stdout
    opened, runs = spy
    assert opened["unet"] == tvm_build / "unet" / "model.onnx" and runs["unet"] == 2
    # TVM (fp32) and onnxruntime agree: the same image within one grey level
    ort_img = pipeline.generate("a cute cat", build=tvm_build, runtime="onnxruntime", output=tmp_path / "o.png",
                                progress=False)
    assert ort_img.backends["unet"] == "onnxruntime"
    assert np.abs(np.asarray(PIL.open(out)).astype(int) - ort_img.image.astype(int)).max() <= 1
    # --runtime tvm needs a TVM build for every component
    _assert_error(capsys, ["--build", str(tvm_build), "--runtime", "tvm"], "the text-encoder build", tmp_path / "y.png")


def test_find_builds_by_name_and_inputs(tiny_build):
    found = pipeline.find_builds(tiny_build)
    assert found == {"text-encoder": tiny_build / "text-encoder", "unet": tiny_build / "my-unet-build",
                     "vae-decoder": tiny_build / "vae-decoder"}
    for c, b in found.items():
        assert pipeline.detect_component(pipeline.build_inputs(b)) == c


# --- modelled NPU time ---------------------------------------------------------------------------

@needs.diffusers
def test_target_prints_cost_model_times(cache, tiny_build, tmp_path, capsys):
    import edgefc
    from edgefc.build_folder import load_for_profile

    out = tmp_path / "n.png"
    code, stdout, stderr = _cli(["generate", "--prompt", "a cat", "--build", str(tiny_build), "--steps", "4",
                                 "--target", "exynos2400", "-o", str(out)], capsys)
    assert code == 0, stderr
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.startswith("  ")}
    # the figure `edgefc profile BUILD --precision w8a16` gives, times the 4 U-Net runs
    tgt = edgefc.get_target("exynos2400")
    unet = tgt.profile(load_for_profile(tiny_build / "my-unet-build"), precision="w8a16").total_ms
    assert rows["U-Net"][1] == "w8a16" and rows["U-Net"][3] == "4"
    assert float(rows["U-Net"][2]) == pytest.approx(unet, abs=0.051)
    assert float(rows["U-Net"][4]) == pytest.approx(4 * unet, abs=0.051)
    parts = [float(rows[k][-1]) for k in ("text", "U-Net", "VAE")]
    assert rows["text"][2] == "fp16" and rows["VAE"][2] == "fp16"
    assert float(rows["total"][-1]) == pytest.approx(sum(parts), abs=0.15)
    assert _png_size(out) == (64, 64)


def test_quantized_builds_are_priced_as_built():
    """The NPU timing reads the precision quantize recorded on the ops, not a report file."""
    import onnx_graphsurgeon as gs

    from edgefc import precision
    from edgefc.models.npu_time import built_precision

    x, y, z = (gs.Variable(n, dtype=np.float32, shape=[1, 4]) for n in "xyz")
    a, b = gs.Node("Relu", "a", inputs=[x], outputs=[y]), gs.Node("Sigmoid", "b", inputs=[y], outputs=[z])
    g = gs.Graph(nodes=[a, b], inputs=[x], outputs=[z], opset=23)
    assert built_precision(g) is None                       # not quantized: priced as the paper deployed it
    precision.set_op_precision(a, "fp32")
    assert built_precision(g) is None                       # all FP32
    precision.set_op_precision(b, "w8a16")
    assert built_precision(g) == "w8a16"                    # FP32 islands do not make it mixed
    precision.set_op_precision(a, "w8a8")
    assert built_precision(g) == "mixed"


def test_target_without_cost_model(cache, tmp_path, capsys, monkeypatch):
    import edgefc
    from edgefc import target as target_mod

    class PlainCpu(edgefc.Target):
        name = "plain-cpu-for-test"

    monkeypatch.setitem(target_mod._TARGETS, "plain-cpu-for-test", PlainCpu)
    _assert_error(capsys, ["--scale", "tiny", "--target", "plain-cpu-for-test"], "has no cost model",
                  tmp_path / "x.png")


# --- errors: one line, exit 2, nothing written --------------------------------------------------

def _assert_error(capsys, args, needle, output):
    code, _, stderr = _cli(["generate", "--prompt", "a cat", *args, "-o", str(output)], capsys)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr, stderr
    assert needle in lines[0], lines[0]
    assert not Path(output).exists()


@pytest.mark.parametrize("args,needle", [
    (["--steps", "3"], "--steps 3 is not one of 1, 2, 4"),
    (["--steps", "0"], "--steps 0"),
    (["--height", "100"], "--height 100 is not a positive multiple of 64"),
    (["--width", "96", "--scale", "tiny"], "--width 96"),
    (["--guidance", "0.5"], "--guidance 0.5 is below 1"),
    (["--target", "nosuchnpu"], "unknown target 'nosuchnpu'"),
    (["--runtime", "gpu"], "unknown --runtime 'gpu'"),
    (["--runtime", "tvm", "--scale", "tiny"], "--runtime tvm needs --build"),
])
def test_argument_errors(capsys, tmp_path, cache, args, needle):
    _assert_error(capsys, args, needle, tmp_path / "x.png")
    assert sorted(p.name for p in cache.iterdir()) == ["bk-sdm-tiny-tiny-64x64"]  # nothing exported


def test_output_errors(capsys, tmp_path):
    _assert_error(capsys, ["--scale", "tiny"], "output folder", tmp_path / "missing" / "x.png")
    _assert_error(capsys, ["--scale", "tiny"], "must end in .png", tmp_path / "x.jpg")


def test_build_errors(capsys, tmp_path, tiny_build):
    _assert_error(capsys, ["--build", str(tmp_path / "nope")], "does not exist", tmp_path / "x.png")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_build, partial)
    shutil.rmtree(partial / "vae-decoder")
    _assert_error(capsys, ["--build", str(partial)], "has no vae-decoder build", tmp_path / "x.png")
    _assert_error(capsys, ["--build", str(tiny_build), "--height", "128"],
                  "does not match the build's image height 64", tmp_path / "x.png")
    # a folder named for one component holding another
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_build, wrong)
    shutil.rmtree(wrong / "text-encoder")
    shutil.copytree(tiny_build / "vae-decoder", wrong / "text-encoder")
    _assert_error(capsys, ["--build", str(wrong)], "is named text-encoder but its inputs", tmp_path / "x.png")


def test_weights_errors(capsys, tmp_path):
    _assert_error(capsys, ["--weights", str(tmp_path / "nope")], "does not exist", tmp_path / "x.png")
    w = tmp_path / "w"
    (w / "tokenizer").mkdir(parents=True)
    _assert_error(capsys, ["--weights", str(w)], "has no text_encoder/config.json", tmp_path / "x.png")
    for sub in ("text_encoder", "unet"):
        (w / sub).mkdir()
        (w / sub / "config.json").write_text(json.dumps({}))
    _assert_error(capsys, ["--weights", str(w)], "has no vae/config.json", tmp_path / "x.png")
    _assert_error(capsys, ["--weights", str(w), "--scale", "tiny"], "cannot be combined with --weights",
                  tmp_path / "x.png")


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEFC_CACHE", raising=False)
    assert pipeline.cache_root() == Path.home() / ".cache" / "edgefc" / "models"
    monkeypatch.setenv("EDGEFC_CACHE", str(tmp_path))
    assert pipeline.cache_root() == tmp_path
    assert os.fspath(pipeline.export_dir("sd-v1.5", "tiny", 128, 64)).endswith("sd-v1.5-tiny-128x64")


# --- a local diffusers folder (real tokenizer and scheduler config) -------------------------------

@needs.diffusers
@pytest.mark.slow
def test_weights_folder_tokenizer_and_scheduler(tmp_path, monkeypatch):
    """--weights: models exported from the folder, its CLIP tokenizer and its scheduler config are used."""
    import diffusers
    import torch
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from edgefc.models import configs

    monkeypatch.setenv("EDGEFC_CACHE", str(tmp_path / "cache"))
    w = tmp_path / "weights"
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(**configs.get_config("unet", "bk-sdm-tiny", "tiny")).save_pretrained(w / "unet")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs.get_config("text-encoder", "bk-sdm-tiny", "tiny"))
                               ).save_pretrained(w / "text_encoder")
    diffusers.AutoencoderKL(**configs.get_config("vae-decoder", "bk-sdm-tiny", "tiny")).save_pretrained(w / "vae")
    diffusers.LCMScheduler(original_inference_steps=8).save_pretrained(w / "scheduler")
    b2u = bytes_to_unicode()
    symbols = [b2u[b] for b in b2u]
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (w / "tokenizer").mkdir()
    (w / "tokenizer" / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (w / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")

    r = pipeline.generate("a cat", steps=4, weights=w, height=64, width=64, output=tmp_path / "w.png",
                          progress=False)
    assert r.tokenizer == "clip"
    assert r.timesteps == [999, 749, 499, 249]  # original_inference_steps 8 from scheduler/ (default 50: 999, 759, ...)
    assert r.models["unet"].parent.name.startswith("weights-") and r.models["unet"].is_file()
    assert _png_size(r.output) == (64, 64)
