"""Text-to-image with the deployed components: text encoder -> U-Net (LCM steps) -> VAE decoder.

This is the EdgeFusion deployment pipeline (paper Sec. 2: BK-SDM-Tiny U-Net, LCM-distilled to
1, 2 or 4 steps), run on this machine's CPU (onnxruntime, or a build's local TVM library) on
exactly the graphs edgefc compiles:

1. the prompt is tokenised (:func:`edgefc.models.tokenizer.load_tokenizer`: the CLIP tokenizer
   of a local diffusers folder, else the documented no-download byte-level fallback) and the
   text encoder turns the 77 ids into ``last_hidden_state``;
2. the U-Net denoises seeded Gaussian latents for ``steps`` LCM steps with diffusers'
   ``LCMScheduler`` (``set_timesteps(steps)``; each ``step(...)`` gives ``denoised`` and, for
   all but the last step, ``prev_sample`` with fresh noise, exactly as
   ``LatentConsistencyModelPipeline`` does);
3. the VAE decoder turns ``denoised / scaling_factor`` (0.18215 for the SD VAE) into the image,
   which is written as a PNG (atomically: temporary file, then rename).

Where the models come from:

* ``build=DIR`` — compiled artifacts (``edgefc compile ... -o DIR/<component>``). ``DIR`` holds
  one build folder per component, found by name (``DIR/text-encoder``, ``DIR/unet``,
  ``DIR/vae-decoder``) or, for other names, by the inputs each build takes (``report.json``
  ``inputs``, else the model's own inputs): ``sample`` + ``timestep`` + ``encoder_hidden_states``
  is the U-Net, ``input_ids`` the text encoder, ``latent_sample`` the VAE decoder. A build with
  a local TVM library (``edgefc compile --emit tvm``: ``tvm.json``, ``npu_programs.json``,
  ``host_local.so``) runs through it, as ``edgefc run`` does (``runtime="auto"``, the default;
  ``"onnxruntime"`` never uses TVM, ``"tvm"`` requires it for every component); otherwise the
  build's ``model.onnx`` runs in onnxruntime. The image size is the build's.
* otherwise — the exported ONNX of :func:`edgefc.models.export.export_component`: random-weight
  built-in models of ``arch``/``scale`` or a local diffusers folder (``weights``), exported once
  into ``$EDGEFC_CACHE/<arch>-<scale>-<H>x<W>/`` (default cache ``~/.cache/edgefc/models``;
  ``weights-<hash>-<H>x<W>/`` for a weights folder) and reused by later runs.

Guidance: LCM-distilled U-Nets take the guidance scale as an embedding (``timestep_cond``, when
the U-Net config has ``time_cond_proj_dim``) so one U-Net pass per step suffices. The exported
U-Net (the fixed interface: ``sample``, ``timestep``, ``encoder_hidden_states``) has no such
input, so here ``guidance`` is classic classifier-free guidance: with ``guidance > 1`` every
step also runs the U-Net on the empty prompt's embedding and uses
``uncond + guidance * (cond - uncond)`` (twice the U-Net work); ``guidance = 1`` (default)
runs one U-Net pass per step, which is how EdgeFusion is deployed and what Table 7 prices.

The module is the planning and running of one image; its other concerns live beside it and are
re-exported here: build folders (:mod:`edgefc.models.builds`), the export cache
(:mod:`edgefc.models.export_cache`), the sessions a component runs in
(:mod:`edgefc.models.runners`) and the modelled NPU time (:mod:`edgefc.models.npu_time`).

With ``target`` (``exynos2400``) the modelled NPU time of each component comes from the
target's cost model (:mod:`edgefc.targets`), priced at the paper's deployed precisions (text
encoder and VAE decoder FP16, U-Net W8A16), per invocation and times the invocations this run
made, like the paper's Table 7.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgefc.components import SIGNATURES, detect_component  # noqa: F401 - part of this module's API
from edgefc.errors import BuildError, EdgefcError, ExportError
from edgefc.models import configs
from edgefc.models.builds import _build_shapes, build_inputs, find_builds  # noqa: F401
from edgefc.models.configs import COMPONENTS, LABELS  # noqa: F401
from edgefc.models.export_cache import cache_root, ensure_exports, export_dir  # noqa: F401
from edgefc.models.npu_time import _cost_model, format_npu_table, npu_times  # noqa: F401
from edgefc.models.runners import RUNTIMES, InputSpec, Runner, TvmRunner, has_tvm_build, open_runner  # noqa: F401

STEPS = (1, 2, 4)
#: Image height and width must be multiples of this (the SD-v1.5 U-Net downsamples the 1/8
#: latent three times; one rule for every arch keeps builds interchangeable).
SIZE_MULTIPLE = 64
#: The SD VAE's latent scaling factor (diffusers ``AutoencoderKL.config.scaling_factor``).
VAE_SCALING = 0.18215


class GenerateError(EdgefcError):
    """Bad ``edgefc generate`` arguments (steps, size, guidance, output path)."""


# --- planning (all checks before any work) ------------------------------------------------------

@dataclass
class Plan:
    """What a :func:`generate` call will do, resolved and checked before any model runs."""

    prompt: str
    steps: int
    output: Path
    height: int
    width: int
    seed: int
    guidance: float
    arch: str
    scale: str
    weights: Path | None
    builds: dict[str, Path] | None  # component -> build folder (None: exported models)
    models: dict[str, Path] | None  # component -> model file, once known (builds: at plan time)
    target: str | None
    runtime: str = "auto"  # auto | onnxruntime | tvm (see open_runner)

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0

    @property
    def runs(self) -> dict[str, int]:
        """Invocations per component (the text encoder and U-Net run twice with guidance > 1)."""
        k = 2 if self.cfg else 1
        return {"text-encoder": k, "unet": k * self.steps, "vae-decoder": 1}

    @property
    def export_dir(self) -> Path | None:
        if self.builds is not None:
            return None
        return export_dir(self.arch, self.scale, self.height, self.width, self.weights)


def _check_size(name: str, value: int) -> int:
    if value <= 0 or value % SIZE_MULTIPLE:
        raise GenerateError(f"--{name} {value} is not a positive multiple of {SIZE_MULTIPLE}.")
    return value


def default_size(scale: str, weights: Path | None = None) -> int:
    """Image height and width when none is given: with a weights folder, the size its U-Net was
    trained for (``sample_size`` x 8: 512 for SD-v1.5, 64 for the miniature recipe's models), else
    512 at full scale, 64 at tiny scale."""
    if weights is not None and (weights / "unet" / "config.json").is_file():
        try:
            sample = json.loads((weights / "unet" / "config.json").read_text()).get("sample_size")
        except ValueError:
            sample = None
        if isinstance(sample, int) and sample > 0 and (sample * 8) % SIZE_MULTIPLE == 0:
            return sample * 8
    return configs.DEFAULT_IMAGE_SIZE[scale]


def _check_weights(weights, need_models: bool) -> Path | None:
    """The weights folder; without a build it must hold text_encoder/, unet/ and vae/ (config.json each).

    ``tokenizer/`` is optional: without it the no-download fallback tokenizer is used, which is what
    ``edgefc train`` folders made from the built-in models were trained with.
    """
    if weights is None:
        return None
    root = Path(weights).expanduser()
    if not root.is_dir():
        raise ExportError(f"weights folder {str(root)!r} does not exist or is not a folder.")
    for sub in (("text_encoder", "unet", "vae") if need_models else ()):
        if not (root / sub / "config.json").is_file():
            raise ExportError(f"weights folder {str(root)!r} has no {sub}/config.json "
                              f"(expected a diffusers pipeline folder with text_encoder/, unet/ and vae/).")
    return root


def guidance_embedding_dim(weights: Path | None) -> int | None:
    """``time_cond_proj_dim`` of the weights' U-Net (an LCM guidance-embedding input), if any."""
    if weights is None or not (weights / "unet" / "config.json").is_file():
        return None
    try:
        return json.loads((weights / "unet" / "config.json").read_text()).get("time_cond_proj_dim")
    except ValueError:
        return None


def check_sampling(steps: int, guidance: float, scale: str, arch: str, error: type[EdgefcError]) -> None:
    """The sampling arguments ``generate`` and ``calibrate`` share, each wrong one an ``error``."""
    if steps not in STEPS:
        raise error(f"--steps {steps} is not one of {', '.join(map(str, STEPS))} "
                    "(the LCM step counts EdgeFusion is distilled for).")
    if not guidance >= 1.0:
        raise error(f"--guidance {guidance} is below 1 (1 = no classifier-free guidance).")
    if scale not in configs.SCALES:
        raise error(f"unknown --scale {scale!r}; expected one of {', '.join(configs.SCALES)}.")
    if arch not in configs.ARCHS:
        raise error(f"unknown --arch {arch!r}; expected one of {', '.join(configs.ARCHS)}.")


def plan(prompt: str, *, steps: int = 2, output: str | os.PathLike = "image.png", build=None, weights=None,
         seed: int = 0, guidance: float = 1.0, height: int | None = None, width: int | None = None,
         scale: str = "full", arch: str = "bk-sdm-tiny", target: str | None = None, runtime: str = "auto") -> Plan:
    """Resolve and check every argument of :func:`generate` without running or exporting anything."""
    if runtime not in RUNTIMES:
        raise GenerateError(f"unknown --runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}.")
    check_sampling(steps, guidance, scale, arch, GenerateError)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            _check_size(name, int(value))
    out = Path(output).expanduser()
    if out.suffix.lower() != ".png":
        raise GenerateError(f"output {str(out)!r} must end in .png.")
    if out.is_dir():
        raise GenerateError(f"output {str(out)!r} is a folder; give a file name ending in .png.")
    if not out.parent.is_dir():
        raise GenerateError(f"output folder {str(out.parent)!r} does not exist.")
    if target is not None:
        _cost_model(target)  # an unknown target or one without a cost model fails before any work
    if weights is not None and scale != "full" and build is None:
        raise GenerateError("--scale tiny builds random weights and cannot be combined with --weights.")
    wroot = _check_weights(weights, need_models=build is None)

    builds = models = None
    if build is not None:
        builds = find_builds(build)
        bh, bw = _build_shapes(builds)
        for name, given, have in (("height", height, bh), ("width", width, bw)):
            if given is not None and int(given) != have:
                raise GenerateError(f"--{name} {given} does not match the build's image {name} {have}; "
                                    "leave it out or compile for that size.")
        height, width = bh, bw
        models = {c: b / "model.onnx" for c, b in builds.items()}
        if runtime == "tvm":
            for c, m in models.items():
                if not has_tvm_build(m):
                    raise BuildError(f"--runtime tvm: the {c} build {str(m.parent)!r} has no TVM build "
                                     "(compile it with --emit tvm).")
    else:
        if runtime == "tvm":
            raise GenerateError("--runtime tvm needs --build with TVM builds (edgefc compile --emit tvm).")
        height = int(height) if height is not None else default_size(scale, wroot)
        width = int(width) if width is not None else default_size(scale, wroot)
    return Plan(prompt=prompt, steps=steps, output=out, height=height, width=width, seed=int(seed),
                guidance=float(guidance), arch=arch, scale=scale, weights=wroot, builds=builds,
                models=models, target=target, runtime=runtime)


# --- running ------------------------------------------------------------------------------------

def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)



