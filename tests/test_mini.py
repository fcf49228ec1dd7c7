"""The miniature EdgeFusion recipe (issue 13): from-scratch VAE / U-Net training, guidance baking for
deployment, and (slow) the whole bench at a few-minute budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import needs
from tests.cli import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_bake_guidance_is_exact():
    """The baked U-Net (no guidance input) equals the LCM U-Net fed the guidance embedding of w."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    from edgefc.models.configs import get_config
    from edgefc.models.train.lcm import bake_guidance, guidance_scale_embedding

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**get_config("unet", "bk-sdm-tiny", "tiny"), "time_cond_proj_dim": 32})
    with torch.no_grad():  # a non-zero guidance path (cond_proj starts random; make it matter)
        unet.time_embedding.cond_proj.weight.mul_(20)
    unet.eval()
    w = 2.5
    baked = bake_guidance(unet, w)
    assert baked.config.time_cond_proj_dim is None
    assert not any(k.startswith("time_embedding.cond_proj") for k in baked.state_dict())
    x, t, e = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 64)
    with torch.no_grad():
        want = unet(x, t, e, timestep_cond=guidance_scale_embedding(torch.tensor([w]), 32)).sample
        other = unet(x, t, e, timestep_cond=guidance_scale_embedding(torch.tensor([w + 3]), 32)).sample
        got = baked(x, t, e).sample
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, other, rtol=1e-3, atol=1e-3)  # the guidance really changes the output


def test_a_companion_command_without_the_models_extra_is_one_line(tmp_path):
    """`edgefc train` where diffusers is not installed: one line naming it and the extra, exit 2."""
    import subprocess
    import sys

    code = "import sys; sys.modules['diffusers'] = None; from edgefc.cli import main; main()"
    # arguments that are all right: the missing package is the one thing wrong (arguments are checked first)
    proc = subprocess.run([sys.executable, "-c", code, "train", "sd", "--teacher-arch", "tiny", "--data",
                           str(tmp_path), "-o", str(tmp_path / "o")], capture_output=True, text=True, check=False)
    assert_user_error(proc.returncode, proc.stdout + proc.stderr, "needs the models extra (diffusers is not installed)",
                      "pip install 'edgefc[models]'")
    assert not (tmp_path / "o").exists()


@needs.diffusers
def test_train_vae_and_sd_user_errors(tmp_path):
    from edgefc.models.synth import synthesize

    synthesize(tmp_path / "d", 2)   # the data (`edgefc data synth` is tested in test_synth.py)
    base = ["--teacher-arch", "mini", "--data", str(tmp_path / "d"), "--resolution", "64", "--steps", "1"]
    assert_user_error(*run_cli("train", "sd", *base, "-o", str(tmp_path / "o1"), "--caption-dropout", "1.5"),
                      "--caption-dropout")
    assert_user_error(*run_cli("train", "vae", *base, "-o", str(tmp_path / "o2"), "--kl-weight", "-1"), "--kl-weight")
    assert_user_error(*run_cli("train", "sd", "--teacher", str(tmp_path / "nope"), "--data", str(tmp_path / "d"),
                               "-o", str(tmp_path / "o3")), "does not exist")
    assert_user_error(*run_cli("train", "vae", *base, "-o", str(tmp_path / "o4"), "--tokenizer", str(tmp_path)),
                      "not a CLIP tokenizer folder")
    assert_user_error(*run_cli("train", "sd", "--teacher", str(tmp_path / "nope"), "--tokenizer",
                               str(tmp_path / "d" / "tokenizer"), "--data", str(tmp_path / "d"),
                               "-o", str(tmp_path / "o5")), "--tokenizer goes with --teacher-arch")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4, 5))


