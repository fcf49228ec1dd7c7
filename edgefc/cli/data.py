"""``edgefc data curate`` (deduplicate, size-filter, square-crop, and with the verifier drop contradicted
pairs or re-caption an image/caption dataset), ``edgefc data synth`` (render attribute-controlled
synthetic image/caption pairs, clean or with crawl-like defects) and ``edgefc data agreement`` (the
verifier's measure of how well a training set's captions describe its images).

The work is in :mod:`edgefc.models.train.curate` and :mod:`edgefc.models.synth` (numpy + PIL, no
torch). Progress goes to stderr; a one-line summary to stdout; the full record is DST/manifest.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgefc.models.train.curate import CAPTION_CROPS, CROP_SCORERS  # numpy + PIL only

CROP_CHOICES = (*CROP_SCORERS, *CAPTION_CROPS)


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
              help="Near duplicates: DCT pHash Hamming distance (of --hash-bits) at most this (0: identical hashes "
                   "only). Exact pixel duplicates are always dropped.")
@click.option("--hash-bits", type=click.Choice(["64", "256"]), default="64", show_default=True,
              help="Perceptual hash length: 64 (classic pHash) or 256 (16x16 DCT of a 64x64 image: also sees shifts of a "
                   "few pixels, for simple images such as the synthetic scenes, whose distinct renders 64 bits merge).")
@click.option("--no-dedup", is_flag=True,
              help="Keep duplicates (skip the deduplication step), e.g. to curate a set only by --drop-contradicted.")
@click.option("--crop", type=click.Choice(CROP_CHOICES), default="saliency", show_default=True,
              help="Score that picks the square crop among the centre and the two ends of the long side: "
                   "spectral-residual saliency, gradient energy, always the centre, or alignment: the crop "
                   "whose verifier reading agrees most with the caption (synthetic scenes; saliency breaks ties).")
@click.option("--drop-contradicted", is_flag=True,
              help="Drop pairs whose caption the verifier contradicts on the cropped image (a stated attribute "
                   "read otherwise, or an object that is not there): the paper's manual curation (synt-cur). "
                   "Synthetic scenes only.")
@click.option("--recaption", is_flag=True,
              help="Replace every caption by one written from the verifier's reading of the cropped image (the "
                   "paper's re-captioned L-pps); the old caption stays in manifest.json. Synthetic scenes only.")
@click.option("--level", type=click.IntRange(1, 3), default=1, show_default=True,
              help="Attributes the verifier scores and writes (as data synth --level): sizes from 2 on.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def curate_cmd(src, dst, min_size, dedup_threshold, hash_bits, no_dedup, crop, drop_contradicted, recaption, level, quiet):
    """Curate SRC (a folder of NAME.jpg/png + NAME.txt pairs or a webdataset .tar shard) into -o DST.

    \b
    Steps, in order: drop images under --min-size; drop exact and near duplicates (unless
    --no-dedup); crop each to a square (--crop); drop contradicted pairs (--drop-contradicted);
    re-caption (--recaption).
    """
    from edgefc.models.train.curate import curate
    from edgefc.staging import check_output_folder

    check_output_folder(dst, "-o")
    m = curate(src, dst, min_size=min_size, threshold=dedup_threshold, crop=crop, progress=not quiet,
               drop_contradicted=drop_contradicted, recaption=recaption, level=level, dedup=not no_dedup,
               hash_bits=int(hash_bits))
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
@click.option("--wrong-caption", type=float, default=0.0, show_default=True, metavar="RATE",
              help="Crawl-like defect: fraction of pairs captioned with another scene's caption.")
@click.option("--wrong-attribute", type=float, default=0.0, show_default=True, metavar="RATE",
              help="Fraction of pairs whose caption has one attribute changed (a text-to-image generator that "
                   "missed part of its prompt: the paper's synthetic data).")
@click.option("--missing-attributes", type=float, default=0.0, show_default=True, metavar="RATE",
              help="Fraction of captions leaving out some of position, background, colour, shape ('a red circle').")
@click.option("--boilerplate", type=float, default=0.0, show_default=True, metavar="RATE",
              help="Fraction of captions that state nothing ('click to enlarge', 'img 4821'). The four caption "
                   "rates add up to at most 1 (one caption defect per pair).")
@click.option("--near-duplicates", type=float, default=0.0, show_default=True, metavar="RATE",
              help="Fraction of pairs that are near copies (a small colour offset) of a few 'popular' images of "
                   "the set, each copied about 4 times.")
@click.option("--cut-crop", type=float, default=0.0, show_default=True, metavar="RATE",
              help="Fraction of images on a 2:1 canvas with the scene at one end: the training loader's centre "
                   "square cuts the subject or moves it (data curate's crop choice picks the end).")
@click.option("--small", type=float, default=0.0, show_default=True, metavar="RATE",
              help="Fraction of images stored at a quarter of --size (training upscales them; data curate "
                   "--min-size drops them).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth_cmd(dst, count, size, seed, level, quiet, **rates):
    """Render COUNT synthetic scenes with captions written from their attributes (paper Sec. 2.2).

    \b
    The defect rates make a crawl-like set (the paper's L-orig; issue 23); each pair's defects
    are listed in manifest.json, and `edgefc data agreement DIR` measures what they cost.
    """
    from tqdm import tqdm

    from edgefc.models.synth import Defects, synthesize
    from edgefc.staging import check_output_folder

    check_output_folder(dst, "-o")

    bars = []  # opened on the first image, so a refused run prints only its error line

    def progress(i):
        if not bars:
            bars.append(tqdm(total=count, desc="synth", unit="img", file=sys.stderr))
        bars[0].update(1)

    m = synthesize(dst, count, size=size, seed=seed, level=level, progress=None if quiet else progress,
                   defects=Defects(**rates))
    for bar in bars:
        bar.close()
    line = f"{dst}: {m['count']} pairs ({m['size']}x{m['size']}, level {m['level']}, seed {m['seed']})"
    if "defects" in m:
        line += " with defects: " + ", ".join(f"{k} {v}" for k, v in sorted(m["defects"]["counts"].items()))
    click.echo(line)


@data_group.command("agreement")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--resolution", type=int, default=64, show_default=True,
              help="Score each image as the training loader sees it: short side resized to this, centre square "
                   "(0: as stored).")
@click.option("--level", type=click.IntRange(1, 3), default=None,
              help="Attributes scored (as data synth --level; sizes from 2 on). Default: manifest.json's level, "
                   "else 1.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON (with per-pair scores).")
def agreement_cmd(data, resolution, level, as_json):
    """How well the captions of a training set describe its images (the verifier; synthetic scenes).

    \b
    Every attribute an image has (its background; shape, colour, position of every object read,
    and size from level 2 on) counts: stated with the value read back is right, left out or stated
    otherwise is not. 1.000 for `data synth` without defects. Also the fraction of pairs whose
    caption the verifier contradicts (what `data curate --drop-contradicted` drops).
    \b
    edgefc data agreement crawl/        # e.g. 0.55 for a crawl-like set
    """
    import json

    from edgefc.models.train.curate import data_agreement
    from edgefc.models.train.errors import DataError

    if resolution < 0 or (resolution and resolution % 8):
        raise DataError(f"--resolution {resolution} must be 0 or a positive multiple of 8.")
    r = data_agreement(data, resolution or None, level)
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return
    attrs = ", ".join(f"{k} {v:.3f}" for k, v in r["per_attribute"].items())
    click.echo(f"{data}: {r['count']} pairs: caption agreement {r['agreement']:.3f} ({attrs}); "
               f"contradicted {r['contradicted']:.3f}")
