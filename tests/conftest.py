"""Shared pytest fixtures (session-scoped, cached)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]


def _export_cache(tmp_path_factory) -> Path:
    """Folder for the tiny exports: $EDGEFC_TEST_CACHE/<key> (kept between runs) or a pytest tmp dir.

    The key hashes the export code and configs, so a change to them never reuses stale models.
    """
    root = os.environ.get("EDGEFC_TEST_CACHE")
    if not root:
        return tmp_path_factory.mktemp("tiny-models")
    h = hashlib.sha1()
    for name in ("configs.py", "export.py"):
        h.update((_ROOT / "models" / name).read_bytes())
    folder = Path(root) / h.hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _tiny_export(folder: Path, component: str, arch: str, exporter: str = "torchscript") -> Path:
    """The export (cached): made with torch, so a test that needs one skips when torch is not
    installed and the cache does not hold it (the compiler itself never needs torch)."""
    path = folder / f"{component}-{arch}-tiny{'' if exporter == 'torchscript' else '-' + exporter}.onnx"
    if not path.is_file():
        pytest.importorskip("torch", reason="exporting a tiny model needs torch (the models extra)")
        if exporter == "dynamo":
            pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript")
        from edgefc.models.export import export_component

        export_component(component, arch, path, scale="tiny", progress=False, exporter=exporter)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny-scale bk-sdm-tiny exports (64x64 image, 8x8 latent, seed 0): component -> .onnx path.

    Components: "text-encoder", "unet", "vae-decoder" (the configs are
    ``edgefc.models.configs.get_config(component, "bk-sdm-tiny", "tiny")``).
    """
    folder = _export_cache(tmp_path_factory)
    return {c: _tiny_export(folder, c, "bk-sdm-tiny") for c in ("text-encoder", "unet", "vae-decoder")}


@pytest.fixture(scope="session")
def tiny_dynamo(tmp_path_factory) -> dict[str, Path]:
    """The same tiny bk-sdm-tiny components through torch's default exporter (``--exporter dynamo``)."""
    folder = _export_cache(tmp_path_factory)
    return {c: _tiny_export(folder, c, "bk-sdm-tiny", "dynamo") for c in ("text-encoder", "unet", "vae-decoder")}


@pytest.fixture(scope="session")
def tiny_sd15_unet(tmp_path_factory) -> Path:
    """Tiny-scale SD-v1.5 U-Net export (with mid block; 64x64 image, 8x8 latent, seed 0)."""
    return _tiny_export(_export_cache(tmp_path_factory), "unet", "sd-v1.5")
