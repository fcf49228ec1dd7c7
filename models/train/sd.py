"""Training from scratch: ``edgefc train vae`` (an AutoencoderKL) and ``edgefc train sd`` (a U-Net).

EdgeFusion starts from pretrained parts (the SD-v1.5 VAE, text encoder and U-Net; BK-SDM-Tiny
distilled from it). None can be downloaded here, so the miniature recipe
(bench/mini_edgefusion.py) first trains its own, on synthetic data (:mod:`edgefc.models.synth`):

* ``train vae`` -- the base pipeline's VAE (``--teacher`` folder or ``--teacher-arch``; ``mini``
  is the small one the bench uses) re-initialised from its config and trained as an autoencoder:
  ``L1 + MSE`` reconstruction (pixels farther than 0.2 from the image's median colour, i.e. the
  objects of a scene, weighted ``1 + --fg-weight``, normalised to mean 1) plus a small KL term (``--kl-weight``, as the SD VAE's
  ``kl_weight`` 1e-6) on a posterior sample. Like SD's VAE, the latent is scaled to unit
  variance: the saved config's ``scaling_factor`` is ``1 / RMS`` of the posterior means over the
  last ``SCALE_WINDOW`` training batches. The output folder is a whole pipeline (the base's
  text encoder and U-Net, the trained ``vae/``), so it is the base of ``train sd``.
* ``train sd`` -- a U-Net trained from scratch (seeded random init) with the SD-v1 objective
  (epsilon MSE at uniform timesteps, DDPM scaled-linear schedule), the base folder's text
  encoder and VAE frozen. ``--caption-dropout p`` replaces a fraction ``p`` of the captions by
  the empty prompt so the model also learns the unconditional prediction that classifier-free
  guidance (and LCM's guided teacher) needs. ``--prediction-type v_prediction`` trains SD 2's
  v-objective instead of SD-v1's epsilon (same U-Net; the MSE on v weighs each timestep by
  ``1 + 1/SNR`` relative to the epsilon MSE, so the high-noise steps where a scene's layout and
  colours are decided count), written into the output's ``scheduler/`` for kd, lcm and sampling. ``--unet-arch sd-v1.5`` trains the base's U-Net
  layout (the teacher); ``bk-sdm-tiny`` its BK-SDM-Tiny block removal from scratch, the
  baseline that ``train kd`` (initialised from the teacher, with KD losses) is compared with at
  the same step budget (BK-SDM, Table 3).

Both use the loop of :mod:`edgefc.models.train.common` (accelerate, resumable safetensors
checkpoints, a data order that is a pure function of seed and step).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgefc.models.train.common import Recipe, TrainConfig, TrainResult, run
from edgefc.models.train.errors import TrainingError

UNET_ARCHS = ("sd-v1.5", "bk-sdm-tiny")
#: Training batches over which the VAE's latent RMS is averaged for ``scaling_factor``.
SCALE_WINDOW = 32


@dataclass
class VAEConfig(TrainConfig):
    kl_weight: float = 1e-6
    fg_weight: float = 0.0


@dataclass
class SDConfig(TrainConfig):
    unet_arch: str = "sd-v1.5"
    caption_dropout: float = 0.1
    prediction_type: str | None = None  # None: the base scheduler's

    def __post_init__(self):
        self.identity_fields = tuple(self.identity_fields) + ("unet_arch",)


class VAERecipe(Recipe):
    kind = "vae"
    trainable = "vae"
    needs_latents = False
    needs_text = False

    def build(self, components, accelerator):
        from diffusers import AutoencoderKL

        cfg = {k: v for k, v in dict(components.vae.config).items() if not k.startswith("_")}
        vae = AutoencoderKL.from_config(cfg)
        self.sq = []
        return vae

    def loss(self, batch, latents, ehs, gen):

        x = batch["pixel_values"].to(next(self.student.parameters()).device)
        post = self.student.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = self.student.decode(z).sample
        kl = post.kl().mean()
        # pixels away from the image's median colour (objects on a background) weigh 1 + fg_weight
        med = x.flatten(2).median(dim=2).values[:, :, None, None]
        w = 1.0 + self.cfg.fg_weight * ((x - med).abs().amax(dim=1, keepdim=True) > 0.2).float()
        w = w / w.mean()
        l1, l2 = (w * (rec - x).abs()).mean(), (w * (rec - x) ** 2).mean()
        self.sq = (self.sq + [float(post.mean.detach().pow(2).mean())])[-SCALE_WINDOW:]
        return l1 + l2 + self.cfg.kl_weight * kl, {"l1": l1.item(), "mse": l2.item(), "kl": kl.item()}

    def final_models(self, student) -> dict:
        if self.sq:
            student.register_to_config(scaling_factor=float(1.0 / (sum(self.sq) / len(self.sq)) ** 0.5))
        return {"vae": student}


class SDRecipe(Recipe):
    kind = "sd"

    def build(self, components, accelerator):
        import torch
        from diffusers import UNet2DConditionModel

        from edgefc.models.train.archs import bk_sdm_tiny_config

        base = {k: v for k, v in dict(components.unet.config).items() if not k.startswith("_")}
        cfg = bk_sdm_tiny_config(base) if self.cfg.unet_arch == "bk-sdm-tiny" else base
        hidden = components.text_encoder.config.hidden_size
        if cfg.get("cross_attention_dim") != hidden:
            raise TrainingError(f"the U-Net's cross_attention_dim {cfg.get('cross_attention_dim')} does not match "
                                f"the text encoder width {hidden}.")
        cfg.pop("time_cond_proj_dim", None)
        torch.manual_seed(self.cfg.seed + 11)
        self.scheduler = components.noise_scheduler
        if self.cfg.prediction_type is not None:
            from diffusers import DDPMScheduler

            self.scheduler = DDPMScheduler.from_config(self.scheduler.config, prediction_type=self.cfg.prediction_type)
        self.uncond = None
        return UNet2DConditionModel.from_config(cfg)

    def _uncond(self, device):
        import torch

        if self.uncond is None:
            ids = torch.from_numpy(self.components.tokenizer.encode([""])).to(device)
            with torch.no_grad():
                self.uncond = self.components.text_encoder(ids)[0].float()
        return self.uncond

    def loss(self, batch, latents, ehs, gen):
        import torch
        import torch.nn.functional as F

        sched = self.scheduler
        bsz, dev = latents.shape[0], latents.device
        if self.cfg.caption_dropout > 0:
            drop = torch.rand((bsz,), generator=gen, device=dev) < self.cfg.caption_dropout
            ehs = torch.where(drop[:, None, None], self._uncond(dev).expand_as(ehs), ehs)
        noise = torch.randn(latents.shape, generator=gen, device=dev, dtype=latents.dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (bsz,), generator=gen, device=dev)
        noisy = sched.add_noise(latents, noise, t)
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, t)
        else:
            target = noise
        pred = self.student(noisy, t, ehs).sample
        return F.mse_loss(pred.float(), target.float()), {}

    def scheduler_for_output(self):
        return self.scheduler


def train_vae(cfg: VAEConfig) -> TrainResult:
    """Train the base pipeline's VAE from scratch (see the module docstring)."""
    if cfg.kl_weight < 0:
        raise TrainingError("--kl-weight must not be negative.")
    if cfg.fg_weight < 0:
        raise TrainingError("--fg-weight must not be negative.")
    return run(VAERecipe(cfg))


def train_sd(cfg: SDConfig) -> TrainResult:
    """Train a U-Net from scratch with the SD objective (see the module docstring)."""
    if cfg.unet_arch not in UNET_ARCHS:
        raise TrainingError(f"unknown --unet-arch {cfg.unet_arch!r}; choose one of {', '.join(UNET_ARCHS)}.")
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise TrainingError("--caption-dropout must be in [0, 1).")
    if cfg.prediction_type not in (None, "epsilon", "v_prediction"):
        raise TrainingError(f"unknown --prediction-type {cfg.prediction_type!r}; choose epsilon or v_prediction.")
    return run(SDRecipe(cfg))
