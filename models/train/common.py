"""The training loop shared by ``edgefc train kd`` and ``edgefc train lcm``.

Thin on purpose: devices, processes and mixed precision are `accelerate`'s
(``accelerate launch edgefc train ...`` runs the same code on many GPUs or nodes); models,
schedulers and the VAE/text-encoder are diffusers'/transformers'. What lives here is what a
recipe needs around them:

* validation of the user's inputs before any model is built (one-line errors, exit 2);
* a data order that is a pure function of (seed, step) and a per-process ``torch.Generator``
  for every random draw (noise, timesteps, guidance scales, VAE sampling), so a run resumed
  from a checkpoint reproduces the uninterrupted run's losses exactly;
* checkpoints in safetensors only (never pickle): ``checkpoint-STEP/`` holds the trainable
  U-Net (and any EMA target) as diffusers folders, ``optimizer.safetensors`` (AdamW moments +
  step counts, hyper-parameters in the metadata), ``rng-RANK.safetensors`` (generator states)
  and ``state.json`` (step, loss history, the options that define the run). Every checkpoint
  and the final model are written to a temporary folder and renamed into place.

A recipe subclasses :class:`Recipe` and implements ``build`` (models) and ``loss`` (one batch).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgefc.models.train.errors import DataError, TrainingError

CHECKPOINT_PREFIX = "checkpoint-"
LOG_NAME = "train_log.jsonl"


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


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def config_dict(cfg) -> dict:
    d = {k: _jsonable(v) for k, v in asdict(cfg).items() if k != "identity_fields"}
    return d


# ----------------------------------------------------------------------------- checkpoints

def _save_optimizer(optimizer, path: Path):
    """AdamW state as safetensors: tensors ``state.<param>.<name>``, the rest as JSON metadata."""
    import torch
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"state.{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = val
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=meta)


def _load_optimizer(optimizer, path: Path):
    from safetensors import safe_open

    state: dict = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = f.get_tensor(key)
    for key, val in json.loads(meta.get("scalars", "{}")).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = val
    groups = json.loads(meta["param_groups"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def check_resume_dir(path: Path, kind: str) -> dict:
    """Validate a checkpoint folder before anything is built; returns its state.json."""
    path = Path(path)
    if not path.is_dir():
        raise TrainingError(f"--resume {path} is not a folder.")
    state_file = path / "state.json"
    if not state_file.is_file():
        raise TrainingError(f"--resume {path} is not an edgefc checkpoint (no state.json).")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        raise TrainingError(f"--resume {path}: state.json is not valid JSON.") from None
    if state.get("kind") != kind:
        raise TrainingError(f"--resume {path} is a {state.get('kind')!r} checkpoint, not a {kind!r} one.")
    for need in (f"{state.get('trainable', 'unet')}/config.json", "optimizer.safetensors", "rng-0.safetensors"):
        if not (path / need).is_file():
            raise TrainingError(f"--resume {path} is incomplete: {need} is missing.")
    return state


def _atomic_replace(tmp: Path, final: Path):
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


# ----------------------------------------------------------------------------- recipe

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
    """Train ``recipe`` as configured; returns the per-step losses and the output folder."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # our own bar shows training progress; the libraries' per-file save/load bars are noise here
    d_on, t_on = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        return _run(recipe)
    finally:
        if d_on:
            diffusers_logging.enable_progress_bar()
        if t_on:
            transformers_logging.enable_progress_bar()


def _run(recipe: Recipe) -> TrainResult:
    cfg = recipe.cfg
    t0 = time.perf_counter()
    resume_state = _validate(cfg, recipe.kind)
    if cfg.data is None:
        raise DataError("give the training data: --data FOLDER or --data SHARD.tar.")
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
        _load_checkpoint(Path(cfg.resume), recipe, student, optimizer, gen, rank)
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
            _save_checkpoint(out, step, recipe, student, optimizer, gen, history, accelerator)
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_final(out, recipe, student, components, history, accelerator, time.perf_counter() - t0)
    accelerator.wait_for_everyone()
    return TrainResult(out, step, history, time.perf_counter() - t0, accelerator.is_main_process)


