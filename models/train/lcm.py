"""Latent consistency distillation: ``edgefc train lcm`` (Luo et al., "Latent Consistency Models",
arXiv 2310.04378, Sec. 4.2-4.3 and Algorithm 1).

Per batch (the algorithm of diffusers' public ``train_lcm_distill_sd`` example, reimplemented):

1. Pick a DDIM solver index n uniformly among ``--num-ddim-timesteps`` (N) skipping-step
   timesteps ``t_{n+k} = (i+1) * T/N - 1``; its end point is ``t_n = t_{n+k} - T/N`` (>= 0).
2. Noise the latent to ``z_{t_{n+k}}`` and sample a guidance scale ``w ~ U[w_min, w_max]``; the
   student sees ``w`` through the guidance-scale embedding (sinusoidal, ``1000 w``) fed as
   ``timestep_cond`` into a ``time_cond_proj_dim`` projection (added to the student if its
   config has none).
3. Online prediction: ``f_theta(z_{t_{n+k}}, w, c, t_{n+k}) = c_skip(t) z + c_out(t) x0_theta``
   with the consistency boundary scalings ``c_skip = s^2 / ((10 t)^2 + s^2)``,
   ``c_out = 10 t / sqrt((10 t)^2 + s^2)``, s = 0.5 (``--timestep-scaling`` 10).
4. Teacher ODE step with classifier-free guidance in the LCM form
   ``x0 = x0_c + w (x0_c - x0_u)``, ``eps = eps_c + w (eps_c - eps_u)`` and one skipping-step
   DDIM update ``z_{t_n} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps``.
5. Target: the EMA network's ``f_theta-(z_{t_n}, w, c, t_n)``; loss Huber
   ``sqrt(d^2 + c^2) - c`` (c = ``--huber-c``) or L2; after each optimizer step
   ``theta- <- mu theta- + (1 - mu) theta`` (``--ema-decay`` mu).

The student starts from ``--init`` (a diffusers U-Net folder, a folder with ``unet/`` such as the
output of ``edgefc train kd``, or a bare ``.safetensors`` state dict for the teacher's
architecture), else from the teacher. The output folder's ``unet/`` is the EMA (target)
network, ``unet_online/`` the online one, ``scheduler/`` an ``LCMScheduler`` config. At
inference, a guidance scale G (Imagen/diffusers convention) corresponds to ``w = G - 1``: embed
``G - 1`` as diffusers' ``LatentConsistencyModelPipeline`` does.

Deployment at a fixed guidance (``--bake-guidance W``): the exported U-Net has the fixed
interface (``sample``, ``timestep``, ``encoder_hidden_states``) and no ``timestep_cond`` input.
The guidance embedding enters the U-Net only as ``linear_1(t_emb + cond_proj(e(w)))`` in the time
embedding, so for one ``w`` it is the constant ``linear_1.weight @ cond_proj(e(w))`` added to
``linear_1.bias`` (:func:`bake_guidance`, exact up to float rounding). With the flag, the output's
``unet/`` is that baked EMA network (no ``time_cond_proj_dim``; exports, compiles and runs in
``edgefc generate --weights`` as is) and ``unet_lcm/`` the EMA network with its embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefc.models.train.common import Recipe, TrainConfig, TrainResult, run
from edgefc.models.train.errors import TrainingError


@dataclass
class LCMConfig(TrainConfig):
    init: Path | None = None
    loss_type: str = "huber"
    huber_c: float = 0.001
    num_ddim_timesteps: int = 50
    w_min: float = 3.0
    w_max: float = 15.0
    ema_decay: float = 0.95
    timestep_scaling: float = 10.0
    time_cond_proj_dim: int = 256
    bake_guidance: float | None = None

    def __post_init__(self):
        self.identity_fields = tuple(self.identity_fields) + ("num_ddim_timesteps", "time_cond_proj_dim")


def guidance_scale_embedding(w, dim: int):
    """Sinusoidal embedding of ``1000 w`` (VDM / diffusers ``get_guidance_scale_embedding``)."""
    import math

    import torch

    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def boundary_scalings(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """Consistency-model boundary conditions (c_skip(0) = 1, c_out(0) = 0), as LCMScheduler."""
    st = timestep_scaling * t.float()
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def bake_guidance(unet, w: float):
    """A copy of ``unet`` without the guidance-embedding input, its time embedding fixed at ``w``.

    ``linear_1(t + cond_proj(e(w))) = linear_1(t) + linear_1.weight @ cond_proj(e(w))``: the second
    term is folded into ``linear_1.bias`` (see the module docstring).
    """
    import torch
    from diffusers import UNet2DConditionModel

    dim = unet.config.time_cond_proj_dim
    if dim is None:
        raise TrainingError("the U-Net has no guidance embedding (time_cond_proj_dim) to bake.")
    te = unet.time_embedding
    with torch.no_grad():
        c = te.cond_proj(guidance_scale_embedding(torch.tensor([float(w)]), dim).to(te.cond_proj.weight.dtype))[0]
        shift = te.linear_1.weight @ c
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    cfg["time_cond_proj_dim"] = None
    baked = UNet2DConditionModel.from_config(cfg)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("time_embedding.cond_proj")}
    state["time_embedding.linear_1.bias"] = state["time_embedding.linear_1.bias"] + shift
    baked.load_state_dict(state)
    return baked.eval()


class DDIMSolver:
    """Skipping-step DDIM on the teacher's schedule: N timesteps ``(i+1) * T/N - 1``."""

    def __init__(self, alphas_cumprod, num_train_timesteps: int, num_ddim_timesteps: int, device):
        import torch

        step = num_train_timesteps // num_ddim_timesteps
        ts = torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * step - 1
        self.step = step
        self.timesteps = ts.to(device)
        ac = alphas_cumprod.to(torch.float32)
        prev = torch.cat([ac[:1], ac[ts[:-1]]])
        self.alpha_prev = prev.to(device)

    def ddim_step(self, x0, eps, index):
        a = self.alpha_prev[index][:, None, None, None]
        return a.sqrt() * x0 + (1.0 - a).sqrt() * eps


