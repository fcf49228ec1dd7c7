"""edgefc calibrate (real component inputs from the FP32 pipeline) and edgefc generate --prompts, tiny scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefc.cli import main
from edgefc.models import pipeline, recording
from edgefc.passes import calibration as cal
from tests import needs


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _one_line_error(code, out, err, *needles):
    assert code == 2, out + err
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture()
def cache(tmp_path, monkeypatch, tiny_models):
    """$EDGEFC_CACHE pre-filled with the session's tiny 64x64 exports."""
    folder = tmp_path / "cache" / "bk-sdm-tiny-tiny-64x64"
    folder.mkdir(parents=True)
    for c, path in tiny_models.items():
        (folder / f"{c}.onnx").symlink_to(path)
    monkeypatch.setenv("EDGEFC_CACHE", str(tmp_path / "cache"))
    return folder


@pytest.fixture()
def recorded(cache, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square  \na cat\n")
    (tmp_path / "e.txt").write_text("a dog\na cat\n")
    code, out, err = _cli(["calibrate", "--prompts", tmp_path / "p.txt", "--eval-prompts", tmp_path / "e.txt",
                           "--scale", "tiny", "--steps", "2", "-o", tmp_path / "calib"], capsys)
    assert code == 0, out + err
    return tmp_path / "calib", out


@needs.diffusers
def test_calibrate_records_what_generate_feeds_each_component(recorded, cache, tmp_path, monkeypatch):
    calib, out = recorded
    assert sorted(p.name for p in calib.iterdir()) == sorted(
        [f"{c}{s}.npz" for c in ("text-encoder", "unet", "vae-decoder") for s in ("", ".eval")] + ["calibrate.json"])
    assert "left out of the evaluation set (also in --prompts): 1 prompt" in out
    manifest = json.loads((calib / "calibrate.json").read_text())
    assert manifest["eval_prompts"]["left_out_also_in_prompts"] == ["a cat"]
    assert manifest["samples"] == {"text-encoder": {"calib": 3, "eval": 1}, "unet": {"calib": 6, "eval": 2},
                                   "vae-decoder": {"calib": 3, "eval": 1}}
    z = {f.stem: dict(np.load(f)) for f in calib.glob("*.npz")}
    assert z["unet"]["sample"].shape == (6, 1, 4, 8, 8) and z["unet"]["timestep"].dtype == np.int64
    assert z["unet"]["encoder_hidden_states"].shape == (6, 1, 77, 64)
    assert z["text-encoder"]["input_ids"].shape == (3, 1, 77)
    assert recording.UNCONDITIONAL == cal.UNCONDITIONAL
    # the same inputs, feed by feed, as `edgefc generate` of the second prompt (seed 0 + 1) and of the
    # eval prompt (seed 3: the sequence continues)
    seen = {"text-encoder": [], "unet": [], "vae-decoder": []}
    real = pipeline.open_runner

    def spying(component, path, runtime="auto"):
        runner = real(component, path, runtime)
        run = runner.run

        def spy(feeds):
            seen[component].append({k: np.asarray(v) for k, v in feeds.items()})
            return run(feeds)

        runner.run = spy
        return runner

    monkeypatch.setattr(pipeline, "open_runner", spying)
    pipeline.generate("a blue square", steps=2, seed=1, scale="tiny", output=tmp_path / "x.png", progress=False)
    pipeline.generate("a dog", steps=2, seed=3, scale="tiny", output=tmp_path / "y.png", progress=False)
    np.testing.assert_array_equal(seen["text-encoder"][0]["input_ids"], z["text-encoder"]["input_ids"][1])
    for k in ("sample", "timestep", "encoder_hidden_states"):
        for step in range(2):
            np.testing.assert_array_equal(seen["unet"][step][k], z["unet"][k][2 + step], err_msg=k)
            np.testing.assert_array_equal(seen["unet"][2 + step][k], z["unet.eval"][k][step], err_msg=k)
    np.testing.assert_allclose(seen["vae-decoder"][0]["latent_sample"], z["vae-decoder"]["latent_sample"][1], rtol=1e-6)
    np.testing.assert_allclose(seen["vae-decoder"][1]["latent_sample"], z["vae-decoder.eval"]["latent_sample"][0],
                               rtol=1e-6)
    # the empty prompt's embedding, in both U-Net files
    monkeypatch.setattr(pipeline, "open_runner", real)
    from edgefc.models.runners import Runner
    from edgefc.models.tokenizer import load_tokenizer

    empty = pipeline.encode_texts(Runner("text-encoder", cache / "text-encoder.onnx"), load_tokenizer(None), [""])[0]
    for f in ("unet", "unet.eval"):
        np.testing.assert_array_equal(z[f]["unconditional:encoder_hidden_states"], empty)


@needs.diffusers
def test_compile_on_recorded_inputs_measures_eval_and_conditioning(recorded, cache, capsys, tmp_path):
    calib, _ = recorded
    code, out, err = _cli(["compile", cache / "unet.onnx", "--precision", "w8a16", "--calib", calib / "unet.npz",
                           "--eval", calib / "unet.eval.npz", "--no-mlt", "-o", tmp_path / "b"], capsys)
    assert code == 0, out + err
    q = json.loads((tmp_path / "b" / "report.json").read_text())["quantization"]
    assert q["eval_source"] == "eval" and q["eval_inputs"]["samples"] == 2 and q["calibration"]["samples"] == 6
    assert 0.8 < q["conditioning"] < 1.2 and q["sqnr_db"] > 25
    assert "on 2 held-out real inputs from --eval" in out and "conditioning" in out and "NOTE" not in out


def test_calibrate_errors_are_one_line(cache, tmp_path, capsys):
    p = tmp_path / "p.txt"
    p.write_text("a cat\n")
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "same.txt").write_text("a cat\n")
    (tmp_path / "file").write_text("x")
    base = ["calibrate", "--scale", "tiny"]
    cases = [
        (["--prompts", tmp_path / "none.txt", "-o", tmp_path / "c"], "--prompts file not found"),
        (["--prompts", tmp_path / "blank.txt", "-o", tmp_path / "c"], "holds no prompts"),
        (["--prompts", p, "--eval-prompts", tmp_path / "same.txt", "-o", tmp_path / "c"], "must be held out"),
        (["--prompts", p, "-o", tmp_path / "file"], "exists and is not a folder"),
        (["--prompts", p, "--steps", "3", "-o", tmp_path / "c"], "--steps 3 is not one of 1, 2, 4"),
        (["--prompts", p, "--weights", tmp_path / "nowhere", "--scale", "full", "-o", tmp_path / "c"],
         "does not exist"),
    ]
    for args, needle in cases:
        _one_line_error(*_cli(base + args, capsys), needle)
    assert not (tmp_path / "c").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["blank.txt", "cache", "file", "p.txt", "same.txt"]


