"""BK-SDM distillation: ``edgefc train kd`` (Kim et al., "BK-SDM", arXiv 2305.15798, Sec. 3.2).

The student (a block-removed U-Net, BK-SDM-Tiny by default, initialised from the teacher's
retained blocks) learns from three terms on the same noisy latent ``z_t``:

    L = lambda_sd * ||eps - eps_S(z_t, y, t)||^2                       (task loss)
      + lambda_out * ||eps_T(z_t, y, t) - eps_S(z_t, y, t)||^2          (output-level KD)
      + lambda_feat * sum_l ||f_T^l(z_t, y, t) - f_S^l(z_t, y, t)||^2   (feature-level KD)

(means over elements; ``v``-prediction teachers use the velocity as the task target).
Feature KD compares the outputs of matching stages, captured with forward hooks: down stage i
with down stage i, student up stage i with teacher up stage i + (teacher up stages - student
up stages). Where one side's stage ends in a downsampler and the other's does not (the
student's last down stage), the stage's last attention (or ResNet) output is compared instead,
as BK-SDM does with ``down_blocks.2.attentions.{1,0}.proj_out``. The text encoder and VAE are
frozen; the VAE encodes images to latents, the text encoder embeds the captions.

``--init`` starts the student from trained weights instead (a diffusers U-Net folder or a folder
with ``unet/``, e.g. an earlier ``train kd`` output, of the student architecture): KD fine-tuning
of an already distilled student, as EdgeFusion's advanced distillation does before LCM (paper
Sec. 2.1: BK-SDM-Tiny fine-tuned by KD from a better teacher on better data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefc.models.train.common import Recipe, TrainConfig, TrainResult, run
from edgefc.models.train.errors import TrainingError


@dataclass
class KDConfig(TrainConfig):
    student_arch: str = "bk-sdm-tiny"
    lambda_sd: float = 1.0
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    init: Path | None = None  # trained student weights to fine-tune (None: the teacher's retained blocks)

    def __post_init__(self):
        self.identity_fields = tuple(self.identity_fields) + ("student_arch", "init")


def _first_tensor(out):
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def _last_layer(block) -> tuple[str, object]:
    attns = getattr(block, "attentions", None)
    if attns is not None and len(attns):
        return f"attentions.{len(attns) - 1}", attns[-1]
    return f"resnets.{len(block.resnets) - 1}", block.resnets[-1]


def feature_pairs(teacher, student) -> list[tuple[str, object, str, object]]:
    """(teacher name, teacher module, student name, student module) whose outputs are compared."""
    pairs = []
    if len(student.down_blocks) > len(teacher.down_blocks) or len(student.up_blocks) > len(teacher.up_blocks):
        raise TrainingError("the student U-Net has more stages than the teacher; feature KD cannot match them.")
    for i, sb in enumerate(student.down_blocks):
        tb = teacher.down_blocks[i]
        if (getattr(sb, "downsamplers", None) is None) == (getattr(tb, "downsamplers", None) is None):
            pairs.append((f"down_blocks.{i}", tb, f"down_blocks.{i}", sb))
        else:
            tn, tm = _last_layer(tb)
            sn, sm = _last_layer(sb)
            pairs.append((f"down_blocks.{i}.{tn}", tm, f"down_blocks.{i}.{sn}", sm))
    off = len(teacher.up_blocks) - len(student.up_blocks)
    for i, sb in enumerate(student.up_blocks):
        pairs.append((f"up_blocks.{i + off}", teacher.up_blocks[i + off], f"up_blocks.{i}", sb))
    return pairs


def load_student_init(student, path: Path) -> dict:
    """Load trained weights from ``path`` (a U-Net folder or a folder with ``unet/``) into ``student``;
    the architectures must agree parameter for parameter."""
    from diffusers import UNet2DConditionModel

    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise TrainingError(f"--init {path} has no config.json or unet/config.json (not a diffusers U-Net).")
    try:
        state = UNet2DConditionModel.from_pretrained(folder, local_files_only=True).state_dict()
    except (OSError, ValueError, RuntimeError) as e:
        raise TrainingError(f"--init {path}: cannot load the U-Net: {str(e).splitlines()[0]}") from None
    own = student.state_dict()
    bad = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    extra = sorted(k for k in state if k not in own)
    if bad or extra:
        raise TrainingError(f"--init {path} is not a U-Net of the student's architecture ("
                            f"{len(bad)} student parameters missing or of another shape, e.g. {(bad or extra)[0]}).")
    student.load_state_dict(state)
    return {"copied": len(own), "total": len(own), "init": str(path)}


class KDRecipe(Recipe):
    kind = "kd"

    def build(self, components, accelerator):
        from diffusers import UNet2DConditionModel

        from edgefc.models.train.archs import init_student_from_teacher, student_config

        cfg = self.cfg
        teacher = components.unet
        s_cfg = student_config(cfg.student_arch, dict(teacher.config))
        hidden = components.text_encoder.config.hidden_size
        if s_cfg.get("cross_attention_dim") != hidden:
            raise TrainingError(
                f"student arch {cfg.student_arch!r} has cross_attention_dim {s_cfg.get('cross_attention_dim')}, "
                f"but the teacher's text encoder is {hidden} wide; use --student-arch bk-sdm-tiny."
            )
        student = UNet2DConditionModel.from_config(s_cfg)
        if cfg.init is not None:
            self.init_stats = load_student_init(student, Path(cfg.init))
        else:
            self.init_stats = init_student_from_teacher(student, teacher)
        self.pairs = feature_pairs(teacher, student)
        self.acts_t, self.acts_s = {}, {}
        for tn, tm, sn, sm in self.pairs:
            tm.register_forward_hook(self._hook(self.acts_t, tn))
            sm.register_forward_hook(self._hook(self.acts_s, sn))
        self.teacher = teacher
        self.scheduler = components.noise_scheduler
        return student

    @staticmethod
    def _hook(store, name):
        def hook(module, inputs, output):
            store[name] = _first_tensor(output)

        return hook

    def loss(self, batch, latents, ehs, gen):
        import torch
        import torch.nn.functional as F

        cfg, sched = self.cfg, self.scheduler
        bsz = latents.shape[0]
        noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=gen, device=latents.device)
        noisy = sched.add_noise(latents, noise, t)
        if sched.config.prediction_type == "epsilon":
            target = noise
        elif sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            raise TrainingError(f"unsupported teacher prediction type {sched.config.prediction_type!r}.")

        pred = self.student(noisy, t, ehs).sample
        with torch.no_grad():
            pred_t = self.teacher(noisy, t, ehs).sample
        loss_sd = F.mse_loss(pred.float(), target.float())
        loss_out = F.mse_loss(pred.float(), pred_t.float())
        feats = []
        for tn, _, sn, _ in self.pairs:
            a_t, a_s = self.acts_t[tn], self.acts_s[sn]
            if a_t.shape != a_s.shape:
                raise TrainingError(
                    f"feature KD pair {tn} (teacher, {tuple(a_t.shape)}) / {sn} (student, {tuple(a_s.shape)}) "
                    "differ in shape; the student is not a block-removed version of the teacher."
                )
            feats.append(F.mse_loss(a_s.float(), a_t.detach().float()))
        loss_feat = torch.stack(feats).sum()
        loss = cfg.lambda_sd * loss_sd + cfg.lambda_out * loss_out + cfg.lambda_feat * loss_feat
        return loss, {"loss_sd": loss_sd.item(), "loss_kd_out": loss_out.item(), "loss_kd_feat": loss_feat.item()}


def train_kd(cfg: KDConfig) -> TrainResult:
    """Run BK-SDM distillation as configured (see the module docstring)."""
    if cfg.student_arch not in ("bk-sdm-tiny", "tiny"):
        raise TrainingError(f"unknown student arch {cfg.student_arch!r}; choose bk-sdm-tiny or tiny.")
    if cfg.init is not None:
        init = Path(cfg.init)
        if not init.exists():
            raise TrainingError(f"--init {init} does not exist.")
        if not ((init / "unet" / "config.json").is_file() or (init / "config.json").is_file()):
            raise TrainingError(f"--init {init} has no config.json or unet/config.json (not a diffusers U-Net).")
    return run(KDRecipe(cfg))
