"""``edgefc train vae|sd|kd|lcm``: the training companion (from-scratch VAE and U-Net training,
BK-SDM distillation, LCM distillation).

The work is in :mod:`edgefc.models.train` (imported only when a command runs). Runs on one CPU
as is; ``accelerate launch -m edgefc.cli.train ...`` or ``accelerate launch $(which edgefc) train
...`` spreads the same command over GPUs/nodes (accelerate handles devices and processes).
Progress goes to stderr; the output folder and the first/last loss to stdout.
"""

from __future__ import annotations

from pathlib import Path

import click

TEACHER_ARCHS = ("sd-v1.5", "tiny", "mini")
STUDENT_ARCHS = ("bk-sdm-tiny", "tiny")

_P = click.Path(path_type=Path)


def _common(f):
    """The options both recipes share (applied bottom-up, so listed here in reverse)."""
    opts = [
        click.option("--teacher", type=_P, default=None,
                     help="Teacher: a local diffusers folder (unet/, text_encoder/, vae/, optional tokenizer/, "
                          "scheduler/). Never downloads."),
        click.option("--teacher-arch", type=click.Choice(TEACHER_ARCHS), default=None,
                     help="Teacher built from its config with random weights from --seed (instead of --teacher)."),
        click.option("--tokenizer", type=_P, default=None,
                     help="With --teacher-arch: a CLIP tokenizer folder (vocab.json + merges.txt, e.g. the "
                          "tokenizer/ that `edgefc data synth` writes) instead of the byte-level fallback; "
                          "saved into the output's tokenizer/. (A --teacher folder brings its own.)"),
        click.option("--data", type=_P, default=None,
                     help="Training data: a folder of NAME.jpg/png + NAME.txt pairs, or a webdataset .tar shard."),
        click.option("-o", "--output", type=_P, required=True,
                     help="Output folder: checkpoint-STEP/ folders, the final diffusers-style model, train_log.jsonl."),
        click.option("--steps", type=int, default=1000, show_default=True, help="Total optimizer steps."),
        click.option("--batch-size", type=int, default=4, show_default=True, help="Images per step and process."),
        click.option("--lr", type=float, default=None, help="AdamW learning rate, constant. Default: 1e-3 for vae and sd, 5e-5 for kd (BK-SDM), 1e-6 for lcm (the LCM recipe)."),
        click.option("--resume", type=_P, default=None,
                     help="Continue from a checkpoint-STEP folder (same data, teacher, seed, batch size)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of random weights, data order, noise and timesteps."),
        click.option("--save-every", type=int, default=0, show_default=True,
                     help="Write a checkpoint every N steps (0: only at the end)."),
        click.option("--resolution", type=int, default=512, show_default=True,
                     help="Training image size (short side resized, centre square)."),
        click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
                     help="accelerate mixed precision for the forward passes."),
        click.option("--max-grad-norm", type=float, default=1.0, show_default=True,
                     help="Gradient clipping norm (0: off)."),
        click.option("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's; 1 is often fastest on a busy machine)."),
        click.option("--fixed-batch", is_flag=True,
                     help="Overfitting check: the same batch, noise and timesteps at every step."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _check_output(output) -> None:
    """-o must be a folder that can be written (before the teacher is built)."""
    from edgefc.staging import check_output_folder

    check_output_folder(output, "-o")


def _report(result):
    if not result.is_main_process:
        return
    first, last = result.losses[0]["loss"], result.losses[-1]["loss"]
    click.echo(f"{result.output}  steps {result.steps}  loss {first:.5g} -> {last:.5g}  ({result.seconds:.1f} s)")


@click.group("train")
def train_group():
    """Train and distil compact diffusion models (thin recipes on diffusers + accelerate).

    \b
    edgefc train vae --teacher-arch mini --data pairs/ --resolution 64 -o vae/
    edgefc train sd  --teacher vae/ --data pairs/ --resolution 64 -o teacher/
    edgefc train kd  --teacher-arch tiny --student-arch bk-sdm-tiny --data pairs/ -o kd/
    edgefc train lcm --teacher kd/ --init kd/ --data pairs/ -o lcm/
    """


@train_group.command("vae")
@_common
@click.option("--kl-weight", type=float, default=1e-6, show_default=True, help="Weight of the KL term.")
@click.option("--fg-weight", type=float, default=0.0, show_default=True,
              help="Extra reconstruction weight of pixels away from the image's median colour (small objects on a "
                   "plain background learn faster).")
def vae_cmd(lr, quiet, **kw):
    """Train the base pipeline's VAE (AutoencoderKL) from scratch: L1 + MSE reconstruction + KL.

    --teacher / --teacher-arch name the base pipeline; the output is that pipeline with the trained vae/
    (its scaling_factor set to unit latent variance).
    """
    from edgefc.models.train.sd import VAEConfig, train_vae

    _check_output(kw["output"])
    cfg = VAEConfig(lr=1e-3 if lr is None else lr, progress=not quiet, **kw)
    _report(train_vae(cfg))


@train_group.command("sd")
@_common
@click.option("--unet-arch", type=click.Choice(["sd-v1.5", "bk-sdm-tiny"]), default="sd-v1.5", show_default=True,
              help="sd-v1.5: the base pipeline's U-Net layout (the teacher); bk-sdm-tiny: its BK-SDM-Tiny block "
                   "removal, trained from scratch (the baseline for train kd).")
@click.option("--caption-dropout", type=float, default=0.1, show_default=True,
              help="Fraction of captions replaced by the empty prompt (for classifier-free guidance).")
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]), default=None,
              help="What the U-Net predicts (default: the base's scheduler's; SD-v1 epsilon). v_prediction "
                   "(SD 2's) weighs the high-noise steps that decide a scene's layout and colours more; "
                   "written into the output's scheduler/, which kd and lcm follow.")