def load_scheduler(weights: Path | None):
    """diffusers' ``LCMScheduler``: the weights folder's scheduler config when it has one, else the
    LCM defaults (SD-v1 betas: scaled_linear 0.00085..0.012 over 1000 steps, 50 original steps)."""
    from diffusers import LCMScheduler

    if weights is not None and (weights / "scheduler" / "scheduler_config.json").is_file():
        config = json.loads((weights / "scheduler" / "scheduler_config.json").read_text())
        return LCMScheduler.from_config(config)  # another scheduler's config: its compatible keys
    return LCMScheduler()


def vae_scaling(weights: Path | None) -> float:
    if weights is not None and (weights / "vae" / "config.json").is_file():
        return float(json.loads((weights / "vae" / "config.json").read_text()).get("scaling_factor", VAE_SCALING))
    return VAE_SCALING


def to_image(sample: np.ndarray) -> np.ndarray:
    """VAE output [1, 3, H, W] in [-1, 1] -> uint8 [H, W, 3] (as diffusers' image processor)."""
    x = np.clip(sample[0].transpose(1, 2, 0).astype(np.float64) / 2 + 0.5, 0.0, 1.0)
    return np.round(x * 255).astype(np.uint8)


def write_png(image: np.ndarray, output: Path) -> Path:
    """Write ``image`` as a PNG at ``output`` atomically (temporary file beside it, then rename), with a
    plain file's permissions (0644 under umask 022)."""
    from PIL import Image

    from edgefc.staging import write_file

    return write_file(output, lambda tmp: Image.fromarray(image, "RGB").save(tmp, format="PNG"))


