"""Training companion: BK-SDM KD and LCM distillation at tiny scale on CPU (issue 8).

Checks that can fail: both recipes reduce their loss on a fixed batch; a run resumed from a
checkpoint reproduces the uninterrupted run's losses; checkpoints hold no pickle; the BK-SDM
block removal / weight inheritance / feature pairing follow the paper's released code; the LCM
solver, boundary scalings and guidance embedding agree with diffusers; the fallback tokenizer is
CLIP's BPE with no merges; user errors exit 2 with one line and leave no output behind.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests import needs

#: every test here trains a torch model (each skips on its own without torch and diffusers)
pytestmark = needs.diffusers
if needs.installed("torch") and needs.installed("diffusers"):
    import torch

    from edgefc.models.train.kd import KDConfig, train_kd
    from edgefc.models.train.lcm import LCMConfig, train_lcm


def write_pairs(folder: Path, n: int = 6, size=(80, 64), seed: int = 0) -> Path:
    """n synthetic images (coloured background + discs) with captions."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.new("RGB", size, tuple(int(x) for x in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = (int(v) for v in rng.integers(0, min(size) - 20, 2))
            draw.ellipse([x, y, x + 20, y + 20], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a picture number {i} with circles")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run fastest single-threaded on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "data")


def _kw(pairs, **extra):
    kw = {"data": pairs, "teacher_arch": "tiny", "batch_size": 2, "lr": 1e-3, "resolution": 64, "progress": False}
    kw.update(extra)
    return kw


@pytest.fixture(scope="module")
def kd_run(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("kd") / "out"
    return train_kd(KDConfig(output=out, steps=30, fixed_batch=True, **_kw(pairs)))


def _losses(result, start=0):
    return [h["loss"] for h in result.losses[start:]]


def _no_pickle(folder: Path):
    bad = [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not bad, f"pickle-format files written: {bad}"


# ----------------------------------------------------------------------------- KD

def test_kd_reduces_loss_on_fixed_batch(kd_run):
    ls = _losses(kd_run)
    assert len(ls) == 30
    first, last = np.mean(ls[:5]), np.mean(ls[-5:])
    assert last < 0.8 * first, (first, last)
    rec = kd_run.losses[-1]
    for part in ("loss_sd", "loss_kd_out", "loss_kd_feat"):
        assert np.isfinite(rec[part]) and rec[part] >= 0
    # total = task + output KD + feature KD (all lambdas 1)
    assert rec["loss"] == pytest.approx(rec["loss_sd"] + rec["loss_kd_out"] + rec["loss_kd_feat"], rel=1e-5)


def test_kd_output_is_a_diffusers_folder_in_safetensors(kd_run):
    out = kd_run.output
    for need in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "checkpoint-30/optimizer.safetensors", "checkpoint-30/rng-0.safetensors",
                 "checkpoint-30/state.json", "train.json", "train_log.jsonl"):
        assert (out / need).is_file(), need
    _no_pickle(out)
    cfg = json.loads((out / "unet/config.json").read_text())
    assert cfg["mid_block_type"] is None and len(cfg["down_block_types"]) == 3  # BK-SDM-Tiny topology
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert not list(out.glob(".*tmp"))  # no temporary folders left


def test_bk_sdm_tiny_removal_matches_published_config():
    from diffusers import UNet2DConditionModel

    from edgefc.models.configs import get_config
    from edgefc.models.train.archs import bk_sdm_tiny_config

    for scale in ("full", "tiny"):
        assert bk_sdm_tiny_config(get_config("unet", "sd-v1.5", scale)) == get_config("unet", "bk-sdm-tiny", scale)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(bk_sdm_tiny_config(get_config("unet", "sd-v1.5", "full")))
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n - 323.4e6) / 323.4e6 < 0.005, n


def test_student_inherits_retained_teacher_blocks():
    """BK-SDM-Tiny's weight copy: up stage i <- teacher up stage i+1, its layers 0 and 2."""
    from diffusers import UNet2DConditionModel

    from edgefc.models.configs import get_config
    from edgefc.models.train.archs import init_student_from_teacher

    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(get_config("unet", "sd-v1.5", "tiny"))
    student = UNet2DConditionModel.from_config(get_config("unet", "bk-sdm-tiny", "tiny"))
    stats = init_student_from_teacher(student, teacher)
    assert stats["copied"] == stats["total"]
    t, s = teacher.state_dict(), student.state_dict()
    pairs = {
        "down_blocks.2.resnets.0.conv1.weight": "down_blocks.2.resnets.0.conv1.weight",
        "up_blocks.0.resnets.0.conv1.weight": "up_blocks.1.resnets.0.conv1.weight",
        "up_blocks.0.resnets.1.conv1.weight": "up_blocks.1.resnets.2.conv1.weight",
        "up_blocks.2.attentions.1.proj_out.weight": "up_blocks.3.attentions.2.proj_out.weight",
        "up_blocks.1.upsamplers.0.conv.weight": "up_blocks.2.upsamplers.0.conv.weight",
        "conv_out.weight": "conv_out.weight",
    }
    for sk, tk in pairs.items():
        assert torch.equal(s[sk], t[tk]), sk


def test_feature_pairs_follow_bk_sdm():
    from diffusers import UNet2DConditionModel

    from edgefc.models.configs import get_config
    from edgefc.models.train.kd import feature_pairs

    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(get_config("unet", "sd-v1.5", "tiny"))
        student = UNet2DConditionModel.from_config(get_config("unet", "bk-sdm-tiny", "tiny"))
    names = [(tn, sn) for tn, _, sn, _ in feature_pairs(teacher, student)]
    # Nota's kd_train_text_to_image.py, bk_tiny mapping
    assert names == [
        ("down_blocks.0", "down_blocks.0"),
        ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.1", "down_blocks.2.attentions.0"),
        ("up_blocks.1", "up_blocks.0"),
        ("up_blocks.2", "up_blocks.1"),
        ("up_blocks.3", "up_blocks.2"),
    ]


# ----------------------------------------------------------------------------- LCM

def test_lcm_reduces_loss_from_kd_init(kd_run, pairs, tmp_path):
    r = train_lcm(LCMConfig(output=tmp_path / "lcm", steps=30, fixed_batch=True, init=kd_run.output, **_kw(pairs)))
    ls = _losses(r)
    first, last = np.mean(ls[:5]), np.mean(ls[-5:])
    assert last < 0.5 * first, (first, last)
    out = r.output
    cfg = json.loads((out / "unet/config.json").read_text())
    assert cfg["time_cond_proj_dim"] == 256 and cfg["mid_block_type"] is None  # the KD student + w-embedding
    sched = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 50
    assert (out / "unet_online/diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoint-30/unet_target/diffusion_pytorch_model.safetensors").is_file()
    _no_pickle(out)


def test_lcm_solver_scalings_and_embedding_match_diffusers():
    from diffusers import DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler

    from edgefc.models.train.archs import SD_SCHEDULER
    from edgefc.models.train.lcm import DDIMSolver, boundary_scalings, guidance_scale_embedding

    ddim = DDIMScheduler(**SD_SCHEDULER, set_alpha_to_one=False, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    solver = DDIMSolver(ddim.alphas_cumprod, 1000, 50, "cpu")
    assert sorted(ddim.timesteps.tolist()) == solver.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    index = torch.tensor([0, 17, 49])
    ac = ddim.alphas_cumprod
    for row, i in enumerate(index.tolist()):
        t = int(solver.timesteps[i])
        x0 = (z[row] - (1 - ac[t]).sqrt() * eps[row]) / ac[t].sqrt()
        ref = ddim.step(eps[row : row + 1], t, z[row : row + 1], eta=0.0).prev_sample
        mine = solver.ddim_step(x0[None], eps[row : row + 1], index[row : row + 1])
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)

    lcm = LCMScheduler(**SD_SCHEDULER)
    for t in (0, 19, 500, 999):
        cs, co = boundary_scalings(torch.tensor([t]))
        ref_cs, ref_co = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert float(cs) == pytest.approx(float(ref_cs)) and float(co) == pytest.approx(float(ref_co))
    w = torch.tensor([3.0, 7.5, 15.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_scale_embedding(w, 256), ref)


def test_lcm_init_from_safetensors_file(pairs, tmp_path, capsys):
    """A bare state dict initialises the student; one that does not fit is a one-line error."""
    from safetensors.torch import save_file

    from edgefc.cli import main

    bad = tmp_path / "bad.safetensors"
    save_file({"conv_in.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(SystemExit) as e:
        main(["train", "lcm", "--teacher-arch", "tiny", "--data", str(pairs), "-o", str(tmp_path / "o"),
              "--init", str(bad), "--steps", "2", "--resolution", "64", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0]


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("kind", ["kd", "lcm"])
def test_resume_continues_the_same_loss_curve(kind, pairs, tmp_path):
    C, fn = (KDConfig, train_kd) if kind == "kd" else (LCMConfig, train_lcm)
    straight = fn(C(output=tmp_path / "a", steps=20, **_kw(pairs)))
    fn(C(output=tmp_path / "b", steps=10, **_kw(pairs)))
    resumed = fn(C(output=tmp_path / "b", steps=20, resume=tmp_path / "b/checkpoint-10", **_kw(pairs)))
    a, b = _losses(straight, 10), _losses(resumed, 10)
    assert len(a) == len(b) == 10
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    # the losses do vary step to step (random timesteps): equality is not trivial
    assert np.std(a) > 1e-4
    assert [r["step"] for r in resumed.losses] == list(range(1, 21))
    log = [json.loads(line) for line in (tmp_path / "b/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))


# ----------------------------------------------------------------------------- data + tokenizer

def test_webdataset_shard_and_dataset_items(pairs, tmp_path):
    from edgefc.models.tokenizer import ByteTokenizer
    from edgefc.models.train.data import ImageCaptionDataset, StepBatchSampler, list_samples

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tf:
        for p in sorted(pairs.iterdir()):
            tf.add(p, arcname=f"{p.stem}.{p.suffix[1:]}")
    folder, tar = list_samples(pairs), list_samples(shard)
    assert [s.caption for s in folder.samples] == [s.caption for s in tar.samples] and len(tar.samples) == 6
    ds = ImageCaptionDataset(tar.samples, 32, ByteTokenizer())
    item = ds[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["input_ids"].shape == (77,)
    assert -1.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    # the data order is a function of (seed, step): a sampler started at step 3 continues the other
    full = list(StepBatchSampler(6, 4, 0, 0, 6))
    assert list(StepBatchSampler(6, 4, 0, 3, 6)) == full[3:]
    assert sorted([i for batch in full[:3] for i in batch][:6]) == list(range(6))  # each epoch visits every item once


def test_fallback_tokenizer_is_clip_bpe_without_merges(tmp_path):
    """A CLIPTokenizer with only the 512 byte symbols (no merges) splits text exactly as the fallback."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from edgefc.models.tokenizer import BOS_ID, EOS_ID, ByteTokenizer, load_tokenizer

    b2u = bytes_to_unicode()
    symbols = [b2u[b] for b in b2u]
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = tmp_path / "weights" / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    clip = load_tokenizer(tmp_path / "weights")
    fallback = load_tokenizer(None)
    assert clip.kind == "clip" and fallback.kind == "fallback"
    for text in ["a cute cat, photo-realistic", "Hello   World!! it's 2024 ünïcödé a_!b", "x" * 100]:
        ref = [i for i in clip.encode([text])[0].tolist() if i < 512]
        mine = [i for i in fallback.encode([text])[0].tolist() if i < BOS_ID]
        assert ref == mine, text
    ids = ByteTokenizer().encode(["hi", ""])
    assert ids.shape == (2, 77) and ids.dtype == np.int64
    assert ids[0, :4].tolist() == [BOS_ID, ByteTokenizer().tokenize("h")[0] - 256, ids[0, 2], EOS_ID]
    assert ids[1, 0] == BOS_ID and (ids[1, 1:] == EOS_ID).all()
    long = ByteTokenizer().encode("word " * 100)[0]
    assert long[0] == BOS_ID and long[-1] == EOS_ID and (long[1:-1] < BOS_ID).all()


def test_word_tokenizer_gives_one_token_per_caption_word(tmp_path):
    """write_word_tokenizer: every listed word is one CLIP token (the real CLIPTokenizer reads the
    folder), other words still tokenise, and a save/reload (what training writes) keeps the ids."""
    from edgefc.models.synth import caption_words
    from edgefc.models.tokenizer import BOS_ID, EOS_ID, ByteTokenizer, load_tokenizer, write_word_tokenizer

    words = caption_words()
    assert {"circle", "triangle", "yellow", "background", "bottom"} <= set(words)
    tok = load_tokenizer(write_word_tokenizer(tmp_path / "tok", words))
    assert tok.kind == "clip"
    ids = tok.encode(" ".join(words))[0].tolist()
    assert ids[: len(words) + 2] == [BOS_ID, *ids[1 : len(words) + 1], EOS_ID]
    assert len(set(ids[1 : len(words) + 1])) == len(words) and max(ids[1 : len(words) + 1]) < BOS_ID
    assert tok.encode("grey background, red circle")[0, 1:6].tolist() == [
        tok.encode(w)[0, 1] for w in ("grey", "background", ",", "red", "circle")]
    # an unknown word: byte symbols (and merges of them), never an unknown token
    odd = tok.encode("a purple hexagon")[0]
    assert (odd[1:] != 0).all() and (odd < 49408).all() and int((odd != EOS_ID).sum()) > 4
    assert tok.encode("a")[0, 1] == ByteTokenizer().encode("a")[0, 1]  # single bytes keep CLIP's ids
    tok.save(tmp_path / "saved" / "tokenizer")
    again = load_tokenizer(tmp_path / "saved")
    assert again.kind == "clip"
    texts = ["a red circle in the top left on a grey background", "there is a blue square", ""]
    assert (again.encode(texts) == tok.encode(texts)).all()
    with pytest.raises(ValueError):
        write_word_tokenizer(tmp_path / "bad", ["Red"])


# ----------------------------------------------------------------------------- user errors

def _cli_error(capsys, argv):
    from edgefc.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("kind", ["kd", "lcm"])
def test_user_errors_exit_2_with_one_line(kind, pairs, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["train", kind, "--teacher-arch", "tiny", "-o", str(out), "--steps", "4", "--quiet"]
    msg = _cli_error(capsys, base + ["--data", str(tmp_path / "missing")])
    assert "does not exist" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no images here")
    assert "no image/caption pairs" in _cli_error(capsys, base + ["--data", str(empty)])
    assert "not a folder" in _cli_error(capsys, base + ["--data", str(pairs), "--resume", str(tmp_path / "nope")])
    assert "not an edgefc checkpoint" in _cli_error(capsys, base + ["--data", str(pairs), "--resume", str(empty)])
    ck = tmp_path / "ck"
    ck.mkdir()
    other = "lcm" if kind == "kd" else "kd"
    (ck / "state.json").write_text(json.dumps({"kind": other, "step": 1}))
    assert f"not a '{kind}' one" in _cli_error(capsys, base + ["--data", str(pairs), "--resume", str(ck)])
    assert "--threads" in _cli_error(capsys, base + ["--data", str(pairs), "--threads", "0"])
    assert "multiple of 8" in _cli_error(capsys, base + ["--data", str(pairs), "--resolution", "60"])
    no_teacher = ["train", kind, "--data", str(pairs), "-o", str(out), "--quiet"]
    assert "give a teacher" in _cli_error(capsys, no_teacher)
    assert "does not exist" in _cli_error(capsys, no_teacher + ["--teacher", str(tmp_path / "no-teacher")])
    assert not out.exists()  # nothing half-written


def test_resume_with_different_seed_is_refused(kd_run, pairs, tmp_path, capsys):
    msg = _cli_error(capsys, ["train", "kd", "--teacher-arch", "tiny", "--data", str(pairs), "-o", str(tmp_path / "o"),
                              "--steps", "40", "--batch-size", "2", "--resolution", "64", "--fixed-batch",
                              "--seed", "5", "--resume", str(kd_run.output / "checkpoint-30"), "--quiet"])
    assert "seed=0" in msg
