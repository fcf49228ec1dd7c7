"""The export cache of ``edgefc generate`` without ``--build`` (split out of
:mod:`edgefc.models.pipeline`): each model set is exported once into
``$EDGEFC_CACHE/<arch>-<scale>-<H>x<W>/`` (default ``~/.cache/edgefc/models``;
``weights-<hash>-<H>x<W>/`` for a local weights folder) and reused by later runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from edgefc.models.configs import COMPONENTS, LABELS


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def cache_root() -> Path:
    """``$EDGEFC_CACHE`` if set, else ``~/.cache/edgefc/models``."""
    env = os.environ.get("EDGEFC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgefc" / "models"


def _weights_key(weights: Path) -> str:
    """Short hash of a weights folder's path and its files' sizes and times (a changed folder re-exports)."""
    h = hashlib.sha1(str(weights.resolve()).encode())
    for sub in ("text_encoder", "unet", "vae"):
        for f in sorted((weights / sub).glob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{sub}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def export_dir(arch: str, scale: str, height: int, width: int, weights: Path | None = None) -> Path:
    """The cache folder of one exported model set."""
    name = f"weights-{_weights_key(weights)}" if weights is not None else f"{arch}-{scale}"
    return cache_root() / f"{name}-{height}x{width}"


def ensure_exports(arch: str, scale: str, height: int, width: int, weights: Path | None = None,
                   progress: bool = True) -> dict[str, Path]:
    """Component -> exported ONNX in the cache, exporting what is not there yet."""
    from edgefc.models.export import export_component

    folder = export_dir(arch, scale, height, width, weights)
    paths = {}
    for component in COMPONENTS:
        path = folder / f"{component}.onnx"
        if not path.is_file():
            _say(progress, f"exporting {LABELS[component]} once into the cache: {path}")
            export_component(component, arch, path, weights=weights, height=height, width=width,
                             scale=scale, seed=0, progress=progress)
        paths[component] = path
    return paths