@dataclass
class GenerateResult:
    output: Path
    image: np.ndarray  # uint8 [H, W, 3]
    plan: Plan
    models: dict[str, Path]  # component -> the model file that ran
    backends: dict[str, str]  # component -> "onnxruntime" or "tvm"
    tokenizer: str  # "clip" or "fallback"
    timesteps: list[int]
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    npu: dict | None = None  # modelled NPU time (see npu_times)


def _stage(progress: bool, i: int, what: str) -> float:
    _say(progress, f"[{i}/4] {what}")
    return time.perf_counter()


def generate(prompt: str, *, steps: int = 2, output: str | os.PathLike = "image.png", build=None, weights=None,
             seed: int = 0, guidance: float = 1.0, height: int | None = None, width: int | None = None,
             scale: str = "full", arch: str = "bk-sdm-tiny", target: str | None = None, runtime: str = "auto",
             progress: bool = True) -> GenerateResult:
    """Generate one image for ``prompt`` and write it to ``output`` (PNG). See the module docstring."""
    p = plan(prompt, steps=steps, output=output, build=build, weights=weights, seed=seed, guidance=guidance,
             height=height, width=width, scale=scale, arch=arch, target=target, runtime=runtime)
    return run_plan(p, progress=progress)


def encode_texts(runner, tokenizer, texts: list[str]) -> list[np.ndarray]:
    """The text encoder's ``last_hidden_state`` [1, 77, D] (float32) for each text, one run each."""
    ids = tokenizer.encode(texts)
    n_tokens = runner.inputs["input_ids"].shape[-1]
    if n_tokens > 0 and n_tokens != ids.shape[1]:
        raise BuildError(f"the text encoder takes {n_tokens} tokens; the tokenizer gives {ids.shape[1]}.")
    return [runner.run({"input_ids": ids[i:i + 1]})["last_hidden_state"].astype(np.float32)
            for i in range(len(texts))]


