"""Checkpoints and final folders of ``edgefc train`` (safetensors only, never pickle).

``checkpoint-STEP/`` holds the trainable model (and any EMA target) as diffusers folders,
``optimizer.safetensors`` (AdamW moments and step counts; hyper-parameters in the metadata),
``rng-RANK.safetensors`` (each process's generator state) and ``state.json`` (step, loss history,
the options that define the run). Every checkpoint and the final folder are written to a
temporary folder and renamed into place, so an interrupted save never leaves a half-written one.
The loop that calls these is :mod:`edgefc.models.train.common`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from edgefc.models.train.errors import TrainingError

CHECKPOINT_PREFIX = "checkpoint-"
LOG_NAME = "train_log.jsonl"


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def config_dict(cfg) -> dict:
    """The run's options as JSON values (what ``state.json`` and ``train.json`` record)."""
    return {k: _jsonable(v) for k, v in asdict(cfg).items() if k != "identity_fields"}


def save_optimizer(optimizer, path: Path):
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


def load_optimizer(optimizer, path: Path):
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


def atomic_replace(tmp: Path, final: Path):
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def save_checkpoint(out: Path, step: int, recipe, student, optimizer, gen, history, accelerator):
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
        save_optimizer(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                        tmp / "optimizer.safetensors")
        state = {"kind": recipe.kind, "trainable": recipe.trainable, "step": step, "num_processes": accelerator.num_processes,
                 "config": config_dict(recipe.cfg), "losses": history}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_replace(tmp, final)
    accelerator.wait_for_everyone()


def load_checkpoint(path: Path, recipe, student, optimizer, gen, rank: int):
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
        load_optimizer(optimizer, path / "optimizer.safetensors")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise TrainingError(f"--resume {path}: optimizer state does not fit this model ({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None
    rng_file = path / f"rng-{rank}.safetensors"
    if not rng_file.is_file():
        raise TrainingError(f"--resume {path} has no rng-{rank}.safetensors (was it made with fewer processes?).")
    gen.set_state(load_file(str(rng_file))["generator"].to(torch.uint8))


def save_final(out: Path, recipe, student, components, history, accelerator, seconds: float):
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
        atomic_replace(p, out / p.name) if p.is_dir() else p.replace(out / p.name)
    shutil.rmtree(tmp, ignore_errors=True)
