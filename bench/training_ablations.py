"""The EdgeFusion paper's training findings, reproduced in miniature: data quality (Table 2) and the
advanced LCM distillation (Table 3, Fig. 2), on the miniature of bench/mini_edgefusion.py.

EdgeFusion (paper Sec. 2.1-2.2) claims that (a) crawled pairs (L-orig: LAION, low-quality images,
irrelevant captions) distil worse than preprocessed (L-pp: deduplicated, small images removed,
better crops), re-captioned (L-pps) and synthetic (synt) data, with manual curation (synt-cur)
helping KD; and (b) LCM distillation works better from a student first fine-tuned by KD on good
data than from the base student, and with the original large teacher than with a same-size one.
Here every data set comes from the scene generator, so how noisy each is is a number (the
verifier's caption agreement), and every model is trained here:

==============  ==========================================================================
teacher         the miniature's VAE + SD-v1-layout teacher: reused from a finished
                ``bench/mini_edgefusion.py`` run (``--mini DIR``), else trained here at its budget
data sets       ``edgefc data synth`` with crawl-like defects (L-orig-like), ``edgefc data curate``
                (L-pp: size filter, dedup, caption-aware three-crop choice; L-pps: + re-captioned
                by the verifier's attribute reader), ``data synth --wrong-attribute`` (synt: a
                generator that sometimes misses part of its prompt), ``data curate
                --drop-contradicted`` (synt-cur), and L-pps & synt (both folders together)
KD (Table 2)    ``edgefc train kd`` BK-SDM-Tiny students from the teacher on each set, several seeds
base / KD-ft    base student = the KD student of L-orig-like (BK-SDM-Tiny was distilled on LAION);
                KD-fine-tuned = ``train kd --init base`` on L-pps & synt (BK-SDM-Adv-Tiny's step)
LCM (Table 3)   ``edgefc train lcm --init base|KD-ft`` on L-orig-like | L-pps & synt, the teacher as
                the LCM teacher
LCM (Fig. 2)    ``train lcm --init KD-ft --teacher KD-ft`` (a same-size teacher: the student's own
                architecture) vs the teacher, on L-pps & synt
evaluation      the same held-out prompts and seeds for every model: KD students at 25 DDIM steps
                with classifier-free guidance 3, LCM students at 1, 2 and 4 steps; verifier
                alignment (our CLIP-score analogue) and Fréchet distance to held-out real scenes
                (our FID analogue)
==============  ==========================================================================

Writes ``OUT/results.json`` (every run, every seed, mean and spread per row, the paper's direction
and our verdict per claim) and ``OUT/results.md`` (Tables 2 and 3 and Fig. 2 laid out as the
paper's, with the paper's direction beside each row). A claim is *reproduced* when our difference
has the paper's sign and exceeds both the seed spread (the larger seed standard deviation of the
two rows) and twice its standard error; *not reproduced* when it exceeds both with the other
sign; *inconclusive* otherwise.

Resumable: finished runs, samples and data sets are kept; an interrupted training run resumes
from its last checkpoint. Training runs (one torch thread each, ``--jobs`` at once) are the
``edgefc`` CLI in subprocesses; sampling and scoring run in subprocesses too.

    python bench/training_ablations.py --out /tmp/abl --mini /tmp/mini    # reuse a finished mini run
    python bench/training_ablations.py --out /tmp/abl                     # trains the teacher first
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mini_edgefusion as mini  # noqa: E402  (the miniature's teacher recipe, sampler and helpers)

#: Budgets. KD/LCM: (steps, batch, learning rate) per run; counts in pairs; seeds per row. Measured: see
#: docs/training.md (the full run within 60 minutes on the shared 2-core machine, teacher included).
FULL = {"crawl": 2000, "synt": 1000, "heldout": 128, "kd": (300, 16, 5e-4), "kd_ft": (150, 16, 5e-4),
        "lcm": (150, 16, 1e-4), "seeds": (0, 1, 2), "eval_steps": 25}
SMALL = {"crawl": 120, "synt": 60, "heldout": 16, "kd": (6, 4, 5e-4), "kd_ft": (4, 4, 5e-4),
         "lcm": (4, 4, 1e-4), "seeds": (0, 1), "eval_steps": 4}
#: L-orig-like: the defect rates of the crawl (``edgefc data synth`` flags); caption agreement 0.166.
#: Captions that state nothing dominate. One defect at a time (``--per-defect``,
#: docs/training.md) only boilerplate and missing attributes cost a KD student alignment: it learns the
#: text from the teacher's outputs on whatever caption it is given, so another scene's caption still
#: teaches. A crawl weighted to wrong captions (wrong caption 0.45, missing 0.2, boilerplate 0.25:
#: agreement 0.301) left KD students within the seed spread of clean data (0.770 +- 0.008 against L-pps
#: 0.757 +- 0.004, 3 seeds); these rates took a 300-step student to 0.666 (one seed), boilerplate 0.75 to 0.633.
CRAWL = {"wrong-caption": 0.15, "missing-attributes": 0.25, "boilerplate": 0.6, "near-duplicates": 0.3,
         "cut-crop": 0.3, "small": 0.3}
#: ``--per-defect``: one set per defect, alone at rate 1 (the crawl's scenes; "none": no defect), for KD.
PER_DEFECT = ("none", "boilerplate", "wrong-caption", "wrong-attribute", "missing-attributes", "near-duplicates",
              "cut-crop", "small")
#: synt: a text-to-image generator that misses one attribute of its prompt this often.
SYNT = {"wrong-attribute": 0.2}
#: L-pp's preprocessing (``edgefc data curate``): the miniature's images are 64 px, so "small" is under 64.
PP = ["--min-size", "64", "--hash-bits", "256", "--dedup-threshold", "4", "--crop", "alignment"]
SETS = ("L-orig", "L-pp", "L-pps", "synt", "synt-cur", "L-pps+synt")
SET_LABEL = {"L-orig": "L-orig-like", "L-pps+synt": "L-pps & synt"}
LCM_STEPS = (1, 2, 4)
#: LCM runs: name -> (init, data set, LCM teacher).
LCM_RUNS = {"base-L-orig": ("base", "L-orig", "teacher"), "base-L-pps+synt": ("base", "L-pps+synt", "teacher"),
            "kdft-L-orig": ("kdft", "L-orig", "teacher"), "kdft-L-pps+synt": ("kdft", "L-pps+synt", "teacher"),
            "kdft-L-pps+synt-self": ("kdft", "L-pps+synt", "self")}
SEED_SAMPLES = 10_000  # sampling seeds: SEED_SAMPLES + prompt index, the same for every model


def say(msg: str) -> None:
    mini.say(msg)


# --- data sets -------------------------------------------------------------------------------------

def edgefc(*args) -> None:
    mini.edgefc(*args)


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def union(dst: Path, parts: dict[str, Path]) -> None:
    """A folder holding the pairs of several sets (hard links, one subfolder each), made atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, src in parts.items():
        (tmp / name).mkdir(parents=True)
        for f in src.iterdir():
            if f.suffix in (".png", ".txt"):
                os.link(f, tmp / name / f.name)
    tmp.rename(dst)