class FrozenCache:
    """The frozen encoders' outputs per training item: VAE posterior mean/std and text embedding.

    The VAE encoder and text encoder are frozen, so what they give for an item never changes:
    each item is encoded once, alone (batch 1, so the value does not depend on the batch it first
    came in and a resumed run sees the same numbers), and reused at every later epoch. The
    latent is then drawn as ``mean + std * randn(generator)``, exactly as diffusers'
    ``DiagonalGaussianDistribution.sample``. At the tiny scale the 12-layer text encoder costs
    more than the U-Net's training step; this removes it after the first epoch.
    """

    def __init__(self, components, device, latents: bool, text: bool):
        self.c, self.device, self.latents, self.text = components, device, latents, text
        self.items: dict[int, tuple] = {}

    def _encode(self, pixels, ids):
        import torch

        mean = std = ehs = None
        if self.latents:
            dist = self.c.vae.encode(pixels[None].to(self.device, dtype=torch.float32)).latent_dist
            mean, std = dist.mean[0], dist.std[0]
        if self.text:
            ehs = self.c.text_encoder(ids[None].to(self.device))[0][0].float()
        return mean, std, ehs

    def get(self, batch):
        import torch

        idx = batch["index"].tolist()
        for k, i in enumerate(idx):
            if i not in self.items:
                self.items[i] = self._encode(batch["pixel_values"][k], batch["input_ids"][k])
        rows = [self.items[i] for i in idx]
        stack = [torch.stack([r[j] for r in rows]) if rows[0][j] is not None else None for j in range(3)]
        return stack[0], stack[1], stack[2]


def _save_checkpoint(out: Path, step: int, recipe, student, optimizer, gen, history, accelerator):
    from safetensors.torch import save_file

    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file({"generator": gen.get_state()}, str(tmp / f"rng-{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        accelerator.unwrap_model(student).save_pretrained(tmp / recipe.trainable, safe_serialization=True)
        for name, model in recipe.extra_models().items():
            model.save_pretrained(tmp / name, safe_serialization=True)
        _save_optimizer(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                        tmp / "optimizer.safetensors")
        state = {"kind": recipe.kind, "trainable": recipe.trainable, "step": step, "num_processes": accelerator.num_processes,
                 "config": config_dict(recipe.cfg), "losses": history}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _atomic_replace(tmp, final)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, recipe, student, optimizer, gen, rank: int):
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    def load_into(model, folder: Path):
        model = getattr(model, "module", model)  # accelerate's wrapper, if any
        cls = type(model) if hasattr(type(model), "from_pretrained") else UNet2DConditionModel
        try:
            saved = cls.from_pretrained(folder, local_files_only=True)
            model.load_state_dict(saved.state_dict())
        except (OSError, RuntimeError, ValueError) as e:
            raise TrainingError(f"--resume {path}: cannot load {folder.name}/: {str(e).splitlines()[0]}") from None

    load_into(student, path / recipe.trainable)
    for name, model in recipe.extra_models().items():
        load_into(model, path / name)
    try:
        _load_optimizer(optimizer, path / "optimizer.safetensors")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise TrainingError(f"--resume {path}: optimizer state does not fit this model ({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        raise TrainingError(f"--resume {path} has no rng-{rank}.safetensors (was it made with fewer processes?).")
    gen.set_state(load_file(str(rng_file))["generator"].to(torch.uint8))


def _save_final(out: Path, recipe, student, components, history, accelerator, seconds: float):
    """Write a diffusers-style folder: the trained U-Net(s), text encoder, VAE, scheduler, tokenizer."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    models = recipe.final_models(accelerator.unwrap_model(student))
    for name, model in models.items():
        model.save_pretrained(tmp / name, safe_serialization=True)
    if "text_encoder" not in models:
        components.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    if "vae" not in models:
        components.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    if "unet" not in models:  # a recipe that trains another part keeps the base pipeline's U-Net
        components.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    recipe.scheduler_for_output().save_pretrained(tmp / "scheduler")
    tok = components.tokenizer
    if getattr(tok, "kind", "") == "clip":
        tok.save(tmp / "tokenizer")
    summary = {
        "kind": recipe.kind,
        "steps": history[-1]["step"] if history else 0,
        "teacher": components.source,
        "config": config_dict(recipe.cfg),
        "tokenizer": getattr(tok, "kind", "unknown"),
        "seconds_this_run": round(seconds, 3),
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "outputs": sorted(p.name for p in tmp.iterdir()),
    }
    (tmp / "train.json").write_text(json.dumps(summary, indent=1))
    for p in list(tmp.iterdir()):
        _atomic_replace(p, out / p.name) if p.is_dir() else p.replace(out / p.name)
    shutil.rmtree(tmp, ignore_errors=True)
