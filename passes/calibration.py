"""Calibration data for pass ``quantize``: which inputs, how many (paper Sec. 4.2).

Generated inputs come from the core's :func:`edgefc.model_inputs.generate`, which uses the
component's own generator where ``edgefc.models`` registered one (U-Net latents, timesteps and a
CLIP-like context; CLIP token ids; VAE latents: :mod:`edgefc.models.calib_inputs`) and generic
seeded inputs otherwise; held-out inputs for the SQNR come from the same generators with another
seed (:data:`HELDOUT_SEED`). :func:`load_npz` reads ``--calib FILE.npz`` (one array per model
input, named like it, with an optional leading sample axis). The statistics computed on them:
:mod:`edgefc.passes.calib_stats`; the range observers: :mod:`edgefc.passes.observers`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.errors import QuantizationError
from edgefc.model_inputs import InputSpec, input_domain, input_specs
from edgefc.model_inputs import generate as generate_inputs

CALIB_SEED = 1234
HELDOUT_SEED = 98765
METHODS = ("minmax", "percentile", "mse")


#: default calibration / held-out sample counts per component (chosen for a few minutes on two
#: cores at full size: one U-Net forward is ~3 s, one 512x512 VAE decoder forward ~40-80 s).
DEFAULT_CALIB_SAMPLES = {"unet": 8, "text-encoder": 8, "vae-decoder": 1, None: 4}
DEFAULT_EVAL_SAMPLES = {"unet": 8, "text-encoder": 8, "vae-decoder": 2, None: 4}


def static_specs(graph: gs.Graph) -> list[InputSpec]:
    """The model's inputs, each with a static shape (else one-line QuantizationError)."""
    specs = input_specs(graph)
    for s in specs:
        if not s.static:
            raise QuantizationError(f"input '{s.name}' has no static shape; run canonicalize (or give --shape) first")
    return specs


def generate(graph: gs.Graph, component: str | None, n: int, seed: int, *, evenly: bool = False) -> tuple[list[dict], dict]:
    """``n`` seeded input dicts for ``component`` (or generic random inputs) and a description."""
    return generate_inputs(graph, component, n, seed, evenly=evenly, specs=static_specs(graph))


def enumerable_input(graph: gs.Graph, component: str | None) -> tuple[str, list[int]] | None:
    """An input whose whole domain calibration can enumerate (the U-Net's timestep, 0..999)."""
    return input_domain(graph, component)


def load_npz(path: str | os.PathLike, graph: gs.Graph, n: int | None = None) -> tuple[list[dict], dict]:
    """Calibration inputs from ``--calib FILE.npz``: one array per model input, named like the
    input, shaped like it or with a leading sample axis ([N, *shape]); every input needed."""
    path = Path(path)
    if not path.is_file():
        raise QuantizationError(f"calibration file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / pickle / format errors: one sentence
        raise QuantizationError(f"{path} is not a readable .npz file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    specs = static_specs(graph)
    names = [s.name for s in specs]
    missing = [s for s in names if s not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unknown {', '.join(extra)}")
        raise QuantizationError(f"{path} does not match the model's inputs ({'; '.join(parts)}): "
                                f"it needs arrays named {', '.join(names)}")
    counts = {}
    for s in specs:
        a = arrays[s.name]
        if tuple(a.shape) == s.shape:
            a = a[None]
        if tuple(a.shape[1:]) != s.shape:
            raise QuantizationError(f"{path}: array '{s.name}' has shape {list(a.shape)}, the input needs "
                                    f"{list(s.shape)} or [N, {', '.join(map(str, s.shape))}]")
        if np.issubdtype(s.dtype, np.integer) != np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_ != (s.dtype == np.bool_):
            raise QuantizationError(f"{path}: array '{s.name}' is {a.dtype}, the input is {s.dtype}")
        arrays[s.name] = a.astype(s.dtype, copy=False)
        counts[s.name] = a.shape[0]
    if len(set(counts.values())) != 1:
        raise QuantizationError(f"{path}: the arrays hold different numbers of samples "
                                f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    total = next(iter(counts.values()))
    if total == 0:
        raise QuantizationError(f"{path} holds no samples")
    use = total if n is None else min(n, total)
    samples = [{k: arrays[k][i] for k in names} for i in range(use)]
    return samples, {"source": str(path), "samples": use, "available": total}