def denoise(runner, embeds: list[np.ndarray], *, steps: int, seed: int, guidance: float = 1.0,
            weights: Path | None = None, progress: bool = False):
    """The LCM trajectory (module docstring, step 2): seeded latents, ``steps`` U-Net runs on
    ``embeds[0]`` (and on ``embeds[1]``, the empty prompt's, with ``guidance > 1``) through
    diffusers' ``LCMScheduler``. Returns (``denoised`` as a torch tensor, the timesteps)."""
    import torch

    sample_shape = [int(d) for d in runner.inputs["sample"].shape]
    ehs_dim = runner.inputs["encoder_hidden_states"].shape[-1]
    if ehs_dim > 0 and ehs_dim != embeds[0].shape[-1]:
        raise BuildError(f"the U-Net expects text embeddings of width {ehs_dim} but the text encoder gives "
                         f"{embeds[0].shape[-1]}; use components of the same model.")
    scheduler = load_scheduler(weights)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(sample_shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    denoised = latents
    timesteps = [int(x) for x in scheduler.timesteps]
    bar = _bar(progress, len(timesteps), "LCM steps")
    for step_t in scheduler.timesteps:
        feeds = {"sample": latents.numpy(), "timestep": np.array([int(step_t)], dtype=np.int64)}
        eps = runner.run({**feeds, "encoder_hidden_states": embeds[0]})["out_sample"]
        if guidance > 1.0:
            uncond = runner.run({**feeds, "encoder_hidden_states": embeds[1]})["out_sample"]
            eps = uncond + guidance * (eps - uncond)
        out = scheduler.step(torch.from_numpy(np.asarray(eps, dtype=np.float32)), step_t, latents,
                             generator=generator)
        latents, denoised = out.prev_sample, out.denoised
        if bar is not None:
            bar.set_postfix_str(f"t={int(step_t)}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return denoised, timesteps


def decoder_input(denoised, weights: Path | None = None) -> np.ndarray:
    """What the VAE decoder receives: ``denoised / scaling_factor`` (module docstring, step 3)."""
    return (denoised / vae_scaling(weights)).numpy()


def run_plan(p: Plan, progress: bool = True, sessions: dict | None = None) -> GenerateResult:
    """Run a checked :class:`Plan`.

    Each component's session is opened for its stage and dropped after it (at full size the
    three models need not be in memory together). With ``sessions`` (a dict kept by the caller)
    the sessions are kept there and reused by later calls with the same models: many images from
    one model set (:func:`generate_many`) then open each model once.
    """

    def open_session(component: str):
        key = (component, str(models[component]), p.runtime)
        if sessions is None:
            return open_runner(component, models[component], p.runtime)
        if key not in sessions:
            sessions[key] = open_runner(component, models[component], p.runtime)
        return sessions[key]

    from edgefc.models.tokenizer import load_tokenizer

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if p.builds is not None:
        models = dict(p.models)
        _say(progress, "using the compiled builds: " + ", ".join(
            f"{c} {b} ({'tvm' if p.runtime != 'onnxruntime' and has_tvm_build(models[c]) else 'onnxruntime'})"
            for c, b in p.builds.items()))
    else:
        models = ensure_exports(p.arch, p.scale, p.height, p.width, p.weights, progress=progress)
        _say(progress, f"using the exported models in {p.export_dir}")
    seconds["prepare"] = time.perf_counter() - t
    backends: dict[str, str] = {}

    # 1. text encoder
    t = _stage(progress, 1, f"text encoder ({models['text-encoder']})")
    tokenizer = load_tokenizer(p.weights)
    if tokenizer.kind == "fallback":
        _say(progress, "      tokenizer: byte-level fallback (no tokenizer/ vocabulary; see edgefc.models.tokenizer)")
    else:
        _say(progress, f"      tokenizer: CLIP from {p.weights}")
    texts = [p.prompt] + ([""] if p.cfg else [])
    runner = open_session("text-encoder")
    backends["text-encoder"] = runner.backend
    embeds = encode_texts(runner, tokenizer, texts)
    del runner
    seconds["text-encoder"] = time.perf_counter() - t
    _say(progress, f"      done [{seconds['text-encoder']:.1f} s]")

    # 2. U-Net with the LCM scheduler
    t = _stage(progress, 2, f"U-Net, {p.steps} LCM step{'s' if p.steps > 1 else ''}"
                            f"{f', classifier-free guidance {p.guidance:g}' if p.cfg else ''} ({models['unet']})")
    runner = open_session("unet")
    backends["unet"] = runner.backend
    if guidance_embedding_dim(p.weights):
        _say(progress, "      note: this U-Net has an LCM guidance-embedding input (time_cond_proj_dim); the exported "
                       "graph has no such input, so it runs without that term (see --guidance)")
    denoised, timesteps = denoise(runner, embeds, steps=p.steps, seed=p.seed, guidance=p.guidance,
                                  weights=p.weights, progress=progress)
    del runner
    seconds["unet"] = time.perf_counter() - t
    _say(progress, f"      done [{seconds['unet']:.1f} s]")

    # 3. VAE decoder
    t = _stage(progress, 3, f"VAE decoder ({models['vae-decoder']})")
    runner = open_session("vae-decoder")
    backends["vae-decoder"] = runner.backend
    z = decoder_input(denoised, p.weights)
    sample = runner.run({"latent_sample": z})["sample"]
    del runner
    seconds["vae-decoder"] = time.perf_counter() - t
    _say(progress, f"      done [{seconds['vae-decoder']:.1f} s]")

    # 4. image
    t = _stage(progress, 4, f"write {p.output}")
    image = to_image(np.asarray(sample, dtype=np.float32))
    write_png(image, p.output)
    seconds["write"] = time.perf_counter() - t
    _say(progress, f"      done [{seconds['write']:.1f} s]")

    result = GenerateResult(output=p.output, image=image, plan=p, models=models, backends=backends,
                            tokenizer=tokenizer.kind, timesteps=timesteps, seconds=seconds)
    return result


def generate_many(prompts: list[str], seeds: list[int], outputs: list, progress: bool = False,
                  **kwargs) -> list[GenerateResult]:
    """One image per (prompt, seed, output), all with the same models and options (the keywords of
    :func:`generate`); every image is exactly what :func:`generate` gives for it, but each model is
    loaded once for the whole list."""
    if not len(prompts) == len(seeds) == len(outputs):
        raise GenerateError("generate_many needs as many seeds and outputs as prompts.")
    plans = [plan(pr, seed=sd, output=out, **kwargs) for pr, sd, out in zip(prompts, seeds, outputs)]
    sessions: dict = {}
    return [run_plan(pl, progress=progress, sessions=sessions) for pl in plans]


#: longest prompt-derived part of an image name in :func:`image_names`.
NAME_CHARS = 48


def image_names(prompts: list[str]) -> list[str]:
    """One file name stem per prompt, deterministic and safe on every file system: the 1-based
    position (4 digits, so names sort in prompt order) and the prompt's ASCII letters and digits in
    lower case, whole words joined by ``-`` up to :data:`NAME_CHARS` characters:
    ``0001-a-red-circle-in-the-top-left``."""
    import re

    width = max(4, len(str(len(prompts))))
    out = []
    for i, prompt in enumerate(prompts, start=1):
        slug = ""
        for word in re.findall(r"[a-z0-9]+", prompt.lower()):
            if len(slug) + len(word) + 1 > NAME_CHARS:
                break
            slug += f"-{word}"
        out.append(f"{i:0{width}d}{slug}")
    return out


def generate_folder(prompts: list[str], folder: str | os.PathLike, *, seed: int = 0, progress: bool = True,
                    **kwargs) -> list[GenerateResult]:
    """One ``NAME.png`` + ``NAME.txt`` (the prompt) per prompt in ``folder`` (created), NAME from
    :func:`image_names`, prompt ``i`` (from 0) with seed ``seed + i``; the keywords of
    :func:`generate` apply to all, and each model is loaded once (``edgefc generate --prompts``,
    scored by ``edgefc eval FOLDER``). Every prompt's plan is checked before any model runs."""
    if not prompts:
        raise GenerateError("no prompts to generate.")
    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise GenerateError(f"output {str(root)!r} exists and is not a folder (--prompts writes one PNG per prompt "
                            "into a folder).")
    if not root.parent.is_dir():
        raise GenerateError(f"output folder {str(root.parent)!r} does not exist.")
    created = not root.exists()
    root.mkdir(exist_ok=True)
    names = image_names(prompts)
    try:
        plans = [plan(pr, seed=seed + i, output=root / f"{name}.png", **kwargs)
                 for i, (pr, name) in enumerate(zip(prompts, names))]
    except BaseException:
        if created and not any(root.iterdir()):
            root.rmdir()
        raise
    from edgefc.staging import write_file

    sessions: dict = {}
    results = []
    bar = _bar(progress, len(plans), "images")
    for pl, name in zip(plans, names):
        results.append(run_plan(pl, progress=False, sessions=sessions))
        write_file(root / f"{name}.txt", lambda tmp, text=pl.prompt + "\n": Path(tmp).write_text(text, encoding="utf-8"))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"      {desc}", file=sys.stderr, leave=True)