def _pred_x0_eps(output, t, sample, prediction_type: str, alpha, sigma):
    a = alpha[t][:, None, None, None]
    s = sigma[t][:, None, None, None]
    if prediction_type == "epsilon":
        return (sample - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * sample - s * output, a * output + s * sample
    if prediction_type == "sample":
        return output, (sample - a * output) / s
    raise TrainingError(f"unsupported teacher prediction type {prediction_type!r}.")


def load_init_unet(path: Path, teacher_config: dict, time_cond_proj_dim: int):
    """The student U-Net from ``--init`` with a guidance-embedding projection (see module docstring)."""
    from diffusers import UNet2DConditionModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise TrainingError(f"--init {path} has no config.json or unet/config.json (not a diffusers U-Net).")
        try:
            base = UNet2DConditionModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise TrainingError(f"--init {path}: cannot load the U-Net: {str(e).splitlines()[0]}") from None
        config, state = dict(base.config), base.state_dict()
    elif path.is_file() and path.suffix == ".safetensors":
        config = dict(teacher_config)
        try:
            state = load_file(str(path))
        except (OSError, ValueError, SafetensorError) as e:
            raise TrainingError(f"--init {path} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__}).") from None
    else:
        raise TrainingError(f"--init {path} is neither a diffusers U-Net folder nor a .safetensors file.")
    if config.get("time_cond_proj_dim") is None:
        config["time_cond_proj_dim"] = time_cond_proj_dim
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config(config)
    own = student.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith("time_embedding.cond_proj")]
    if bad or missing:
        what = bad[0] if bad else missing[0]
        raise TrainingError(f"--init {path} does not fit the U-Net architecture (first mismatch: {what}).")
    student.load_state_dict(state, strict=False)
    return student


