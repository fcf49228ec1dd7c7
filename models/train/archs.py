"""Model configurations and construction for the training companion (no network, ever).

Teachers come either from a local diffusers folder (``unet/``, ``text_encoder/``, ``vae/``,
optional ``tokenizer/`` and ``scheduler/``) or from a named architecture built from its config
with seeded random weights:

* ``sd-v1.5`` -- the Stable Diffusion v1.5 U-Net (``runwayml/stable-diffusion-v1-5``
  ``unet/config.json``: block_out_channels [320, 640, 1280, 1280], 3 x CrossAttnDownBlock2D +
  DownBlock2D, UNetMidBlock2DCrossAttn, layers_per_block 2, attention_head_dim 8,
  cross_attention_dim 768), the CLIP ViT-L/14 text encoder (``openai/clip-vit-large-patch14``:
  width 768, 12 layers, 12 heads, MLP 3072, 77 positions, vocabulary 49,408, quick-GELU) and the
  SD VAE (``vae/config.json``: [128, 256, 512, 512], 2 layers per block, scaling 0.18215).
* ``tiny`` -- the same topology (same block types, mid block, 2 layers per block, an 8x VAE)
  with small widths, for tests and worked examples on a CPU.
* ``mini`` -- the ``tiny`` U-Net, the ``tiny`` text encoder cut to 2 transformer layers (still
  the CLIP layout at width 64; frozen and random, a shallow stack keeps each token's own
  embedding dominant in its output, so the U-Net's cross-attention sees one clean key per word
  of the word-level tokenizer ``--tokenizer``), and a smaller VAE (widths [8, 16, 32, 32],
  one ResNet per block; still the AutoencoderKL layout with its 8x downsampling and mid-block
  attention): the base the miniature EdgeFusion (bench/mini_edgefusion.py) trains from scratch
  on 64x64 synthetic scenes in minutes on a CPU (issue 13).

The configs are those of ``edgefc export`` (``edgefc.models.configs``, ``sd-v1.5`` at scale
``full`` / ``tiny``), so what is trained here exports with the same topology.

Students (``--student-arch``):

* ``bk-sdm-tiny`` -- the teacher's config with BK-SDM-Tiny's block removal applied (Kim et al.,
  "BK-SDM", arXiv 2305.15798, Sec. 3.1; Nota's ``src/unet_config/bk_tiny/config.json``): the
  innermost down and up stages (the DownBlock2D / UpBlock2D without attention) and the mid block
  are removed, and one ResNet+attention pair is kept per down stage (two per up stage, since
  diffusers up stages hold ``layers_per_block + 1``). From ``sd-v1.5`` this gives the 323.4 M
  parameter BK-SDM-Tiny U-Net; from ``tiny`` it gives the ``tiny`` student.
* ``tiny`` -- that block-removed tiny config, fixed (independent of the teacher).

:func:`init_student_from_teacher` copies the teacher's retained blocks into the student as
BK-SDM does (down stage i keeps the teacher's first ResNet/attention of stage i; up stage i is
the teacher's up stage i+1 keeping its first and last ResNet/attention; everything else by
name), wherever the shapes agree.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from edgefc.models.configs import get_config
from edgefc.models.train.errors import TrainingError

TEACHER_ARCHS = ("sd-v1.5", "tiny", "mini")
#: The ``mini`` VAE: the tiny VAE narrowed at its full-resolution stages (see the module docstring).
MINI_VAE = {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 1}
#: The ``mini`` text encoder: the tiny CLIP text encoder with 2 of its 12 layers (see the module docstring).
MINI_TEXT = {"num_hidden_layers": 2}
STUDENT_ARCHS = ("bk-sdm-tiny", "tiny")

# SD-v1.5 scheduler (scheduler/scheduler_config.json): scaled-linear betas, 1000 steps, epsilon.
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


def _arch_configs(teacher_arch: str) -> tuple[dict, dict, dict]:
    """(U-Net, text encoder, VAE) constructor keywords; shared with ``edgefc export`` (configs.py)."""
    scale = "full" if teacher_arch == "sd-v1.5" else "tiny"
    vae = get_config("vae-decoder", "sd-v1.5", scale)
    text = get_config("text-encoder", "sd-v1.5", scale)
    if teacher_arch == "mini":
        vae.update(MINI_VAE)
        text.update(MINI_TEXT)
    return (get_config("unet", "sd-v1.5", scale), text, vae)


def bk_sdm_tiny_config(teacher: dict) -> dict:
    """BK-SDM-Tiny block removal applied to a SD-v1-style U-Net config (see module docstring)."""
    cfg = {k: copy.deepcopy(v) for k, v in dict(teacher).items() if not k.startswith("_")}
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    chans = list(cfg["block_out_channels"])
    if len(down) < 2 or down[-1] != "DownBlock2D" or up[0] != "UpBlock2D":
        raise TrainingError(
            "bk-sdm-tiny block removal needs a SD-v1-style teacher U-Net whose innermost stage is a "
            "DownBlock2D/UpBlock2D pair."
        )
    cfg["down_block_types"] = down[:-1]
    cfg["up_block_types"] = up[1:]
    cfg["block_out_channels"] = chans[:-1]
    cfg["mid_block_type"] = None
    cfg["layers_per_block"] = 1
    head = cfg.get("attention_head_dim")
    if isinstance(head, (list, tuple)):
        cfg["attention_head_dim"] = list(head)[:-1]
    return cfg




@dataclass
class Components:
    """The frozen parts and the teacher U-Net of a training run."""

    unet: object  # diffusers.UNet2DConditionModel (teacher)
    text_encoder: object  # transformers.CLIPTextModel
    vae: object  # diffusers.AutoencoderKL
    tokenizer: object  # edgefc.models.tokenizer tokenizer
    noise_scheduler: object  # diffusers.DDPMScheduler
    source: str  # "arch:<name>" or the folder


def _unet_from_config(cfg: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(cfg)


def check_teacher_dir(root: Path) -> None:
    """A teacher folder must be a local diffusers folder with unet/, text_encoder/ and vae/."""
    if not root.is_dir():
        raise TrainingError(f"teacher folder {root} does not exist.")
    for sub in ("unet", "text_encoder", "vae"):
        if not (root / sub / "config.json").is_file():
            raise TrainingError(f"teacher folder {root} has no {sub}/config.json (expected a diffusers folder).")


def build_teacher(teacher_dir: str | Path | None, teacher_arch: str | None, seed: int,
                  tokenizer: str | Path | None = None) -> Components:
    """Teacher U-Net, text encoder, VAE, tokenizer and noise scheduler, from a folder or an arch
    (``tokenizer``: a CLIP tokenizer folder for the arch; None gives the byte-level fallback)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from edgefc.models.tokenizer import load_tokenizer

    if teacher_dir is not None:
        root = Path(teacher_dir)
        check_teacher_dir(root)
        try:
            unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)
            text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
            vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise TrainingError(f"cannot load the teacher from {root}: {str(e).splitlines()[0]}") from None
        if (root / "scheduler" / "scheduler_config.json").is_file():
            sched_cfg = DDPMScheduler.load_config(root, subfolder="scheduler", local_files_only=True)
            sched = DDPMScheduler.from_config(sched_cfg)
        else:
            sched = DDPMScheduler(**SD_SCHEDULER)
        return Components(unet, text_encoder, vae, load_tokenizer(root), sched, str(root))
    if teacher_arch not in TEACHER_ARCHS:
        raise TrainingError(f"unknown teacher arch {teacher_arch!r}; choose one of {', '.join(TEACHER_ARCHS)}.")
    unet_cfg, text_cfg, vae_cfg = _arch_configs(teacher_arch)
    torch.manual_seed(seed)
    unet = _unet_from_config(unet_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    vae = AutoencoderKL.from_config(vae_cfg)
    return Components(unet, text_encoder, vae, load_tokenizer(tokenizer), DDPMScheduler(**SD_SCHEDULER),
                      f"arch:{teacher_arch}")


def student_config(student_arch: str, teacher_cfg: dict) -> dict:
    if student_arch == "bk-sdm-tiny":
        return bk_sdm_tiny_config(teacher_cfg)
    if student_arch == "tiny":
        return get_config("unet", "bk-sdm-tiny", "tiny")
    raise TrainingError(f"unknown student arch {student_arch!r}; choose one of {', '.join(STUDENT_ARCHS)}.")


_BLOCK_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$")
_STAGE_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(.*)$")


def _count(cfg_blocks: dict, prefix: str, stage: int, kind: str) -> int:
    return cfg_blocks.get((prefix, stage, kind), 0)


def _block_counts(state: dict) -> dict:
    counts: dict = {}
    for k in state:
        m = _BLOCK_KEY.match(k)
        if m:
            key = (m.group(1), int(m.group(2)), m.group(3))
            counts[key] = max(counts.get(key, 0), int(m.group(4)) + 1)
    return counts


def student_to_teacher_key(key: str, n_up_teacher: int, n_up_student: int, t_counts: dict, s_counts: dict) -> str:
    """The teacher parameter a student parameter is initialised from (BK-SDM's retained blocks)."""
    m = _BLOCK_KEY.match(key)
    if m:
        prefix, stage, kind, idx, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        t_stage = stage + (n_up_teacher - n_up_student if prefix == "up_blocks" else 0)
        n_s = _count(s_counts, prefix, stage, kind)
        n_t = _count(t_counts, prefix, t_stage, kind)
        if prefix == "up_blocks" and idx == n_s - 1 and n_t > n_s:
            idx = n_t - 1  # the last layer of an up stage takes the skip from the stage's input
        return f"{prefix}.{t_stage}.{kind}.{idx}.{rest}"
    m = _STAGE_KEY.match(key)
    if m and m.group(1) == "up_blocks":
        return f"up_blocks.{int(m.group(2)) + n_up_teacher - n_up_student}.{m.group(3)}"
    return key


def init_student_from_teacher(student, teacher) -> dict:
    """Copy the teacher's retained blocks into ``student`` (in place); returns copied/kept counts."""
    import torch

    t_state = teacher.state_dict()
    s_state = student.state_dict()
    n_up_t = len(teacher.config.up_block_types)
    n_up_s = len(student.config.up_block_types)
    t_counts, s_counts = _block_counts(t_state), _block_counts(s_state)
    copied = 0
    new_state = {}
    for key, value in s_state.items():
        src = student_to_teacher_key(key, n_up_t, n_up_s, t_counts, s_counts)
        if src in t_state and t_state[src].shape == value.shape:
            new_state[key] = t_state[src].detach().clone()
            copied += 1
        else:
            new_state[key] = value
    with torch.no_grad():
        student.load_state_dict(new_state)
    return {"copied": copied, "total": len(s_state)}
