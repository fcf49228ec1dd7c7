"""Crawl-like synthetic data and the paper's preprocessing / curation as tools (issue 23):
``edgefc data synth --wrong-caption ... --small``, ``edgefc data agreement``, ``edgefc data curate
--crop alignment --drop-contradicted --recaption --no-dedup`` and ``train kd --init``."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from edgefc.models import synth
from edgefc.models.train.curate import choose_crop, curate, data_agreement
from tests.cli import assert_user_error, run_cli

#: sha256 of ``synthesize(DIR, 12, size=64, seed=5, level=L)`` (every file, names and bytes) as it was
#: before the crawl-like defects existed: the clean data must stay byte for byte what it was.
CLEAN_DIGESTS = {1: "4462250c3d6544b5f31a7eca6843875974ff4aaa095c046bfccaf5b98c430558",
                 3: "5d958f471a9736e936551d9707fa395c9fa196dc1e829f2c632813c9cab51181"}


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("level", [1, 3])
def test_clean_data_keeps_its_bytes(tmp_path, level):
    synth.synthesize(tmp_path / "a", 12, size=64, seed=5, level=level)
    synth.synthesize(tmp_path / "b", 12, size=64, seed=5, level=level, defects=synth.Defects())  # all rates 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") == CLEAN_DIGESTS[level]


def test_each_defect_does_what_it_says(tmp_path):
    """Rate 1 of one defect at a time: the manifest lists it, and the verifier's caption agreement
    (as the training loader sees the images) falls where it should and only there."""
    agree = {}
    for name, d in [("boilerplate", synth.Defects(boilerplate=1)), ("wrong-caption", synth.Defects(wrong_caption=1)),
                    ("wrong-attribute", synth.Defects(wrong_attribute=1)),
                    ("missing-attributes", synth.Defects(missing_attributes=1)),
                    ("near-duplicate", synth.Defects(near_duplicates=1)), ("cut-crop", synth.Defects(cut_crop=1)),
                    ("small", synth.Defects(small=1))]:
        m = synth.synthesize(tmp_path / name, 24, seed=2, defects=d)
        hit = [it for it in m["items"] if any(x.startswith(name) for x in it["defects"])]
        assert len(hit) >= (20 if name != "near-duplicate" else 15), (name, m["defects"])
        agree[name] = data_agreement(tmp_path / name)
        if name == "small":
            assert all(it["image_size"] == [16, 16] for it in hit)
        if name == "cut-crop":
            assert all(sorted(it["image_size"]) == [64, 128] for it in hit)
    assert agree["boilerplate"]["agreement"] == 0.0 and agree["boilerplate"]["contradicted"] == 0.0
    assert agree["wrong-caption"]["agreement"] < 0.5 and agree["wrong-caption"]["contradicted"] == 1.0
    assert 0.7 <= agree["wrong-attribute"]["agreement"] <= 0.8 and agree["wrong-attribute"]["contradicted"] == 1.0
    assert agree["missing-attributes"]["agreement"] < 0.8 and agree["missing-attributes"]["contradicted"] == 0.0
    assert agree["cut-crop"]["per_attribute"]["position"] < 0.2  # the centre square moves or cuts the subject
    for name in ("near-duplicate", "small"):  # image defects that leave the captions right
        assert agree[name]["agreement"] == 1.0
    m = json.loads((tmp_path / "near-duplicate" / "manifest.json").read_text())
    sources = {it["defects"][0].split()[-1] for it in m["items"] if it["defects"]}
    assert len(sources) <= 24 // synth.DUPLICATES_PER_SOURCE + 1


def test_parse_partial_agrees_with_parse_caption():
    rng = np.random.default_rng(1)
    for _ in range(100):
        s = synth.sample_scene(rng, level=2)
        full = synth.parse_caption(s.caption)
        assert synth.parse_partial(s.caption) == full
    assert synth.parse_partial("click to enlarge") == {"background": None, "objects": []}
    assert synth.parse_partial("a red shape in the top left") == {
        "background": None, "objects": [{"shape": None, "colour": "red", "position": "top left", "size": None}]}


def test_curation_tools_recover_what_the_defects_cost(tmp_path):
    """L-pp (size filter, dedup, caption-aware crop), L-pps (re-captioned) and synt-cur (contradicted
    pairs dropped) each raise the set's caption agreement as they should."""
    crawl = tmp_path / "crawl"
    synth.synthesize(crawl, 60, seed=4, defects=synth.Defects(cut_crop=0.5, small=0.2, near_duplicates=0.2,
                                                              wrong_caption=0.2))
    base = data_agreement(crawl)
    pp = curate(crawl, tmp_path / "pp", min_size=64, threshold=4, hash_bits=256, crop="alignment", progress=False)
    assert pp["counts"].get("too-small", 0) >= 5 and pp["counts"].get("near-duplicate", 0) >= 5
    dups = {it["name"] for it in json.loads((crawl / "manifest.json").read_text())["items"]
            if any(d.startswith("near-duplicate") for d in it["defects"])}
    flagged = {r["key"] for r in pp["dropped"] if r["reason"] == "near-duplicate"}
    assert len(flagged - dups) <= 2  # the 256-bit hash leaves distinct renders of the same description alone
    cuts = {it["name"]: it["defects"][0] for it in json.loads((crawl / "manifest.json").read_text())["items"]
            if it["defects"] and it["defects"][0].startswith("cut-crop")}
    crops = {r["key"]: r["crop"] for r in pp["kept"] if r["key"] in cuts}
    assert crops and all(cuts[k].endswith(f"the {c})") for k, c in crops.items()), (crops, cuts)
    a_pp = data_agreement(tmp_path / "pp")
    assert a_pp["per_attribute"]["position"] > base["per_attribute"]["position"]
    pps = curate(crawl, tmp_path / "pps", min_size=64, threshold=4, hash_bits=256, crop="alignment", recaption=True,
                 progress=False)
    assert all("caption_before" in r for r in pps["kept"])
    assert data_agreement(tmp_path / "pps")["agreement"] == 1.0  # the reader wrote them

    syn = tmp_path / "synt"
    synth.synthesize(syn, 40, seed=6, defects=synth.Defects(wrong_attribute=0.3))
    cur = curate(syn, tmp_path / "cur", min_size=1, crop="center", drop_contradicted=True, dedup=False,
                 progress=False)
    wrong = {it["name"] for it in json.loads((syn / "manifest.json").read_text())["items"] if it["defects"]}
    assert {r["key"] for r in cur["dropped"]} == wrong and cur["counts"]["contradicted"] == len(wrong)
    assert data_agreement(tmp_path / "cur")["agreement"] == 1.0


