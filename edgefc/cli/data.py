"""``edgefc data curate`` (deduplicate, size-filter and square-crop an image/caption dataset) and
``edgefc data synth`` (render attribute-controlled synthetic image/caption pairs).

The work is in :mod:`edgefc.models.train.curate` and :mod:`edgefc.models.synth` (numpy + PIL, no
torch). Progress goes to stderr; a one-line summary to stdout; the full record is DST/manifest.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgefc.models.train.curate import CROP_SCORERS  # numpy + PIL only

CROP_CHOICES = tuple(CROP_SCORERS)


@click.group("data")
def data_group():
    """Prepare training data for ``edgefc train`` (curate real pairs, or synthesize them)."""


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
    from edgefc.staging import check_output_folder

    check_output_folder(dst, "-o")
    m = curate(src, dst, min_size=min_size, threshold=dedup_threshold, crop=crop, progress=not quiet)
    c = m["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("input", "kept"))
    click.echo(f"{dst}: kept {c['kept']} of {c['input']}" + (f" (dropped: {dropped})" if dropped else ""))


@data_group.command("synth")
@click.option("-o", "--output", "dst", type=click.Path(path_type=Path), required=True,
              help="Output folder (must not exist or be empty): NNNNNN.png + NNNNNN.txt pairs, manifest.json and "
                   "tokenizer/ (a CLIP tokenizer with one token per caption word, for `train --tokenizer`).")
@click.option("--count", type=int, default=1000, show_default=True, help="Number of image/caption pairs.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels (a multiple of 8).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Data set seed: the same seed, count, size and level give the same bytes.")
@click.option("--level", type=click.IntRange(1, 3), default=1, show_default=True,
              help="Difficulty: 1 = one object (shape, colour, quadrant) on a background; 2 = also a size "
                   "(small/large); 3 = two objects in different quadrants.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth_cmd(dst, count, size, seed, level, quiet):
    """Render COUNT synthetic scenes with captions written from their attributes (paper Sec. 2.2)."""
    from tqdm import tqdm

    from edgefc.models.synth import synthesize
    from edgefc.staging import check_output_folder

    check_output_folder(dst, "-o")

    bars = []  # opened on the first image, so a refused run prints only its error line

    def progress(i):
        if not bars:
            bars.append(tqdm(total=count, desc="synth", unit="img", file=sys.stderr))
        bars[0].update(1)

    m = synthesize(dst, count, size=size, seed=seed, level=level, progress=None if quiet else progress)
    for bar in bars:
        bar.close()
    click.echo(f"{dst}: {m['count']} pairs ({m['size']}x{m['size']}, level {m['level']}, seed {m['seed']})")