def sd_cmd(lr, quiet, **kw):
    """Train a U-Net from scratch with the SD objective; the base's text encoder and VAE stay frozen.

    --teacher / --teacher-arch name the base pipeline (e.g. the output of train vae).
    """
    from edgefc.models.train.sd import SDConfig, train_sd

    _check_output(kw["output"])
    cfg = SDConfig(lr=1e-3 if lr is None else lr, progress=not quiet, **kw)
    _report(train_sd(cfg))


@train_group.command("kd")
@_common
@click.option("--student-arch", type=click.Choice(STUDENT_ARCHS), default="bk-sdm-tiny", show_default=True,
              help="bk-sdm-tiny: the teacher with BK-SDM-Tiny's blocks removed, initialised from the teacher's "
                   "retained blocks; tiny: the fixed tiny-scale BK-SDM-Tiny.")
@click.option("--lambda-sd", type=float, default=1.0, show_default=True, help="Weight of the task (noise MSE) loss.")
@click.option("--lambda-out", type=float, default=1.0, show_default=True, help="Weight of output-level KD.")
@click.option("--lambda-feat", type=float, default=1.0, show_default=True, help="Weight of feature-level KD.")
@click.option("--init", type=_P, default=None,
              help="Fine-tune trained student weights instead of starting from the teacher's retained blocks: a "
                   "U-Net folder or a folder with unet/ (e.g. an earlier train kd output) of the student architecture.")
def kd_cmd(lr, quiet, student_arch, **kw):
    """BK-SDM distillation: task loss + output-level KD + feature-level KD from a teacher U-Net."""
    from edgefc.models.train.kd import KDConfig, train_kd

    _check_output(kw["output"])
    cfg = KDConfig(lr=5e-5 if lr is None else lr, progress=not quiet, student_arch=student_arch, **kw)
    _report(train_kd(cfg))


@train_group.command("lcm")
@_common
@click.option("--init", type=_P, default=None,
              help="Student start: a diffusers U-Net folder, a folder with unet/ (e.g. a kd output) or a .safetensors "
                   "state dict of the teacher's architecture. Default: the teacher.")
@click.option("--loss", "loss_type", type=click.Choice(["huber", "l2"]), default="huber", show_default=True,
              help="Consistency loss.")
@click.option("--huber-c", type=float, default=0.001, show_default=True, help="Huber loss constant c.")
@click.option("--num-ddim-timesteps", type=int, default=50, show_default=True,
              help="Skipping-step DDIM solver: number of timesteps N (skip k = 1000/N).")
@click.option("--w-min", type=float, default=3.0, show_default=True, help="Smallest sampled guidance scale w.")
@click.option("--w-max", type=float, default=15.0, show_default=True, help="Largest sampled guidance scale w.")
@click.option("--ema-decay", type=float, default=0.95, show_default=True, help="EMA rate of the target network.")
@click.option("--time-cond-proj-dim", type=int, default=256, show_default=True,
              help="Width of the guidance-scale embedding added to a student that has none.")
@click.option("--bake-guidance", type=float, default=None, metavar="W",
              help="Also fold the guidance embedding at w=W into the time embedding: unet/ is then the EMA "
                   "network without a guidance input (exports with the fixed U-Net interface), unet_lcm/ keeps it.")
def lcm_cmd(lr, quiet, **kw):
    """Latent consistency distillation (skipping-step DDIM teacher with CFG, EMA target, Huber/L2)."""
    from edgefc.models.train.lcm import LCMConfig, train_lcm

    _check_output(kw["output"])
    cfg = LCMConfig(lr=1e-6 if lr is None else lr, progress=not quiet, **kw)
    _report(train_lcm(cfg))


if __name__ == "__main__":  # accelerate launch -m edgefc.cli.train kd ... (errors: one line, exit 2)
    import sys

    from edgefc.cli import main

    main(["train", *sys.argv[1:]])