def test_alignment_crop_needs_the_caption():
    from PIL import Image

    from edgefc.models.train.errors import DataError

    with pytest.raises(DataError, match="needs the caption"):
        choose_crop(Image.new("RGB", (128, 64)), "alignment")


def test_crawl_cli_and_its_errors(tmp_path):
    out = tmp_path / "crawl"
    rc, text = run_cli("data", "synth", "-o", str(out), "--count", "16", "--seed", "3", "--wrong-caption", "0.3",
                       "--boilerplate", "0.2", "--cut-crop", "0.3", "--quiet")
    assert rc == 0, text
    assert "with defects:" in text and "boilerplate" in text
    rc, text = run_cli("data", "agreement", str(out), "--json")
    assert rc == 0, text
    r = json.loads(text)
    assert r["count"] == 16 and 0 < r["agreement"] < 1 and r["level"] == 1
    rc, text = run_cli("data", "curate", str(out), "-o", str(tmp_path / "pps"), "--min-size", "64", "--crop",
                       "alignment", "--recaption", "--drop-contradicted", "--no-dedup", "--quiet")
    assert rc == 0, text
    rc, text = run_cli("data", "agreement", str(tmp_path / "pps"))
    assert rc == 0 and "caption agreement 1.000" in text, text
    assert_user_error(*run_cli("data", "synth", "-o", str(tmp_path / "x"), "--wrong-caption", "0.7",
                               "--boilerplate", "0.5"), "add up to 1.2")
    assert_user_error(*run_cli("data", "synth", "-o", str(tmp_path / "y"), "--small", "1.5"), "--small", "between 0 and 1")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert_user_error(*run_cli("data", "agreement", str(tmp_path / "missing")), "does not exist")
    assert_user_error(*run_cli("data", "agreement", str(out), "--resolution", "60"), "--resolution")


