"""Compiled build folders for ``edgefc generate --build``: which build is which component, and
whether the three chain (split out of :mod:`edgefc.models.pipeline`; layout in its docstring).

A build folder holds ``model.onnx`` and ``report.json``; a folder of builds holds one per
component, found by name (``DIR/text-encoder``, ``DIR/unet``, ``DIR/vae-decoder``) or by the
inputs each build takes (:func:`edgefc.components.detect_component`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgefc.components import SIGNATURES, detect_component
from edgefc.errors import BuildError
from edgefc.models.configs import COMPONENTS


def _onnx_inputs(path: Path) -> dict[str, tuple[list[int], str]]:
    """Real graph inputs of an ONNX file: name -> (shape, numpy dtype name); weights are not read."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a broken build file
        raise BuildError(f"cannot read {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    init = {t.name for t in model.graph.initializer}
    out = {}
    for i in model.graph.input:
        if i.name in init:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        out[i.name] = (shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name)
    return out


def build_inputs(build: Path) -> dict[str, list[int]]:
    """Input name -> shape of a build folder: from ``report.json`` ``inputs``, else ``model.onnx``."""
    report = build / "report.json"
    if report.is_file():
        try:
            data = json.loads(report.read_text())
            inputs = {i["name"]: list(i.get("shape") or []) for i in data.get("inputs") or []}
            if inputs:
                return inputs
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable report: the model itself still says what it takes
    return {name: shape for name, (shape, _) in _onnx_inputs(build / "model.onnx").items()}


def find_builds(build_dir: str | os.PathLike) -> dict[str, Path]:
    """Component -> build folder inside ``build_dir`` (see the module docstring for the layout).

    Raises :class:`~edgefc.errors.BuildError` when ``build_dir`` is missing, a component has no
    build, or two unnamed builds claim the same component.
    """
    root = Path(build_dir).expanduser()
    if not root.is_dir():
        raise BuildError(f"build folder {str(root)!r} does not exist or is not a folder.")
    found: dict[str, Path] = {}
    for component in COMPONENTS:
        sub = root / component
        if (sub / "model.onnx").is_file():
            kind = detect_component(build_inputs(sub))
            if kind != component:
                raise BuildError(f"build {str(sub)!r} is named {component} but its inputs "
                                 f"{sorted(build_inputs(sub))} are not a {component}'s.")
            found[component] = sub
    for sub in sorted(p for p in root.iterdir()
                      if p.is_dir() and p.name not in COMPONENTS and not p.name.startswith(".")):  # not staging
        if not (sub / "model.onnx").is_file():
            continue
        kind = detect_component(build_inputs(sub))
        if kind is None or kind in found and found[kind].name == kind:
            continue  # a named build of that component wins
        if kind in found:
            raise BuildError(f"build folder {str(root)!r} has two {kind} builds ({found[kind].name}, {sub.name}); "
                             f"name the one to use {kind}/.")
        found[kind] = sub
    missing = [c for c in COMPONENTS if c not in found]
    if missing:
        c = missing[0]
        raise BuildError(f"build folder {str(root)!r} has no {c} build (expected {c}/model.onnx, or a build "
                         f"whose inputs are {', '.join(sorted(dict(SIGNATURES)[c]))}).")
    return found



def _build_shapes(builds: dict[str, Path]) -> tuple[int, int]:
    """Image size implied by the builds; checks that the three builds chain."""
    shapes = {c: build_inputs(b) for c, b in builds.items()}
    sample = shapes["unet"]["sample"]
    latent = shapes["vae-decoder"]["latent_sample"]
    ehs = shapes["unet"]["encoder_hidden_states"]
    ids = shapes["text-encoder"]["input_ids"]
    for name, shape, rank in (("unet sample", sample, 4), ("vae-decoder latent_sample", latent, 4),
                              ("unet encoder_hidden_states", ehs, 3), ("text-encoder input_ids", ids, 2)):
        if len(shape) != rank or any(d is None or d <= 0 for d in shape):
            raise BuildError(f"the {name} input of the build has no static shape ({shape}); "
                             "compile the exported model (static shapes) instead.")
    if list(sample[2:]) != list(latent[2:]):
        raise BuildError(f"the U-Net build's latent {sample[2]}x{sample[3]} does not match the VAE decoder build's "
                         f"{latent[2]}x{latent[3]}; compile both for the same image size.")
    if ids[1] != ehs[1]:
        raise BuildError(f"the text encoder build takes {ids[1]} tokens but the U-Net build expects {ehs[1]}.")
    return sample[2] * 8, sample[3] * 8

