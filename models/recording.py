"""Real inputs of every component, recorded from the FP32 pipeline (``edgefc calibrate``, issue 20 part 1).

Calibration and the quality figures of a quantized build should see what the model sees when it
runs (paper Sec. 4.2 calibrates on real data): the token ids of real prompts, the U-Net's latents,
timesteps and text embeddings along the LCM trajectory, the VAE decoder's final latents. This
module runs the same FP32 pipeline as ``edgefc generate`` (:mod:`edgefc.models.pipeline`: the
exported ONNX of the built-in random-weight models or of a ``--weights`` folder, in onnxruntime;
the same tokenizer, scheduler, seeds and trajectory code) and records every component's inputs
as they are fed, keyed by the ONNX input names:

* ``CALIB/text-encoder.npz`` (``input_ids``), ``CALIB/unet.npz`` (``sample``, ``timestep``,
  ``encoder_hidden_states``: one sample per U-Net run, ``steps`` per prompt, twice with
  ``guidance > 1``), ``CALIB/vae-decoder.npz`` (``latent_sample`` = the trajectory's
  ``denoised / scaling_factor``) from ``--prompts``: one array per input shaped ``[N, *shape]``,
  the ``--calib`` format of ``edgefc compile``;
* ``CALIB/<component>.eval.npz`` the same from ``--eval-prompts`` (the ``--eval`` inputs);
* the U-Net files also hold ``unconditional:encoder_hidden_states``: the empty prompt's text
  embedding, the U-Net's "no text" (``edgefc compile`` measures the conditioning ratio with it);
* ``CALIB/calibrate.json``: what was recorded, from which models, prompts and seeds.

The VAE decoder's input is known once the U-Net trajectory ends, so the decoder itself never runs
(a 512x512 decode is the most expensive step of the pipeline and produces nothing recorded here).
Prompt ``i`` of ``--prompts`` uses seed ``seed + i``, prompt ``i`` of ``--eval-prompts`` seed
``seed + len(prompts) + i``, so no two prompts start from the same latents. A prompt that is in
both files is left out of the evaluation set (its text embedding would not be held out); if
nothing is left, that is an error. Memory: the text encoder and the U-Net in onnxruntime and the
recorded arrays (~0.3 MB per full-size U-Net sample).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefc.errors import EdgefcError
from edgefc.models.configs import COMPONENTS

#: key prefix of an input's unconditional value (the same as edgefc.passes.calibration.UNCONDITIONAL;
#: written here, read there - a test keeps the two equal).
UNCONDITIONAL = "unconditional:"
MANIFEST = "calibrate.json"


class CalibrateError(EdgefcError):
    """Bad ``edgefc calibrate`` arguments (prompt files, output folder, steps)."""


def read_prompts(path: str | os.PathLike, flag: str) -> list[str]:
    """The prompts of a text file: one per line, surrounding spaces removed, blank lines skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CalibrateError(f"{flag} file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrateError(f"cannot read {flag} file {p}: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CalibrateError(f"{flag} file {p} holds no prompts (one per line).")
    return prompts


class Recorder:
    """A runner that keeps, input by input, every feed it is given (typed as the model takes it)."""

    def __init__(self, runner):
        self.runner = runner
        self.inputs = runner.inputs
        self.backend = runner.backend
        self.feeds: dict[str, list[np.ndarray]] = {name: [] for name in runner.inputs}
        self.active = True

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.active:
            for name, value in feeds.items():
                self.feeds[name].append(np.array(value, dtype=self.inputs[name].dtype, copy=True))
        return self.runner.run(feeds)

    def take(self) -> dict[str, np.ndarray]:
        """The recorded samples, one array per input shaped [N, *shape]; the recorder starts empty again."""
        out = {name: np.stack(values) for name, values in self.feeds.items() if values}
        self.feeds = {name: [] for name in self.inputs}
        return out


@dataclass
class Recording:
    """What :func:`calibrate` wrote: component -> {"calib": samples, "eval": samples} and the files."""

    output: Path
    samples: dict[str, dict[str, int]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _record_set(prompts: list[str], seeds: list[int], te, unet, tokenizer, *, steps, guidance, weights, bar):
    from edgefc.models.pipeline import decoder_input, denoise, encode_texts

    latents = []
    for prompt, seed in zip(prompts, seeds):
        embeds = encode_texts(te, tokenizer, [prompt] + ([""] if guidance > 1.0 else []))
        denoised, _ = denoise(unet, embeds, steps=steps, seed=seed, guidance=guidance, weights=weights)
        latents.append(decoder_input(denoised, weights))
        bar.update(1)
    return {"text-encoder": te.take(), "unet": unet.take(), "vae-decoder": {"latent_sample": np.stack(latents)}}


def _save_npz(folder: Path, name: str, arrays: dict[str, np.ndarray]) -> Path:
    path = folder / name
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def calibrate(prompts_file, output, *, eval_prompts_file=None, weights=None, steps: int = 2, seed: int = 0,
              guidance: float = 1.0, arch: str = "bk-sdm-tiny", scale: str = "full", height: int | None = None,
              width: int | None = None, progress: bool = True) -> Recording:
    """Record every component's real inputs (module docstring) into the folder ``output``.

    Every argument is checked before any model is exported or run. Files are written into a
    staging folder beside ``output`` and moved into it at the end; other files in ``output`` stay.
    """
    from edgefc.models import pipeline
    from edgefc.models.export_cache import ensure_exports
    from edgefc.staging import staging_dir

    start = time.perf_counter()
    pipeline.check_sampling(steps, guidance, scale, arch, CalibrateError)
    if weights is not None and scale != "full":
        raise CalibrateError("--scale tiny builds random weights and cannot be combined with --weights.")
    prompts = read_prompts(prompts_file, "--prompts")
    evals = read_prompts(eval_prompts_file, "--eval-prompts") if eval_prompts_file is not None else []
    seen = set(prompts)
    left_out = sorted({p for p in evals if p in seen})
    evals = [p for p in evals if p not in seen]
    if eval_prompts_file is not None and not evals:
        raise CalibrateError(f"every prompt of --eval-prompts {eval_prompts_file} is also in --prompts; evaluation "
                             "prompts must be held out (give prompts calibration does not see).")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise CalibrateError(f"output {str(out)!r} exists and is not a folder.")
    wroot = pipeline._check_weights(weights, need_models=True)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            pipeline._check_size(name, int(value))
    height = int(height) if height is not None else pipeline.default_size(scale, wroot)
    width = int(width) if width is not None else pipeline.default_size(scale, wroot)

    from tqdm import tqdm

    from edgefc.models.runners import Runner
    from edgefc.models.tokenizer import load_tokenizer

    models = ensure_exports(arch, scale, height, width, wroot, progress=progress)
    tokenizer = load_tokenizer(wroot)
    te = Recorder(Runner("text-encoder", models["text-encoder"]))
    unet = Recorder(Runner("unet", models["unet"]))
    te.active = False
    empty = pipeline.encode_texts(te, tokenizer, [""])[0]
    te.active = True
    bar = tqdm(total=len(prompts) + len(evals), desc="recording (prompts)", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    common = {"steps": steps, "guidance": guidance, "weights": wroot, "bar": bar}
    sets = {"": _record_set(prompts, [seed + i for i in range(len(prompts))], te, unet, tokenizer, **common)}
    if evals:
        bar.set_description("recording (eval prompts)")
        sets[".eval"] = _record_set(evals, [seed + len(prompts) + i for i in range(len(evals))], te, unet, tokenizer,
                                    **common)
    bar.close()
    del te, unet

    result = Recording(output=out, left_out=left_out)
    staging = staging_dir(out)
    try:
        names = []
        for suffix, recorded in sets.items():
            for component in COMPONENTS:
                arrays = dict(recorded[component])
                if component == "unet":
                    arrays[UNCONDITIONAL + "encoder_hidden_states"] = empty
                name = f"{component}{suffix}.npz"
                _save_npz(staging, name, arrays)
                names.append(name)
                n = len(next(iter(recorded[component].values())))
                result.samples.setdefault(component, {})["eval" if suffix else "calib"] = n
        result.seconds = time.perf_counter() - start
        manifest = {
            "models": {c: str(p) for c, p in models.items()},
            "weights": str(wroot) if wroot is not None else f"built-in random weights ({arch}, {scale}, seed 0)",
            "image": [height, width], "steps": steps, "guidance": guidance,
            "prompts": {"file": str(prompts_file), "count": len(prompts), "seeds": [seed, seed + len(prompts) - 1]},
            "eval_prompts": ({"file": str(eval_prompts_file), "count": len(evals),
                              "seeds": [seed + len(prompts), seed + len(prompts) + len(evals) - 1],
                              "left_out_also_in_prompts": left_out} if eval_prompts_file is not None else None),
            "samples": result.samples,
            "unconditional": "unet*.npz hold unconditional:encoder_hidden_states, the empty prompt's embedding",
            "seconds": round(result.seconds, 1),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        names.append(MANIFEST)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(staging / name, out / name)
            result.files.append(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
