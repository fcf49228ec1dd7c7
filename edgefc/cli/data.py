"""``edgefc data curate``: deduplicate, size-filter and square-crop an image/caption dataset.

The work is in :mod:`edgefc.models.train.curate` (numpy + PIL, no torch). Progress goes to
stderr; a one-line summary to stdout; the full record is DST/manifest.json.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgefc.models.train.curate import CROP_SCORERS  # numpy + PIL only

CROP_CHOICES = tuple(CROP_SCORERS)


@click.group("data")
def data_group():
    """Prepare training data for ``edgefc train``."""


@data_group.command("curate")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "dst", type=click.Path(path_type=Path), required=True,
              help="Output folder (must not exist or be empty): cropped pairs + manifest.json.")
@click.option("--min-size", type=int, default=300, show_default=True,
              help="Drop images whose short side is under this many pixels.")
@click.option("--dedup-threshold", type=int, default=10, show_default=True,
              help="Near duplicates: 64-bit DCT pHash Hamming distance at most this (0: identical hashes only). "
                   "Exact pixel duplicates are always dropped.")
@click.option("--crop", type=click.Choice(CROP_CHOICES), default="saliency", show_default=True,
              help="Score that picks the square crop among the centre and the two ends of the long side: "
                   "spectral-residual saliency, gradient energy, or always the centre.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def curate_cmd(src, dst, min_size, dedup_threshold, crop, quiet):
    """Curate SRC (a folder of NAME.jpg/png + NAME.txt pairs or a webdataset .tar shard) into -o DST."""
    from edgefc.models.train.curate import curate

    m = curate(src, dst, min_size=min_size, threshold=dedup_threshold, crop=crop, progress=not quiet)
    c = m["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("input", "kept"))
    click.echo(f"{dst}: kept {c['kept']} of {c['input']}" + (f" (dropped: {dropped})" if dropped else ""))