def test_kd_init_user_errors(tmp_path):
    rc, out = run_cli("data", "synth", "-o", str(tmp_path / "d"), "--count", "2", "--quiet")
    assert rc == 0, out
    base = ["train", "kd", "--teacher-arch", "mini", "--data", str(tmp_path / "d"), "--resolution", "64",
            "--steps", "1", "--batch-size", "1", "--threads", "1", "--quiet"]
    assert_user_error(*run_cli(*base, "-o", str(tmp_path / "o1"), "--init", str(tmp_path / "nope")), "does not exist")
    assert_user_error(*run_cli(*base, "-o", str(tmp_path / "o2"), "--init", str(tmp_path / "d")),
                      "not a diffusers U-Net")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_kd_init_fine_tunes_a_trained_student(tmp_path):
    """kd --init starts from the given student weights and trains on (one small step away from them)."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    from edgefc.models.train.kd import KDConfig, train_kd

    synth.synthesize(tmp_path / "d", 2)
    common = dict(teacher_arch="mini", tokenizer=tmp_path / "d" / "tokenizer", data=tmp_path / "d", resolution=64,
                  batch_size=1, threads=1, progress=False, lr=1e-3, steps=1)
    train_kd(KDConfig(output=tmp_path / "base", **common))
    train_kd(KDConfig(output=tmp_path / "ft", init=tmp_path / "base", **common))
    a = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(tmp_path / "ft" / "unet").state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.05
    assert json.loads((tmp_path / "ft" / "train.json").read_text())["config"]["init"] == str(tmp_path / "base")


def test_every_data_flag_is_in_help_and_readme():
    import re
    from pathlib import Path

    import click
    from click.testing import CliRunner

    from edgefc.cli import cli

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Training companion", 1)[1].split("\n## ", 1)[0]
    group = cli.get_command(click.Context(cli), "data")
    for name in ("synth", "curate", "agreement"):
        command = group.get_command(click.Context(group), name)
        out = CliRunner().invoke(cli, ["data", name, "--help"]).output
        flags = [o for p in command.params if p.param_type_name == "option" for o in p.opts if o.startswith("--")]
        missing = [f for f in flags if not re.search(rf"(^|[\s`,(]){re.escape(f)}([\s`=,)]|$)", section, re.M)
                   and f not in ("--quiet", "--output", "--json")]
        assert missing == [] and all(f in out for f in flags), (name, missing)


def test_256_bit_hash_keeps_the_64_bit_one_and_separates_renders():
    from PIL import Image

    from edgefc.models.train.curate import hamming, phash

    a = Image.fromarray(synth.make(0, seed=1)[1])
    shifted = Image.fromarray(np.clip(synth.make(0, seed=1)[1].astype(int) + 5, 0, 255).astype(np.uint8))
    assert phash(a) == phash(a, 64) < 2**64 and phash(a, 256) < 2**256
    assert hamming(phash(a, 256), phash(shifted, 256)) <= 4  # a colour-shifted copy
    # renders of one description (only the jitter differs): 64 bits often call them duplicates, 256 rarely
    same = {}
    for i in range(400):
        scene, img = synth.make(i, seed=1)
        same.setdefault((scene.background, scene.objects), []).append(
            Image.fromarray(img))
    pairs = [(x, y) for v in same.values() for i, x in enumerate(v) for y in v[i + 1:]]
    close64 = np.mean([hamming(phash(x), phash(y)) <= 2 for x, y in pairs])
    close256 = np.mean([hamming(phash(x, 256), phash(y, 256)) <= 4 for x, y in pairs])
    assert close256 < close64 / 2, (close64, close256)
