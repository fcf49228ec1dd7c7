"""``edgefc eval``: score generated images against their prompts with the deterministic verifier.

The work is in :mod:`edgefc.models.verifier` (numpy + PIL, no torch): per-attribute and mean
text-alignment accuracy (our CLIP-score analogue) and, with ``--reference``, the Fréchet distance
of verifier features between the images and real held-out images (our FID analogue).
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("eval")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Folder of real images (e.g. held-out `edgefc data synth` output) for the Fréchet distance.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON (per image too).")
def eval_cmd(folder, reference, as_json):
    """Score FOLDER's NAME.png images against the prompts in NAME.txt beside them.

    \b
    edgefc data synth -o heldout --count 64 --seed 1
    edgefc eval heldout                       # the data's own captions: 1.000
    edgefc eval samples/ --reference heldout  # generated images, with the Fréchet distance
    """
    from edgefc.models.verifier import evaluate_folder, format_result, to_json

    result = evaluate_folder(folder, reference)
    click.echo(to_json(result) if as_json else format_result(result))
