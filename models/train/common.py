"""The training loop every recipe shares (``edgefc train vae``, ``sd``, ``kd``, ``lcm``).

Thin on purpose: devices, processes and mixed precision are `accelerate`'s
(``accelerate launch edgefc train ...`` runs the same code on many GPUs or nodes); models,
schedulers and the VAE/text-encoder are diffusers'/transformers'. What lives here is what a
recipe needs around them:

* validation of the user's inputs before any model is built (one-line errors, exit 2);
* a data order that is a pure function of (seed, step) and a per-process ``torch.Generator``
  for every random draw (noise, timesteps, guidance scales, VAE sampling), so a run resumed
  from a checkpoint reproduces the uninterrupted run's losses exactly;
* checkpoints in safetensors only, written atomically (:mod:`edgefc.models.train.checkpoints`);
* the frozen encoders' outputs computed once per item (:mod:`edgefc.models.train.frozen_cache`).

A recipe subclasses :class:`Recipe` and implements ``build`` (models) and ``loss`` (one batch).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgefc.models.train.checkpoints import (
    CHECKPOINT_PREFIX,
    LOG_NAME,
    check_resume_dir,
    config_dict,
    load_checkpoint,
    save_checkpoint,
    save_final,
)
from edgefc.models.train.errors import DataError, TrainingError
from edgefc.models.train.frozen_cache import FrozenCache


@dataclass
class TrainConfig:
    """Options common to every recipe (the CLI flags of ``edgefc train``)."""

    output: Path
    data: Path | None = None
    teacher: Path | None = None
    teacher_arch: str | None = None
    tokenizer: Path | None = None  # a CLIP tokenizer folder for a --teacher-arch base (None: fallback)
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    seed: int = 0
    save_every: int = 0  # 0: only the final checkpoint
    resolution: int = 512
    resume: Path | None = None
    mixed_precision: str = "no"
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    threads: int | None = None  # torch CPU threads (None: torch's default, or $EDGEFC_TORCH_THREADS)
    fixed_batch: bool = False  # overfitting check: same batch, noise, timesteps (and w) at every step
    progress: bool = True
    # options that must match between a checkpoint and the run resuming it
    identity_fields: tuple = field(default=("teacher", "teacher_arch", "tokenizer", "seed", "batch_size", "resolution",
                                            "fixed_batch", "data"), repr=False)


@dataclass
class TrainResult:
    output: Path
    steps: int
    losses: list[dict]  # one dict per step: {"step", "loss", <components>}
    seconds: float
    is_main_process: bool = True


class Recipe:
    """A training recipe: which models to build and the loss of one batch."""

    kind = "base"
    #: Subfolder of a checkpoint holding the trained model (a diffusers model folder).
    trainable = "unet"
    #: Whether the loop encodes each batch to VAE latents / text embeddings before ``loss``.
    needs_latents = True
    needs_text = True

    def __init__(self, cfg):
        self.cfg = cfg

    # -- to implement
    def build(self, components, accelerator):
        """Create the trainable U-Net (returned) and any other models; called once."""
        raise NotImplementedError

    def loss(self, batch, latents, encoder_hidden_states, gen):
        """Return (loss tensor, {component: float}) for one batch."""
        raise NotImplementedError

    # -- optional hooks
    def after_step(self):
        """Called after every optimizer step (e.g. EMA update)."""

    def extra_models(self) -> dict:
        """Other trained models to checkpoint, name -> diffusers model (e.g. the EMA target)."""
        return {}

    def final_models(self, student) -> dict:
        """Models to write into the output folder, subfolder name -> model."""
        return {"unet": student}

    def scheduler_for_output(self):
        return self.components.noise_scheduler


def _set_threads(threads: int | None):
    """torch CPU threads: --threads, else $EDGEFC_TORCH_THREADS, else torch's default.

    On a busy shared machine fewer threads than cores can be many times faster (tiny models:
    10 steps in 3 s with 1 thread vs 86 s with 2 on an oversubscribed 2-core machine).
    """
    import torch

    n = threads or os.environ.get("EDGEFC_TORCH_THREADS")
    if n:
        torch.set_num_threads(int(n))


def _validate(cfg, kind: str) -> dict | None:
    if cfg.teacher is None and cfg.teacher_arch is None:
        raise TrainingError("give a teacher: --teacher DIR (a local diffusers folder) or --teacher-arch NAME.")
    if cfg.teacher is not None and cfg.teacher_arch is not None:
        raise TrainingError("give either --teacher or --teacher-arch, not both.")
    if cfg.tokenizer is not None:
        if cfg.teacher is not None:
            raise TrainingError("--tokenizer goes with --teacher-arch; a --teacher folder brings its own tokenizer/.")
        tok = Path(cfg.tokenizer)
        if not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()):
            raise TrainingError(f"--tokenizer {tok} is not a CLIP tokenizer folder (vocab.json and merges.txt).")
    if cfg.teacher is not None:
        from edgefc.models.train.archs import check_teacher_dir

        check_teacher_dir(Path(cfg.teacher))
    if cfg.steps < 1:
        raise TrainingError("--steps must be at least 1.")
    if cfg.batch_size < 1:
        raise TrainingError("--batch-size must be at least 1.")
    if cfg.resolution < 8 or cfg.resolution % 8:
        raise TrainingError("--resolution must be a positive multiple of 8.")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise TrainingError("--lr must be a positive number.")
    if cfg.threads is not None and cfg.threads < 1:
        raise TrainingError("--threads must be at least 1.")
    if cfg.save_every < 0:
        raise TrainingError("--save-every must be 0 (only at the end) or positive.")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output {out} exists and is not a folder.")
    resume_state = None
    if cfg.resume is not None:
        resume_state = check_resume_dir(cfg.resume, kind)
        saved = resume_state.get("config", {})
        mine = config_dict(cfg)
        for name in cfg.identity_fields:
            if name in saved and saved[name] != mine.get(name):
                raise TrainingError(
                    f"--resume {cfg.resume} was made with {name}={saved[name]!r}, this run has {mine.get(name)!r}."
                )
        if resume_state["step"] >= cfg.steps:
            raise TrainingError(f"--resume {cfg.resume} is already at step {resume_state['step']} >= --steps {cfg.steps}.")
    elif out.is_dir() and any(p.name.startswith(CHECKPOINT_PREFIX) for p in out.iterdir()):
        raise TrainingError(f"output {out} already holds checkpoints; pass --resume or choose another -o.")
    return resume_state


def run(recipe: Recipe) -> TrainResult:
    """Train ``recipe`` as configured; returns the per-step losses and the output folder. The
    arguments are checked before the training libraries are imported (a wrong one fails at once)."""
    resume_state = _validate(recipe.cfg, recipe.kind)
    if recipe.cfg.data is None:
        raise DataError("give the training data: --data FOLDER or --data SHARD.tar.")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # our own bar shows training progress; the libraries' per-file save/load bars are noise here
    d_on, t_on = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        return _run(recipe, resume_state)
    finally:
        if d_on:
            diffusers_logging.enable_progress_bar()
        if t_on:
            transformers_logging.enable_progress_bar()


def _run(recipe: Recipe, resume_state: dict | None) -> TrainResult:
    cfg = recipe.cfg
    t0 = time.perf_counter()
    from edgefc.models.train.data import ImageCaptionDataset, StepBatchSampler, list_samples

    sample_list = list_samples(cfg.data)  # DataError when missing or empty

    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from edgefc.models.train.archs import build_teacher

    _set_threads(cfg.threads)
    from accelerate.state import AcceleratorState

    # accelerate keeps one AcceleratorState per process; a second run in the same Python process
    # (the API, tests) may ask for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    out = Path(cfg.output)

    components = build_teacher(cfg.teacher, cfg.teacher_arch, cfg.seed, cfg.tokenizer)
    recipe.components = components
    for m in (components.unet, components.text_encoder, components.vae):
        m.requires_grad_(False)
        m.eval()
    torch.manual_seed(cfg.seed + 1)
    student = recipe.build(components, accelerator)
    student.train()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for m in (components.text_encoder, components.vae, components.unet):
        m.to(accelerator.device)
    if weight_dtype != torch.float32:  # the frozen text encoder only; VAE and teacher U-Net stay float32
        components.text_encoder.to(dtype=weight_dtype)

    if accelerator.is_main_process:  # only now: every user error above leaves no output folder
        out.mkdir(parents=True, exist_ok=True)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    start_step, history = 0, []
    rank = accelerator.process_index
    gen = torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 1_000_003 + 7919 * rank)
    fixed_rng = gen.get_state() if cfg.fixed_batch else None
    if resume_state is not None:
        load_checkpoint(Path(cfg.resume), recipe, student, optimizer, gen, rank)
        start_step, history = resume_state["step"], list(resume_state.get("losses", []))

    dataset = ImageCaptionDataset(sample_list.samples, cfg.resolution, components.tokenizer)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start_step, cfg.steps,
                               accelerator.num_processes, cfg.fixed_batch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    recipe.student = student

    log_path = out / LOG_NAME
    if accelerator.is_main_process:
        kept = [json.dumps(h) for h in history]
        log_path.write_text("".join(line + "\n" for line in kept))
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {recipe.kind}", unit="step", file=sys.stderr,
               disable=not (cfg.progress and accelerator.is_local_main_process), dynamic_ncols=True)
    step = start_step
    vae_scale = components.vae.config.scaling_factor
    frozen = FrozenCache(components, accelerator.device, recipe.needs_latents, recipe.needs_text)
    t_loop = time.perf_counter()  # time_s in the log: seconds since this run's first step began
    for batch in loader:
        if fixed_rng is not None:  # --fixed-batch: the same batch *and* the same random draws every step
            gen.set_state(fixed_rng)
        with torch.no_grad():
            latents = ehs = None
            if recipe.needs_latents or recipe.needs_text:
                mean, std, ehs = frozen.get(batch)
            if recipe.needs_latents:
                noise = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
                latents = (mean + std * noise).float() * vae_scale  # = latent_dist.sample(generator=gen)
        with accelerator.autocast():
            loss, parts = recipe.loss(batch, latents, ehs, gen)
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at step {step + 1}; lower --lr.")
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recipe.after_step()
        step += 1
        values = torch.tensor([float(loss.detach().item()), *parts.values()], device=accelerator.device)
        if accelerator.num_processes > 1:  # log the mean over processes (each saw its own batch)
            values = accelerator.reduce(values, reduction="mean")
        record = {"step": step, **dict(zip(["loss", *parts], values.tolist())),
                  "time_s": round(time.perf_counter() - t_loop, 4)}
        history.append(record)
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            save_checkpoint(out, step, recipe, student, optimizer, gen, history, accelerator)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(out, recipe, student, components, history, accelerator, time.perf_counter() - t0)
    accelerator.wait_for_everyone()
    return TrainResult(out, step, history, time.perf_counter() - t0, accelerator.is_main_process)


