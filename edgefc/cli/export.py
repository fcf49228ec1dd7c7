"""``edgefc export``: a text encoder, U-Net or VAE decoder from diffusers to static-shape ONNX.

The work is in :mod:`edgefc.models.export` (imported here only when the command runs, so the
rest of the CLI never loads torch).
"""

from __future__ import annotations

import click

from edgefc.models.configs import ARCHS, COMPONENTS, DEFAULT_IMAGE_SIZE, SCALES

#: kept here (not imported from edgefc.models.export) so the CLI never loads torch to show --help
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"


@click.command("export")
@click.argument("component", type=click.Choice(COMPONENTS))
@click.option("--arch", type=click.Choice(ARCHS), default="bk-sdm-tiny", show_default=True,
              help="Model family: BK-SDM-Tiny (no mid block, 3 stages) or Stable Diffusion v1.5.")
@click.option("--weights", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Local diffusers pipeline folder (with unet/, text_encoder/, vae/) to load weights from; "
                   "never downloads. Default: random weights from --seed.")
@click.option("--height", type=int, default=None,
              help=f"Image height in pixels (latent = height/8). Default {DEFAULT_IMAGE_SIZE['full']} "
                   f"(--scale full) or {DEFAULT_IMAGE_SIZE['tiny']} (--scale tiny).")
@click.option("--width", type=int, default=None, help="Image width in pixels; defaults as --height.")
@click.option("--scale", type=click.Choice(SCALES), default="full", show_default=True,
              help="full: the published model; tiny: same topology with small widths (for tests).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Output .onnx file. Default: COMPONENT-ARCH[-tiny].onnx in the current folder.")
@click.option("--exporter", type=click.Choice(EXPORTERS), default=DEFAULT_EXPORTER, show_default=True,
              help="torch exporter: torchscript (torch.onnx.export dynamo=False; the form the project's figures "
                   "were measured on) or dynamo (torch's own default; needs onnxscript).")
@click.option("--opset", type=click.IntRange(7, 23), default=None,
              help="ONNX opset to export at (default: 17 for torchscript, the exporter's own for dynamo).")
def export_cmd(component, arch, weights, height, width, scale, seed, output, exporter, opset):
    """Export COMPONENT (text-encoder, unet or vae-decoder) to ONNX.

    Static shapes, batch 1 (TorchScript exporter at opset 17 unless --exporter/--opset say
    otherwise). Models over 2 GB get one external data file OUTPUT.data beside the .onnx.
    Progress goes to stderr; the written path to stdout.
    """
    from edgefc.staging import check_output_file

    if output is None:
        output = f"{component}-{arch}{'-tiny' if scale == 'tiny' else ''}.onnx"
    check_output_file(output, "-o", create_parents=True, protect=[weights])  # before torch is even imported
    from edgefc.models.export import export_component

    path = export_component(component, arch, output, weights=weights, height=height, width=width,
                            scale=scale, seed=seed, progress=True, exporter=exporter, opset=opset)
    click.echo(str(path))
