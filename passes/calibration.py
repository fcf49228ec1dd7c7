"""Calibration and evaluation data for pass ``quantize``: which inputs, how many (paper Sec. 4.2).

Ranges come from the calibration inputs; the quality figures (:mod:`edgefc.passes.quant_eval`)
from evaluation inputs that calibration never saw, chosen by :func:`choose_inputs`:

* ``--eval FILE.npz`` (source ``"eval"``): held-out real inputs, e.g. ``CALIB/unet.eval.npz`` that
  ``edgefc calibrate`` records from prompts disjoint from the calibration prompts;
* else, with ``--calib FILE.npz``, its last quarter (at least one sample; source
  ``"calib-heldout"``), which is then not used for ranges;
* else generated inputs with another seed than calibration (source ``"generated"``: not a
  measurement on real data).

A ``.npz`` may also hold, for an input ``X``, an array ``unconditional:X`` (one sample, shaped like
the input or ``[1, *shape]``): the value of ``X`` that means "no conditioning" - the empty prompt's
text embedding for the U-Net's ``encoder_hidden_states``, recorded by ``edgefc calibrate`` - from
which the evaluation measures the conditioning ratio.

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
from edgefc.passes.quant_eval import EvalInputs

CALIB_SEED = 1234
HELDOUT_SEED = 98765
METHODS = ("minmax", "percentile", "mse")


#: default calibration / held-out sample counts per component (chosen for a few minutes on two
#: cores at full size: one U-Net forward is ~3 s, one 512x512 VAE decoder forward ~40-80 s).
DEFAULT_CALIB_SAMPLES = {"unet": 8, "text-encoder": 8, "vae-decoder": 1, None: 4}
DEFAULT_EVAL_SAMPLES = {"unet": 8, "text-encoder": 8, "vae-decoder": 2, None: 4}
#: most evaluation inputs taken from a file (``--eval``, held-out ``--calib``) unless
#: ``--eval-samples`` says otherwise: every one up to this (a full-size U-Net input costs ~2 x 4 s
#: to evaluate, a 512x512 VAE decoder input ~2 x 60 s).
EVAL_FILE_CAP = {"unet": 64, "text-encoder": 64, "vae-decoder": 4, None: 64}
#: the part of ``--calib`` held out for evaluation when no ``--eval`` is given.
HELDOUT_FRACTION = 0.25
#: key prefix of an input's unconditional value in a ``.npz`` (module docstring).
UNCONDITIONAL = "unconditional:"


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


def load_npz(path: str | os.PathLike, graph: gs.Graph, n: int | None = None, *, what: str = "calibration"
             ) -> tuple[list[dict], dict]:
    """Inputs from ``--calib FILE.npz`` (or ``--eval``): one array per model input, named like the
    input, shaped like it or with a leading sample axis ([N, *shape]); every input needed. The
    description's ``unconditional`` holds the ``unconditional:X`` arrays (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise QuantizationError(f"{what} file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / pickle / format errors: one sentence
        raise QuantizationError(f"{path} is not a readable .npz file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    specs = static_specs(graph)
    names = [s.name for s in specs]
    uncond = {k[len(UNCONDITIONAL):]: arrays.pop(k) for k in list(arrays) if k.startswith(UNCONDITIONAL)}
    missing = [s for s in names if s not in arrays]
    extra = [k for k in arrays if k not in names] + [UNCONDITIONAL + k for k in uncond if k not in names]
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
    for s in specs:
        if s.name in uncond:
            u = uncond[s.name]
            if tuple(u.shape) == (1, *s.shape):
                u = u[0]
            if tuple(u.shape) != s.shape:
                raise QuantizationError(f"{path}: array '{UNCONDITIONAL}{s.name}' has shape {list(u.shape)}, the input "
                                        f"needs {list(s.shape)}")
            uncond[s.name] = u.astype(s.dtype, copy=False)
    use = total if n is None else min(n, total)
    samples = [{k: arrays[k][i] for k in names} for i in range(use)]
    return samples, {"source": str(path), "samples": use, "available": total, "unconditional": uncond}


def choose_inputs(graph: gs.Graph, component: str | None, *, calib=None, eval_file=None,
                  calib_samples: int | None = None, eval_samples: int | None = None
                  ) -> tuple[list[dict], dict, EvalInputs]:
    """Calibration inputs, their description, and the :class:`EvalInputs` a build is measured on
    (module docstring: ``--eval``, else the held-out end of ``--calib``, else generated). The two
    never share a sample. ``calib_samples`` / ``eval_samples`` cap how many are used."""
    n_gen = calib_samples or DEFAULT_CALIB_SAMPLES.get(component, DEFAULT_CALIB_SAMPLES[None])
    cap = eval_samples if eval_samples is not None else EVAL_FILE_CAP.get(component, EVAL_FILE_CAP[None])
    note = None
    if calib:
        samples, info = load_npz(calib, graph, None)
        uncond = info.pop("unconditional")
        total = len(samples)
        if eval_file is None and total >= 2:
            hold = max(1, int(total * HELDOUT_FRACTION))
            held, samples = samples[total - hold:], samples[:total - hold]
            info["held_out_for_eval"] = hold
            evals = EvalInputs(held[:cap], "calib-heldout",
                               {"file": str(calib), "first": total - hold, "available": hold}, uncond)
        elif eval_file is None:
            note = f"{calib} holds one sample: nothing to hold out for evaluation"
        if calib_samples is not None:
            samples = samples[:calib_samples]
        info["samples"] = len(samples)
    else:
        samples, info = generate(graph, component, n_gen, CALIB_SEED)
    if eval_file is not None:
        held, einfo = load_npz(eval_file, graph, None, what="evaluation")
        uncond = einfo.pop("unconditional")
        evals = EvalInputs(held[:cap], "eval", {"file": str(eval_file), "available": len(held)}, uncond)
    elif not calib or note:
        n = eval_samples if eval_samples is not None else DEFAULT_EVAL_SAMPLES.get(component, 4)
        held, einfo = generate(graph, component, n, HELDOUT_SEED, evenly=True)
        evals = EvalInputs(held, "generated", {k: v for k, v in einfo.items() if k not in ("source", "samples")})
        if note:
            evals.info["reason"] = note
    return samples, info, evals