def make_sets(out: Path, b: dict) -> dict[str, Path]:
    sets = out / "sets"
    sets.mkdir(parents=True, exist_ok=True)
    p = {name: sets / name for name in SETS}
    held = out / "data" / "heldout"
    if not (held / "manifest.json").is_file():
        held.parent.mkdir(parents=True, exist_ok=True)
        edgefc("data", "synth", "-o", held, "--count", b["heldout"], "--seed", 1, "--size", mini.SIZE, "--quiet")
    if not (p["L-orig"] / "manifest.json").is_file():
        edgefc("data", "synth", "-o", p["L-orig"], "--count", b["crawl"], "--seed", 10, "--size", mini.SIZE,
               *flags(CRAWL), "--quiet")
    if not (p["L-pp"] / "manifest.json").is_file():
        edgefc("data", "curate", p["L-orig"], "-o", p["L-pp"], *PP, "--quiet")
    if not (p["L-pps"] / "manifest.json").is_file():
        edgefc("data", "curate", p["L-orig"], "-o", p["L-pps"], *PP, "--recaption", "--quiet")
    if not (p["synt"] / "manifest.json").is_file():
        edgefc("data", "synth", "-o", p["synt"], "--count", b["synt"], "--seed", 20, "--size", mini.SIZE,
               *flags(SYNT), "--quiet")
    if not (p["synt-cur"] / "manifest.json").is_file():
        edgefc("data", "curate", p["synt"], "-o", p["synt-cur"], "--min-size", 1, "--no-dedup", "--crop", "center",
               "--drop-contradicted", "--quiet")
    if not p["L-pps+synt"].is_dir():
        union(p["L-pps+synt"], {"L-pps": p["L-pps"], "synt": p["synt"]})
    return p


def defect_sets(out: Path, b: dict) -> dict[str, Path]:
    """``--per-defect``: the crawl's scenes (seed 10) with one defect at rate 1 each."""
    p = {f"defect-{d}": out / "sets" / f"defect-{d}" for d in PER_DEFECT}
    for d in PER_DEFECT:
        path = p[f"defect-{d}"]
        if not (path / "manifest.json").is_file():
            edgefc("data", "synth", "-o", path, "--count", b["crawl"], "--seed", 10, "--size", mini.SIZE,
                   *([] if d == "none" else [f"--{d}", 1]), "--quiet")
    return p


