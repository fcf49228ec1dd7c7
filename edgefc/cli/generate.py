"""``edgefc generate``: text-to-image with the three components (text encoder, U-Net, VAE decoder).

The work is in :mod:`edgefc.models.pipeline` (imported only when the command runs). Progress goes
to stderr; the written PNG's path, and with ``--target`` the modelled NPU time table, to stdout.
"""

from __future__ import annotations

import click

from edgefc.models.configs import ARCHS, DEFAULT_IMAGE_SIZE, SCALES


@click.command("generate")
@click.option("--prompt", "-p", default=None, help="The text prompt (one image; or --prompts).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=str), default=None, metavar="FILE",
              help="A text file of prompts, one per line: one NAME.png + NAME.txt per prompt in the folder -o, NAME = "
                   "position and prompt words (0001-a-red-circle...), prompt i with seed --seed + i, models loaded "
                   "once; score the folder with `edgefc eval`.")
@click.option("--steps", type=int, default=2, show_default=True,
              help="LCM steps: 1, 2 or 4 (the step counts EdgeFusion is distilled for).")
@click.option("--build", type=click.Path(path_type=str), default=None,
              help="Folder with one compiled build per component (DIR/text-encoder, DIR/unet, DIR/vae-decoder, "
                   "or any names: found by their inputs). Default: the exported ONNX models (cached).")
@click.option("--weights", type=click.Path(path_type=str), default=None,
              help="Local diffusers pipeline folder (tokenizer/, text_encoder/, unet/, vae/, optional scheduler/); "
                   "never downloads. Default: built-in random weights and the no-download tokenizer.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial latents and LCM noise.")
@click.option("--guidance", type=float, default=1.0, show_default=True,
              help="Classifier-free guidance scale; > 1 adds an unconditional U-Net pass per step "
                   "(the exported U-Net has no LCM guidance embedding input).")
@click.option("--height", type=int, default=None,
              help=f"Image height, a multiple of 64. Default {DEFAULT_IMAGE_SIZE['full']} (--scale full), "
                   f"{DEFAULT_IMAGE_SIZE['tiny']} (--scale tiny), the build's size with --build, or the size the "
                   "--weights U-Net was trained for (its sample_size x 8).")
@click.option("--width", type=int, default=None, help="Image width, a multiple of 64; defaults as --height.")
@click.option("--scale", type=click.Choice(SCALES), default="full", show_default=True,
              help="Built-in models: full (the published sizes) or tiny (same topology, small; for tests).")
@click.option("--arch", type=click.Choice(ARCHS), default="bk-sdm-tiny", show_default=True,
              help="Built-in U-Net architecture (exported models only).")
@click.option("--runtime", default="auto", show_default=True, metavar="auto|onnxruntime|tvm",
              help="How builds run: auto = a build's local TVM library when it has one (--emit tvm), else "
                   "onnxruntime on its model.onnx; onnxruntime = always; tvm = every build must have one.")
@click.option("--target", "-t", default=None,
              help="Also print the modelled NPU time per component and in total for this target (exynos2400).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Output PNG file (--prompt), or folder (--prompts; created).")
def generate_cmd(prompt, prompts_file, steps, build, weights, seed, guidance, height, width, scale, arch, runtime, target,
                 output):
    """Generate an image from a text prompt: text encoder -> U-Net (LCM steps) -> VAE decoder.

    \b
    edgefc generate --prompt "a cute cat, photo-realistic" --steps 2 -o cat.png
    edgefc generate --prompt "a cat" --build build/ --target exynos2400 -o cat.png
    edgefc generate --prompts heldout.txt --build build/ --weights mini/lcm -o samples/ && edgefc eval samples/
    """
    from edgefc.models import pipeline
    from edgefc.staging import check_output_file

    if (prompt is None) == (prompts_file is None):
        raise pipeline.GenerateError("give either --prompt TEXT (one image) or --prompts FILE (one image per line).")
    if prompts_file is not None:
        from edgefc.models.recording import read_prompts
        from edgefc.staging import check_output_folder

        check_output_folder(output, "-o")  # an unwritable folder fails before anything runs
        prompts = read_prompts(prompts_file, "--prompts")
        results = pipeline.generate_folder(prompts, output, seed=seed, steps=steps, build=build, weights=weights,
                                           guidance=guidance, height=height, width=width, scale=scale, arch=arch,
                                           target=target, runtime=runtime, progress=True)
        p = results[0].plan
        if target is not None:
            npu = pipeline.npu_times(results[0], target, progress=True)
            click.echo(pipeline.format_npu_table(npu))
        ran = ", ".join(f"{c} {b}" for c, b in results[0].backends.items())
        click.echo(f"wrote {len(results)} images + prompts to {output} ({p.width}x{p.height}, {p.steps} LCM "
                   f"step{'s' if p.steps > 1 else ''}, seeds {seed}..{seed + len(results) - 1}; {ran})")
        return
    if output.lower().endswith(".png"):  # (another suffix is refused by the plan, naming it)
        check_output_file(output, "-o")  # an unwritable PNG fails before anything runs
    p = pipeline.plan(prompt, steps=steps, output=output, build=build, weights=weights, seed=seed,
                      guidance=guidance, height=height, width=width, scale=scale, arch=arch, target=target,
                      runtime=runtime)
    result = pipeline.run_plan(p, progress=True)
    if target is not None:
        npu = pipeline.npu_times(result, target, progress=True)
        click.echo(pipeline.format_npu_table(npu))
    ran = ", ".join(f"{c} {b}" for c, b in result.backends.items())
    click.echo(f"wrote {result.output} ({p.width}x{p.height}, {p.steps} LCM step{'s' if p.steps > 1 else ''}, "
               f"seed {p.seed}; {ran})")