@needs.diffusers
def test_generate_prompts_writes_named_pairs_that_eval_scores(cache, tmp_path, capsys):
    prompts = ["a red circle in the top left on a grey background", "a white background with a green square in the bottom left"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    code, out, err = _cli(["generate", "--prompts", tmp_path / "p.txt", "--scale", "tiny", "--steps", "1",
                           "-o", tmp_path / "imgs"], capsys)
    assert code == 0, out + err
    names = pipeline.image_names(prompts)
    assert names == ["0001-a-red-circle-in-the-top-left-on-a-grey", "0002-a-white-background-with-a-green-square-in-the"]
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == sorted(f"{n}.{e}" for n in names for e in ("png", "txt"))
    assert [(tmp_path / "imgs" / f"{n}.txt").read_text() for n in names] == [p + "\n" for p in prompts]
    # each image is what `generate --prompt` gives with seed --seed + i
    one = pipeline.generate(prompts[1], steps=1, seed=1, scale="tiny", output=tmp_path / "one.png", progress=False)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "imgs" / f"{names[1]}.png").convert("RGB")), one.image)
    code, out, err = _cli(["eval", tmp_path / "imgs", "--json"], capsys)
    assert code == 0 and json.loads(out)["count"] == 2
    # errors: both or neither prompt option, output a file, an empty prompts file
    _one_line_error(*_cli(["generate", "--prompts", tmp_path / "p.txt", "--prompt", "x", "-o", tmp_path / "z"], capsys),
                    "give either --prompt")
    _one_line_error(*_cli(["generate", "--prompts", tmp_path / "p.txt", "-o", tmp_path / "one.png"], capsys),
                    "is not a folder")
    (tmp_path / "empty.txt").write_text("")
    _one_line_error(*_cli(["generate", "--prompts", tmp_path / "empty.txt", "-o", tmp_path / "z"], capsys), "no prompts")
    _one_line_error(*_cli(["generate", "--prompts", tmp_path / "p.txt", "--steps", "3", "-o", tmp_path / "z"], capsys),
                    "--steps 3")
    assert not (tmp_path / "z").exists()


def test_image_names_are_deterministic_and_safe():
    names = pipeline.image_names(["A Blue / square!!", "", "x" * 80, "ünïcode ☃", "a b"])
    assert names == ["0001-a-blue-square", "0002", "0003", "0004-n-code", "0005-a-b"]
    assert all(Path(n).name == n and len(n) <= 4 + 1 + pipeline.NAME_CHARS for n in names)
