"""``edgefc calibrate``: record every component's real inputs from the FP32 pipeline.

The work is in :mod:`edgefc.models.recording` (imported only when the command runs). A progress
bar goes to stderr; the files written, with their sample counts, to stdout.
"""

from __future__ import annotations

import click

from edgefc.models.configs import ARCHS, DEFAULT_IMAGE_SIZE, SCALES


@click.command("calibrate")
@click.option("--prompts", "prompts", required=True, type=click.Path(path_type=str), metavar="FILE",
              help="Calibration prompts, one per line: their inputs become CALIB/<component>.npz (--calib).")
@click.option("--eval-prompts", "eval_prompts", type=click.Path(path_type=str), metavar="FILE",
              help="Held-out prompts, one per line, disjoint from --prompts (a prompt in both is left out here): "
                   "their inputs become CALIB/<component>.eval.npz (compile --eval).")
@click.option("--weights", type=click.Path(path_type=str), default=None,
              help="Local diffusers pipeline folder (text_encoder/, unet/, vae/, optional tokenizer/, scheduler/); "
                   "never downloads. Default: the built-in random weights, the same ones `edgefc export` writes.")
@click.option("--steps", type=int, default=2, show_default=True,
              help="LCM steps per prompt (1, 2 or 4): one U-Net input recorded per step.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of prompt 1's initial latents; prompt i uses seed + i (eval prompts continue the sequence).")
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="Classifier-free guidance scale as in `edgefc generate`; > 1 also records the U-Net's runs on the "
                   "empty prompt.")
@click.option("--height", type=int, default=None,
              help=f"Image height, a multiple of 64. Default {DEFAULT_IMAGE_SIZE['full']} (--scale full), "
                   f"{DEFAULT_IMAGE_SIZE['tiny']} (--scale tiny), or the size the --weights U-Net was trained for.")
@click.option("--width", type=int, default=None, help="Image width, a multiple of 64; defaults as --height.")
@click.option("--scale", type=click.Choice(SCALES), default="full", show_default=True,
              help="Built-in models: full (the published sizes) or tiny (same topology, small; for tests).")
@click.option("--arch", type=click.Choice(ARCHS), default="bk-sdm-tiny", show_default=True,
              help="Built-in U-Net architecture (without --weights).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), metavar="CALIB",
              help="Folder to write the .npz files and calibrate.json into (created; other files in it are kept).")
def calibrate_cmd(prompts, eval_prompts, weights, steps, seed, guidance, height, width, scale, arch, output):
    """Run the FP32 pipeline (text encoder -> U-Net over the LCM trajectory) on prompts and record
    every component's real inputs, for `edgefc compile --calib/--eval`.

    \b
    Writes CALIB/text-encoder.npz, CALIB/unet.npz, CALIB/vae-decoder.npz (from --prompts),
    CALIB/<component>.eval.npz (from --eval-prompts): one array per ONNX input, [N, *shape];
    the U-Net files also hold unconditional:encoder_hidden_states (the empty prompt's embedding,
    for the conditioning ratio in report.json). The VAE decoder's input is the trajectory's
    final latents, so the decoder does not need to run.

    \b
    edgefc calibrate --prompts prompts.txt --eval-prompts eval.txt --steps 2 -o calib
    edgefc compile unet.onnx --calib calib/unet.npz --eval calib/unet.eval.npz -o build/unet
    """
    from edgefc.models.recording import calibrate

    result = calibrate(prompts, output, eval_prompts_file=eval_prompts, weights=weights, steps=steps, seed=seed,
                       guidance=guidance, arch=arch, scale=scale, height=height, width=width, progress=True)
    for component, counts in result.samples.items():
        for which, n in counts.items():
            name = f"{component}{'.eval' if which == 'eval' else ''}.npz"
            click.echo(f"  {name:<22} {n:4d} samples")
    if result.left_out:
        click.echo(f"  left out of the evaluation set (also in --prompts): {len(result.left_out)} prompt"
                   f"{'s' if len(result.left_out) != 1 else ''}")
    click.echo(f"wrote {result.output} ({result.seconds:.1f} s)")