def data_rows(out: Path, paths: dict[str, Path]) -> dict[str, dict]:
    """Per set: pairs and the verifier's caption agreement as the training loader sees it (cached)."""
    cache = out / "data_agreement.json"
    rows = json.loads(cache.read_text()) if cache.is_file() else {}
    from edgefc.models.train.curate import data_agreement

    for name, path in paths.items():
        if name not in rows:
            r = data_agreement(path, mini.SIZE, 1)
            rows[name] = {"pairs": r["count"], "agreement": round(r["agreement"], 4),
                          "contradicted": round(r["contradicted"], 4),
                          "per_attribute": {k: round(v, 4) for k, v in r["per_attribute"].items()}}
            cache.write_text(json.dumps(rows, indent=1))
    return rows


# --- jobs ------------------------------------------------------------------------------------------

class Job:
    """One training run or one sampling pass, with its dependencies; ``spec()`` (made when the job starts,
    so a resumed run finds its last checkpoint) is what a worker runs (:func:`work`)."""

    def __init__(self, name: str, spec, deps=(), done=None):
        self.name, self.spec, self.deps, self._done = name, spec, list(deps), done

    def done(self) -> bool:
        return self._done()


def train_job(name: str, out: Path, recipe: str, data: Path, options: dict, budget: tuple, seed: int,
              deps=()) -> Job:
    """``edgefc train RECIPE`` (through its API: the same config the CLI builds); finished when
    ``train.json`` records these steps; an interrupted run resumes from its last checkpoint."""
    steps, batch, lr = budget

    def finished():
        f = out / "train.json"
        return f.is_file() and json.loads(f.read_text()).get("steps") == steps

    def spec():
        ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if out.is_dir() else []
        ckpts = [c for c in ckpts if int(c.name.split("-")[1]) < steps]
        cfg = dict(options, data=data, resolution=mini.SIZE, output=out, steps=steps, batch_size=batch, lr=lr,
                   seed=seed, save_every=max(1, steps // 2), progress=False, resume=ckpts[-1] if ckpts else None)
        return ("train", recipe, cfg)

    return Job(name, spec, deps, finished)


def sample_job(name: str, out: Path, models: dict[str, tuple[Path, str]], deps=()) -> Job:
    """Sample and score several models ({sample set name: (folder, "ddim" | "lcm")}) in one pass."""
    def finished():
        return all((out / "samples" / n / "score.json").is_file() for n in models)

    def spec():
        return ("sample", str(out), {n: (str(f), k) for n, (f, k) in models.items()})

    return Job(name, spec, deps, finished)


#: recipe -> (module, config class, training function): what ``edgefc train RECIPE`` calls.
RECIPES = {"vae": ("edgefc.models.train.sd", "VAEConfig", "train_vae"),
           "sd": ("edgefc.models.train.sd", "SDConfig", "train_sd"),
           "kd": ("edgefc.models.train.kd", "KDConfig", "train_kd"),
           "lcm": ("edgefc.models.train.lcm", "LCMConfig", "train_lcm")}


def _init_worker(threads: int) -> None:
    os.environ["EDGEFC_TORCH_THREADS"] = str(threads)
    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    torch.set_num_threads(threads)
    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def work(spec) -> tuple[float, str]:
    """Run one job in a worker process; returns (its CPU seconds, a one-line summary)."""
    import resource

    import torch

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the data sets job's edgefc calls
    torch.set_grad_enabled(True)  # a sampling job before this one in the worker turned it off (mini.load_pipe)
    if spec[0] == "train":
        _, recipe, cfg = spec
        module, config, train = RECIPES[recipe]
        m = importlib.import_module(module)
        fn, C = getattr(m, train), getattr(m, config)
        r = fn(C(**cfg))
        msg = f"{r.output.name}: steps {r.steps}, loss {r.losses[0]['loss']:.4g} -> {r.losses[-1]['loss']:.4g}"
    elif spec[0] == "sets":
        _, out, b = spec
        data_rows(Path(out), make_sets(Path(out), b))
        msg = "data sets"
    elif spec[0] == "defect sets":
        _, out, b = spec
        data_rows(Path(out), defect_sets(Path(out), b))
        msg = "defect sets"
    else:
        _, out, models = spec
        for name, (folder, kind) in models.items():
            dest = Path(out) / "samples" / name
            if not (dest / "score.json").is_file():
                sample_main(Path(out), Path(folder), kind, dest)
        msg = ", ".join(models)
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
            + c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime), msg


def run_jobs(jobs: list[Job], slots: int, threads: int, log: Path) -> dict:
    """Run the jobs on ``slots`` worker processes (one torch import each), each job as soon as its
    dependencies are done (list order first); returns {name: {"wall_s", "cpu_s"}} of the jobs run now."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    times: dict[str, dict] = {}
    done = {j.name for j in jobs if j.done()}
    pending = [j for j in jobs if j.name not in done]
    say(f"   {len(pending)} jobs to run ({len(done)} done), {slots} at a time")
    if not pending:
        return times
    failed = None
    running = {}
    ctx = multiprocessing.get_context("spawn")  # fresh workers: no torch state forked from here
    with ProcessPoolExecutor(max_workers=slots, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        while pending or running:
            while failed is None and len(running) < slots:
                ready = next((j for j in pending if all(d in done for d in j.deps)), None)
                if ready is None:
                    break
                pending.remove(ready)
                say(f"   start {ready.name}")
                running[pool.submit(work, ready.spec())] = (ready, time.perf_counter())
            if not running:
                if pending and failed is None:
                    raise SystemExit(f"jobs wait for dependencies that cannot finish: {[j.name for j in pending][:3]}")
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job, t0 = running.pop(fut)
                wall = time.perf_counter() - t0
                err = fut.exception()
                if err is not None:
                    say(f"   FAILED {job.name}: {type(err).__name__}: {err}")
                    failed = failed or job.name
                    continue
                cpu, msg = fut.result()
                done.add(job.name)
                times[job.name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
                log.write_text(json.dumps({**json.loads(log.read_text()), **times} if log.is_file() else times,
                                          indent=1))
                say(f"   done {job.name}: {wall:.0f} s wall, {cpu:.0f} s CPU ({msg})")
    if failed:
        raise SystemExit(f"{failed} failed (see above); rerun the same command to resume")
    return times


# --- sampling ---------------------------------------------------------------------------------------

def sample_lcm(folder: Path, prompts: list[str], seeds: list[int], steps: int) -> list[np.ndarray]:
    """``steps`` LCM steps of ``folder``'s baked U-Net (as ``edgefc generate --weights``: the final
    step's ``denoised`` is decoded), batched, FP32."""
    import torch
    from diffusers import LCMScheduler

    unet, te, vae, tok = mini.load_pipe(folder)
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    images = []
    for i in range(0, len(prompts), 32):
        p, s = prompts[i:i + 32], seeds[i:i + 32]
        sched = LCMScheduler.from_config(cfg)
        sched.set_timesteps(steps)
        cond = mini.embed(te, tok, p)
        x = torch.cat([torch.randn((1, 4, mini.SIZE // 8, mini.SIZE // 8), generator=torch.Generator().manual_seed(k))
                       for k in s]) * sched.init_noise_sigma
        g = torch.Generator().manual_seed(s[0])
        denoised = x
        for t in sched.timesteps:
            o = sched.step(unet(x, t, cond).sample, t, x, generator=g)
            x, denoised = o.prev_sample, o.denoised
        images += mini.to_uint8(vae.decode(denoised / vae.config.scaling_factor).sample)
    return images


def score_set(images, prompts, held_feats) -> dict:
    from edgefc.models.verifier import features, frechet_distance, score

    r = score(images, prompts)
    return {"alignment": round(r["alignment"], 4), "fid": round(frechet_distance(features(images), held_feats), 3),
            "per_attribute": {k: round(v, 4) for k, v in r["per_attribute"].items()}}


def sample_main(out: Path, folder: Path, kind: str, dest: Path) -> None:
    """Sample ``folder`` on the held-out prompts and score it: ``kind`` ddim (25 steps, CFG) or lcm (1/2/4)."""
    from edgefc.models.verifier import features, load_pairs

    eval_steps = json.loads((out / "budget.json").read_text())["eval_steps"]

    _, held_images, prompts = load_pairs(out / "data" / "heldout")
    held_feats = features(held_images)
    seeds = [SEED_SAMPLES + i for i in range(len(prompts))]
    scores = {}
    shutil.rmtree(dest, ignore_errors=True)  # a pass cut short left part of a set
    if kind == "ddim":
        ims = mini.sample_ddim(folder, prompts, seeds, eval_steps, mini.GUIDANCE)
        mini.save_set(dest / f"ddim-{eval_steps}", ims, prompts)
        scores[str(eval_steps)] = score_set(ims, prompts, held_feats)
    else:
        for steps in LCM_STEPS:
            ims = sample_lcm(folder, prompts, seeds, steps)
            mini.save_set(dest / f"lcm-{steps}", ims, prompts)
            scores[str(steps)] = score_set(ims, prompts, held_feats)
    (dest / "score.json").write_text(json.dumps(scores, indent=1))


# --- statistics, verdicts, tables ---------------------------------------------------------------------

def stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
            "values": [round(float(v), 4) for v in a]}


def verdict(a: dict, b: dict, better: str) -> dict:
    """Is row ``a`` better than row ``b`` (``better``: "higher" or "lower")? See the module docstring."""
    d = a["mean"] - b["mean"]
    se = float(np.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"]))
    spread = max(a["sd"], b["sd"])
    if min(a["n"], b["n"]) < 2 or abs(d) <= spread or abs(d) <= 2 * se:
        v = "inconclusive"  # (one seed: no spread to compare with)
    else:
        v = "reproduced" if (d > 0) == (better == "higher") else "not reproduced"
    return {"difference": round(d, 4), "se": round(se, 4), "spread": round(spread, 4), "verdict": v}


#: The paper's claims we test: (id, source, row a, row b, what the paper says). Rows: ("kd", set) or
#: ("lcm", run name). The paper's direction is "a better than b" on both metrics.
CLAIMS = [
    ("pp", "Table 2", ("kd", "L-pp"), ("kd", "L-orig"), "preprocessing (dedup, small images out, crop) helps KD"),
    ("pps", "Table 2", ("kd", "L-pps"), ("kd", "L-pp"), "re-captioning helps KD"),
    ("synt", "Table 2", ("kd", "synt"), ("kd", "L-orig"), "synthetic data beats crawled data"),
    ("synt-cur", "Table 2", ("kd", "synt-cur"), ("kd", "synt"), "curation helps KD"),
    ("both", "Table 2", ("kd", "L-pps+synt"), ("kd", "L-orig"), "L-pps & synt beats crawled data"),
    ("kd-ft", "Table 3", ("lcm", "kdft-L-pps+synt"), ("lcm", "base-L-pps+synt"),
     "LCM from the KD-fine-tuned student beats LCM from the base student (paper without it: -2.67 IS, "
     "+2.72 FID, -0.01 CLIP)"),
    ("lcm-data", "Table 3", ("lcm", "kdft-L-pps+synt"), ("lcm", "kdft-L-orig"), "LCM on L-pps & synt beats L-orig"),
    ("lcm-data-base", "Table 3", ("lcm", "base-L-pps+synt"), ("lcm", "base-L-orig"),
     "LCM on L-pps & synt beats L-orig (base student)"),
    ("teacher", "Fig. 2", ("lcm", "kdft-L-pps+synt"), ("lcm", "kdft-L-pps+synt-self"),
     "the original large teacher beats a same-size teacher in the LCM phase"),
]
#: The paper's direction beside each of our rows.
DIRECTION = {
    ("kd", "L-orig"): "worst (crawled: noisy captions, low-quality images)",
    ("kd", "L-pp"): "better than L-orig",
    ("kd", "L-pps"): "better than L-pp",
    ("kd", "synt"): "better than L-orig",
    ("kd", "synt-cur"): "better than synt (curation helps KD)",
    ("kd", "L-pps+synt"): "better than L-orig (EdgeFusion's data)",
    ("lcm", "base-L-orig"): "worst (plain LCM of BK-SDM-Tiny on crawled data)",
    ("lcm", "base-L-pps+synt"): "better than on L-orig",
    ("lcm", "kdft-L-orig"): "better than base on L-orig",
    ("lcm", "kdft-L-pps+synt"): "best (EdgeFusion: KD-fine-tuned student, good data)",
    ("lcm", "kdft-L-pps+synt-self"): "worse than the large teacher (Fig. 2)",
}


def fmt(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def markdown(res: dict) -> str:
    kd, lcm, data = res["kd"], res["lcm"], res["data"]
    n_seeds = len(res["budget"]["seeds"])
    ev = res["budget"]["eval_steps"]
    L = ["# The paper's training findings in miniature (bench/training_ablations.py)", "",
         f"Teacher: {res['teacher']}. Every row: mean ± standard deviation over {n_seeds} training seeds; "
         f"{res['heldout']} held-out prompts, the same sampling seeds for every model. Alignment = the "
         "verifier's attribute accuracy against the prompt (our CLIP-score analogue, higher is better); "
         "Fréchet = distance of verifier features to held-out real scenes (our FID analogue, lower is better). "
         "Caption agreement = the verifier's measure of the set's own captions as the training loader "
         "sees the images (`edgefc data agreement`).", "",
         f"## Table 2: KD with different data (BK-SDM-Tiny-layout student, {ev} DDIM steps, guidance {mini.GUIDANCE:g})",
         "", "| data | pairs | caption agreement | alignment | Fréchet | paper |", "|---|---|---|---|---|---|"]
    t = res["teacher_row"]
    L.append(f"| (teacher) | - | - | {t['alignment']:.3f} | {t['fid']:.2f} | - |")
    for name in SETS:
        r = kd[name]
        L.append(f"| {SET_LABEL.get(name, name)} | {data[name]['pairs']} | {data[name]['agreement']:.3f} | "
                 f"{fmt(r['alignment'])} | {fmt(r['fid'], 2)} | {DIRECTION[('kd', name)]} |")
    L += ["", "## Table 3 and Fig. 2: LCM distillation (alignment / Fréchet at 1, 2, 4 steps)", "",
          "| LCM init | LCM data | LCM teacher | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in LCM_STEPS)
          + " | paper |", "|---|---|---|" + "---|" * len(LCM_STEPS) + "---|"]
    for name, (init, dset, teacher) in LCM_RUNS.items():
        r = lcm[name]
        cells = [f"{fmt(r[str(s)]['alignment'])} / {fmt(r[str(s)]['fid'], 2)}" for s in LCM_STEPS]
        L.append(f"| {'base student' if init == 'base' else 'KD-fine-tuned'} | {SET_LABEL.get(dset, dset)} | "
                 f"{'teacher' if teacher == 'teacher' else 'itself (same size)'} | " + " | ".join(cells)
                 + f" | {DIRECTION[('lcm', name)]} |")
    L += ["", "## The paper's claims", "",
          "Verdict per metric: *reproduced* = our difference has the paper's sign and exceeds both the seed "
          "spread (larger standard deviation of the two rows) and twice its standard error; *not reproduced* = "
          "the same with the other sign; *inconclusive* = within the spread. LCM rows at 2 steps (EdgeFusion's).", "",
          "| claim | source | paper | alignment: ours (difference ± SE) | verdict | Fréchet: ours | verdict |",
          "|---|---|---|---|---|---|---|"]
    for c in res["claims"]:
        a, f = c["alignment"], c["fid"]
        L.append(f"| {c['a']} vs {c['b']} | {c['source']} | {c['paper']} | {a['difference']:+.3f} ± {a['se']:.3f} | "
                 f"{a['verdict']} | {f['difference']:+.2f} ± {f['se']:.2f} | {f['verdict']} |")
    if res.get("per_defect"):
        pdf = res["per_defect"]
        none = pdf["none"]["alignment"]["mean"]
        L += ["", f"## One defect at a time (KD, {ev} DDIM steps; {pdf['none']['alignment']['n']} seeds; "
              f"the crawl's {pdf['none']['data']['pairs']} scenes with one defect at rate 1)", "",
              "| defect | caption agreement | alignment | vs no defect | Fréchet |", "|---|---|---|---|---|"]
        for d, r in pdf.items():
            L.append(f"| {d} | {r['data']['agreement']:.3f} | {fmt(r['alignment'])} | "
                     f"{r['alignment']['mean'] - none:+.3f} | {fmt(r['fid'], 2)} |")
    L += ["", "## Data sets", "", "| set | pairs | caption agreement | contradicted | per attribute |", "|---|---|---|---|---|"]
    for name in SETS:
        d = data[name]
        L.append(f"| {SET_LABEL.get(name, name)} | {d['pairs']} | {d['agreement']:.3f} | {d['contradicted']:.3f} | "
                 + ", ".join(f"{k} {v:.2f}" for k, v in d["per_attribute"].items()) + " |")
    L += ["", f"Total: {res['minutes_all_invocations']:.1f} min wall over {len(res['invocations'])} invocation(s) "
          f"(this one: {res['minutes']:.1f} min, {res['cpu_minutes']:.1f} CPU-min in its jobs); "
          f"budgets: KD {tuple(res['budget']['kd'])}, KD fine-tuning {tuple(res['budget']['kd_ft'])}, "
          f"LCM {tuple(res['budget']['lcm'])} (steps, batch, lr); {res['jobs']} jobs at once, "
          f"{res['threads']} torch thread each.", ""]
    return "\n".join(L)


# --- the run ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="Output folder (reused: finished work is kept).")
    ap.add_argument("--mini", type=Path, default=None,
                    help="A finished bench/mini_edgefusion.py output folder (with results.json): reuse its "
                         "teacher instead of training one here.")
    ap.add_argument("--small", action="store_true", help="A few-minute version (tests): tiny budgets, 2 seeds.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1).")
    ap.add_argument("--jobs", type=int, default=2, help="Training/sampling jobs at once (default 2: two cores).")
    ap.add_argument("--per-defect", action="store_true",
                    help="Also (after the tables' runs) KD students on the crawl's scenes with one defect at a time at "
                         "rate 1, two seeds: what each defect does to a student's alignment (not in the 60-minute "
                         "budget: about 15 more minutes; rerun on the same --out to add them).")
    args = ap.parse_args(argv)
    b = SMALL if args.small else FULL
    out = args.out.resolve()
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit("--jobs and --threads must be at least 1")
    if args.mini is not None:
        mdir = args.mini.resolve()
        if not (mdir / "results.json").is_file() or not (mdir / "teacher" / "train.json").is_file():
            raise SystemExit(f"--mini {mdir}: no finished bench/mini_edgefusion.py run there (results.json and "
                             "teacher/train.json)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in b.items()}))
    t0 = time.perf_counter()
    paths = {name: out / "sets" / name for name in SETS}

    def sets_done():
        f = out / "data_agreement.json"
        return f.is_file() and set(json.loads(f.read_text())) >= set(SETS)

    # the data sets are a job too: built on one worker while the other trains the VAE
    jobs = [Job("data sets", lambda: ("sets", str(out), b), [], sets_done)]
    if args.mini is not None:
        teacher = args.mini.resolve() / "teacher"
        teacher_src = f"reused from {args.mini.resolve()} (bench/mini_edgefusion.py)"
    else:
        mb = mini.SMALL if args.small else mini.FULL
        teacher = out / "teacher"
        teacher_src = f"trained here (bench/mini_edgefusion.py's recipe and budget{', --small' if args.small else ''})"
        train = out / "data" / "train"
        if not (train / "manifest.json").is_file():
            train.parent.mkdir(parents=True, exist_ok=True)
            edgefc("data", "synth", "-o", train, "--count", mb["train"], "--seed", 0, "--size", mini.SIZE, "--quiet")
        jobs.append(train_job("vae", out / "vae", "vae", train, {"teacher_arch": "mini", "tokenizer": train / "tokenizer",
                                                                  "fg_weight": 1.0}, mb["vae"], 0))
        jobs.append(train_job("teacher", teacher, "sd", train, {"teacher": out / "vae",
                                                                 "prediction_type": "v_prediction"},
                              mb["teacher"], 0, deps=["vae"]))
    tdeps = ["data sets"] + ([] if args.mini is not None else ["teacher"])
    runs = out / "runs"
    jobs.append(sample_job("sample teacher", out, {"teacher": (teacher, "ddim")}, deps=tdeps))
    w = mini.GUIDANCE - 1
    lcm_opts = {"bake_guidance": w, "w_min": max(0.0, w - 1), "w_max": w + 1, "num_ddim_timesteps": 50}
    later = []
    for s in b["seeds"]:
        base, kdft = runs / f"kd-L-orig-s{s}", runs / f"kdft-s{s}"
        kd_opts = {"teacher": teacher, "student_arch": "bk-sdm-tiny"}
        jobs.append(train_job(f"kd L-orig s{s}", base, "kd", paths["L-orig"], kd_opts, b["kd"], s, deps=tdeps))
        jobs.append(train_job(f"kd-ft s{s}", kdft, "kd", paths["L-pps+synt"], {**kd_opts, "init": base}, b["kd_ft"], s,
                              deps=[f"kd L-orig s{s}"]))
        for name, (init, dset, lteacher) in LCM_RUNS.items():
            init_dir, init_job = (base, f"kd L-orig s{s}") if init == "base" else (kdft, f"kd-ft s{s}")
            run = runs / f"lcm-{name}-s{s}"
            jobs.append(train_job(f"lcm {name} s{s}", run, "lcm", paths[dset],
                                  {"teacher": teacher if lteacher == "teacher" else kdft, "init": init_dir, **lcm_opts},
                                  b["lcm"], s, deps=[init_job] + ([f"kd-ft s{s}"] if lteacher == "self" else []) + tdeps))
            jobs.append(sample_job(f"sample lcm-{name}-s{s}", out, {f"lcm-{name}-s{s}": (run, "lcm")},
                                   deps=[f"lcm {name} s{s}"]))
        jobs.append(sample_job(f"sample kd-L-orig-s{s}", out, {f"kd-L-orig-s{s}": (base, "ddim")},
                               deps=[f"kd L-orig s{s}"]))
        for name in SETS[1:]:
            later.append(train_job(f"kd {name} s{s}", runs / f"kd-{name}-s{s}", "kd", paths[name], kd_opts, b["kd"], s,
                                   deps=tdeps))
            later.append(sample_job(f"sample kd-{name}-s{s}", out, {f"kd-{name}-s{s}": (runs / f"kd-{name}-s{s}", "ddim")},
                                    deps=[f"kd {name} s{s}"]))
    extra = []
    if args.per_defect:
        def defects_done():
            f = out / "data_agreement.json"
            return f.is_file() and {f"defect-{d}" for d in PER_DEFECT} <= set(json.loads(f.read_text()))

        extra.append(Job("defect sets", lambda: ("defect sets", str(out), b), ["data sets"], defects_done))
        for s in b["seeds"][:2]:
            for d in PER_DEFECT:
                name = f"defect-{d}"
                extra.append(train_job(f"kd {name} s{s}", runs / f"kd-{name}-s{s}", "kd", out / "sets" / name, kd_opts,
                                       b["kd"], s, deps=tdeps + ["defect sets"]))
                extra.append(sample_job(f"sample kd-{name}-s{s}", out,
                                        {f"kd-{name}-s{s}": (runs / f"kd-{name}-s{s}", "ddim")}, deps=[f"kd {name} s{s}"]))
    # the chain base -> KD-ft -> LCM first (it is the longest), the independent KD rows fill the other slots
    say("== data sets, training and sampling")
    times = run_jobs(jobs + later + extra, args.jobs, args.threads, out / "job_times.json")
    data = json.loads((out / "data_agreement.json").read_text())
    data = {k: v for k, v in data.items() if k in SETS or k.startswith("defect-")}
    for name in SETS:
        say(f"   {SET_LABEL.get(name, name)}: {data[name]['pairs']} pairs, caption agreement {data[name]['agreement']:.3f}")

    def scores(name):
        return json.loads((out / "samples" / name / "score.json").read_text())

    ev = str(b["eval_steps"])
    res_kd = {}
    for name in SETS:
        per = [scores(f"kd-{name}-s{s}")[ev] for s in b["seeds"]]
        res_kd[name] = {"alignment": stats([p["alignment"] for p in per]), "fid": stats([p["fid"] for p in per]),
                        "per_seed": per}
    res_lcm = {}
    for name in LCM_RUNS:
        per = [scores(f"lcm-{name}-s{s}") for s in b["seeds"]]
        res_lcm[name] = {str(k): {"alignment": stats([p[str(k)]["alignment"] for p in per]),
                                  "fid": stats([p[str(k)]["fid"] for p in per])} for k in LCM_STEPS}
        res_lcm[name]["per_seed"] = per
    claims = []
    for cid, source, a, bb, paper in CLAIMS:
        def row(x):
            return res_kd[x[1]] if x[0] == "kd" else res_lcm[x[1]]["2"]
        claims.append({"id": cid, "source": source, "paper": paper,
                       "a": f"{x_label(a)}", "b": f"{x_label(bb)}",
                       "alignment": verdict(row(a)["alignment"], row(bb)["alignment"], "higher"),
                       "fid": verdict(row(a)["fid"], row(bb)["fid"], "lower")})
    per_defect = {}
    if all((out / "samples" / f"kd-defect-{d}-s{s}" / "score.json").is_file() for d in PER_DEFECT
           for s in b["seeds"][:2]):  # this run's --per-defect, or an earlier one's on the same --out
        for d in PER_DEFECT:
            per = [scores(f"kd-defect-{d}-s{s}")[ev] for s in b["seeds"][:2]]
            per_defect[d] = {"alignment": stats([p["alignment"] for p in per]), "fid": stats([p["fid"] for p in per]),
                             "data": data[f"defect-{d}"], "per_seed": per}
    cpu = sum(v["cpu_s"] for v in times.values()) / 60
    minutes = (time.perf_counter() - t0) / 60
    inv_path = out / "invocations.json"  # wall minutes of every invocation that did work (a resumed run: several)
    invocations = json.loads(inv_path.read_text()) if inv_path.is_file() else []
    if times:
        invocations.append({"minutes": round(minutes, 2), "cpu_minutes": round(cpu, 2), "jobs_run": len(times)})
        inv_path.write_text(json.dumps(invocations, indent=1))
    res = {"minutes": round(minutes, 2), "cpu_minutes": round(cpu, 2), "teacher": teacher_src,
           "invocations": invocations, "minutes_all_invocations": round(sum(i["minutes"] for i in invocations), 2),
           "teacher_row": scores("teacher")[ev], "heldout": b["heldout"], "data": data, "kd": res_kd,
           "lcm": res_lcm, "claims": claims, "per_defect": per_defect, "crawl_defects": CRAWL, "synt_defects": SYNT, "preprocessing": PP,
           "budget": {k: list(v) if isinstance(v, tuple) else v for k, v in b.items()}, "jobs": args.jobs,
           "threads": args.threads, "small": args.small, "job_times": times}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    say(f"done in {minutes:.1f} min: {out / 'results.json'}, {out / 'results.md'}")
    print((out / "results.md").read_text())
    return 0


def x_label(x) -> str:
    if x[0] == "kd":
        return f"KD on {SET_LABEL.get(x[1], x[1])}"
    init, dset, teacher = LCM_RUNS[x[1]]
    return (f"LCM from {'base' if init == 'base' else 'KD-ft'} on {SET_LABEL.get(dset, dset)}"
            + (", same-size teacher" if teacher == "self" else ""))


if __name__ == "__main__":
    sys.exit(main())