class LCMRecipe(Recipe):
    kind = "lcm"

    def build(self, components, accelerator):
        import torch
        from diffusers import UNet2DConditionModel

        cfg = self.cfg
        teacher = components.unet
        self.teacher = teacher
        self.sched = components.noise_scheduler
        tcfg = {k: v for k, v in dict(teacher.config).items() if not k.startswith("_")}
        dim = teacher.config.time_cond_proj_dim or cfg.time_cond_proj_dim
        if cfg.init is not None:
            student = load_init_unet(cfg.init, tcfg, dim)
        else:
            student = UNet2DConditionModel.from_config(dict(tcfg, time_cond_proj_dim=dim))
            student.load_state_dict(teacher.state_dict(), strict=False)
        hidden = components.text_encoder.config.hidden_size
        if student.config.cross_attention_dim != hidden:
            raise TrainingError(
                f"the student's cross_attention_dim {student.config.cross_attention_dim} does not match the "
                f"text encoder width {hidden}."
            )
        if student.config.in_channels != teacher.config.in_channels:
            raise TrainingError("the student and teacher U-Nets take different latent channels.")
        self.dim = student.config.time_cond_proj_dim
        self.target = UNet2DConditionModel.from_config(student.config)
        self.target.load_state_dict(student.state_dict())
        self.target.requires_grad_(False)
        self.target.train()
        self.target.to(accelerator.device)
        T = self.sched.config.num_train_timesteps
        if not 1 <= cfg.num_ddim_timesteps <= T:
            raise TrainingError(f"--num-ddim-timesteps must be between 1 and {T}.")
        ac = self.sched.alphas_cumprod
        self.alpha = ac.sqrt().to(accelerator.device)
        self.sigma = (1 - ac).sqrt().to(accelerator.device)
        self.solver = DDIMSolver(ac, T, cfg.num_ddim_timesteps, accelerator.device)
        self.uncond = None
        self.accelerator = accelerator
        torch.manual_seed(cfg.seed + 2)
        return student

    def _uncond(self, bsz, device):
        import torch

        if self.uncond is None:
            ids = torch.from_numpy(self.components.tokenizer.encode([""])).to(device)
            with torch.no_grad():
                self.uncond = self.components.text_encoder(ids)[0].float()
        return self.uncond.expand(bsz, -1, -1)

    def loss(self, batch, latents, ehs, gen):
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        dev, bsz = latents.device, latents.shape[0]
        ptype = self.sched.config.prediction_type
        index = torch.randint(0, cfg.num_ddim_timesteps, (bsz,), generator=gen, device=dev)
        t_start = self.solver.timesteps[index]
        t_end = (t_start - self.solver.step).clamp(min=0)
        cs_start, co_start = boundary_scalings(t_start, timestep_scaling=cfg.timestep_scaling)
        cs_end, co_end = boundary_scalings(t_end, timestep_scaling=cfg.timestep_scaling)
        noise = torch.randn(latents.shape, generator=gen, device=dev, dtype=latents.dtype)
        z = self.sched.add_noise(latents, noise, t_start)
        w = torch.rand((bsz,), generator=gen, device=dev) * (cfg.w_max - cfg.w_min) + cfg.w_min
        w_emb = guidance_scale_embedding(w, self.dim).to(dev)
        w = w[:, None, None, None]

        out = self.student(z, t_start, ehs, timestep_cond=w_emb).sample
        x0, _ = _pred_x0_eps(out, t_start, z, ptype, self.alpha, self.sigma)
        model_pred = cs_start * z + co_start * x0

        with torch.no_grad():
            both = self.teacher(torch.cat([z, z]), torch.cat([t_start, t_start]),
                                torch.cat([ehs, self._uncond(bsz, dev)])).sample
            x0_t, eps_t = _pred_x0_eps(both, torch.cat([t_start, t_start]), torch.cat([z, z]), ptype,
                                       self.alpha, self.sigma)
            x0_c, x0_u = x0_t.chunk(2)
            eps_c, eps_u = eps_t.chunk(2)
            x0_g = x0_c + w * (x0_c - x0_u)
            eps_g = eps_c + w * (eps_c - eps_u)
            z_prev = self.solver.ddim_step(x0_g, eps_g, index)
            out_t = self.target(z_prev, t_end, ehs, timestep_cond=w_emb).sample
            x0_tg, _ = _pred_x0_eps(out_t, t_end, z_prev, ptype, self.alpha, self.sigma)
            target = cs_end * z_prev + co_end * x0_tg

        d = model_pred.float() - target.float()
        if cfg.loss_type == "l2":
            loss = F.mse_loss(model_pred.float(), target.float())
        else:
            loss = torch.mean(torch.sqrt(d**2 + cfg.huber_c**2) - cfg.huber_c)
        return loss, {"w_mean": float(w.mean().item()), "t_start_mean": float(t_start.float().mean().item())}

    def after_step(self):
        import torch

        mu = self.cfg.ema_decay
        online = self.accelerator.unwrap_model(self.student)
        with torch.no_grad():
            for p_t, p_s in zip(self.target.parameters(), online.parameters()):
                p_t.mul_(mu).add_(p_s.detach(), alpha=1.0 - mu)

    def extra_models(self) -> dict:
        return {"unet_target": self.target}

    def final_models(self, student) -> dict:
        if self.cfg.bake_guidance is not None:
            return {"unet": bake_guidance(self.target, self.cfg.bake_guidance), "unet_lcm": self.target,
                    "unet_online": student}
        return {"unet": self.target, "unet_online": student}

    def scheduler_for_output(self):
        from diffusers import LCMScheduler

        return LCMScheduler.from_config(
            self.sched.config, original_inference_steps=self.cfg.num_ddim_timesteps,
            timestep_scaling=self.cfg.timestep_scaling,
        )


def train_lcm(cfg: LCMConfig) -> TrainResult:
    """Run latent consistency distillation as configured (see the module docstring)."""
    if cfg.loss_type not in ("huber", "l2"):
        raise TrainingError(f"unknown --loss {cfg.loss_type!r}; choose huber or l2.")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise TrainingError("--ema-decay must be in [0, 1).")
    if cfg.w_min > cfg.w_max:
        raise TrainingError("--w-min must not exceed --w-max.")
    if cfg.init is not None and not Path(cfg.init).exists():
        raise TrainingError(f"--init {cfg.init} does not exist.")
    return run(LCMRecipe(cfg))