def test_train_vae_sets_latent_scale_and_sd_resumes(tmp_path):
    """train vae writes a whole pipeline with the VAE's scaling_factor measured; train sd trains a U-Net
    from it and a resumed run reproduces the uninterrupted run's losses."""
    pytest.importorskip("torch")
    import torch

    from edgefc.models.synth import synthesize
    from edgefc.models.train.sd import SDConfig, VAEConfig, train_sd, train_vae

    synthesize(tmp_path / "d", 8)
    common = ["--data", str(tmp_path / "d"), "--resolution", "64", "--batch-size", "2", "--threads", "1", "--quiet"]
    config = {"data": tmp_path / "d", "resolution": 64, "batch_size": 2, "threads": 1, "progress": False}
    threads = torch.get_num_threads()
    try:   # two of the three runs in this process (the CLI only maps flags to these configs): no torch import each
        train_vae(VAEConfig(output=tmp_path / "vae", teacher_arch="mini", tokenizer=tmp_path / "d" / "tokenizer",
                            steps=2, lr=1e-3, **config))
        from edgefc.models.tokenizer import load_tokenizer

        assert load_tokenizer(tmp_path / "vae").kind == "clip"  # the data's tokenizer travels with the pipeline
        cfg = json.loads((tmp_path / "vae" / "vae" / "config.json").read_text())
        assert cfg["block_out_channels"] == [8, 16, 32, 32] and cfg["scaling_factor"] != 0.18215
        for sub in ("unet", "text_encoder", "scheduler"):
            assert (tmp_path / "vae" / sub).is_dir()
        rc, out = run_cli("train", "sd", "--teacher", str(tmp_path / "vae"), *common, "--steps", "4", "--save-every",
                          "2", "--prediction-type", "v_prediction", "-o", str(tmp_path / "a"))
        assert rc == 0, out
        # resumed from the CLI run's checkpoint, with the same settings as the CLI's defaults (lr 1e-3)
        train_sd(SDConfig(output=tmp_path / "b", teacher=tmp_path / "vae", steps=4, save_every=2, lr=1e-3,
                          prediction_type="v_prediction", resume=tmp_path / "a" / "checkpoint-2", **config))
    finally:
        torch.set_num_threads(threads)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4
    sched = json.loads((tmp_path / "b" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"  # kd, lcm and sampling follow the trained objective
    assert json.loads((tmp_path / "vae" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"


@pytest.mark.slow
def test_mini_edgefusion_small(tmp_path):
    """The whole recipe at a few-minute budget: every stage runs, results.json has the issue's schema."""
    out = tmp_path / "mini"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mini_edgefusion.py"), "--out", str(out), "--small",
                           "--threads", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert isinstance(r["minutes"], float)
    models = {(x["model"], x["steps"], x["precision"]) for x in r["rows"]}
    for need in [("data", None, "fp32"), ("teacher", 4, "fp32"), ("kd-student", 4, "fp32"),
                 ("scratch-student", 4, "fp32")] + [("lcm-student", s, p) for s in (1, 2, 4) for p in ("fp32", "w8a16")]:
        assert need in models, need
    for x in r["rows"]:
        assert 0.0 <= x["alignment"] <= 1.0
    assert [x for x in r["rows"] if x["model"] == "data"][0]["alignment"] >= 0.95
    assert (out / "fp32_vs_w8a16.png").stat().st_size > 0 and (out / "results.md").is_file()
    # the trained folder works with edgefc generate --weights
    rc, text = run_cli("generate", "--weights", str(out / "lcm"), "--prompt",
                       "a red circle in the top left on a grey background", "--steps", "2", "--height", "64",
                       "--width", "64", "-o", str(tmp_path / "x.png"))
    assert rc == 0, text
    assert (tmp_path / "x.png").is_file()


@pytest.mark.slow
def test_training_ablations_small(tmp_path):
    """bench/training_ablations.py at a few-minute budget: every row, claim and table is written, and a
    second run finds everything done (resumable)."""
    out = tmp_path / "abl"
    cmd = [sys.executable, str(ROOT / "bench" / "training_ablations.py"), "--out", str(out), "--small"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert set(r["kd"]) == {"L-orig", "L-pp", "L-pps", "synt", "synt-cur", "L-pps+synt"}
    assert set(r["lcm"]) == {"base-L-orig", "base-L-pps+synt", "kdft-L-orig", "kdft-L-pps+synt",
                             "kdft-L-pps+synt-self"}
    for row in r["kd"].values():
        assert row["alignment"]["n"] == 2 and 0.0 <= row["alignment"]["mean"] <= 1.0
    for row in r["lcm"].values():
        assert {"1", "2", "4"} <= set(row)
    assert r["data"]["L-orig"]["agreement"] < r["data"]["L-pps"]["agreement"] == 1.0
    assert {c["alignment"]["verdict"] for c in r["claims"]} <= {"reproduced", "not reproduced", "inconclusive"}
    md = (out / "results.md").read_text()
    assert "Table 2" in md and "Table 3" in md and "Fig. 2" in md
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 jobs to run" in proc.stderr
