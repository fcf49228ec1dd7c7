"""Stable Diffusion inputs for calibration and held-out checks (paper Sec. 4.2), per component.

Registered with the core (:mod:`edgefc.model_inputs`) when ``edgefc.models`` is imported, so the
quantize pass gets them by the component's name without importing the models. numpy only.

* U-Net: standard-normal latents, timesteps stratified over [0, 999] with both ends included (the
  time embedding's range must be seen: ``periodic-arguments`` in
  :mod:`edgefc.passes.quant_policy`), and a text-embedding-like context (:func:`clip_like_context`);
  its one-element ``timestep`` is also an input whose whole domain (0..999) calibration enumerates.
* text encoder: CLIP token ids (BOS, random tokens, EOS, EOS padding).
* VAE decoder: latents as diffusers' ``decode`` receives them (standard normal divided by the SD
  scaling factor 0.18215).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from edgefc.model_inputs import InputSpec, index_bound, register_component_inputs

VAE_SCALING = 0.18215
#: CLIP's special tokens (SD v1 tokenizer); a smaller vocabulary uses its last two ids.
CLIP_BOS, CLIP_EOS = 49406, 49407
CLIP_VOCAB = 49408
TIMESTEPS = 1000  # the SD noise schedule's training steps: timesteps 0..999


def clip_like_context(rng: np.random.Generator, shape: tuple[int, ...], eos: int | None = None) -> np.ndarray:
    """A text-embedding-like context [B, 77, D] with CLIP-like statistics.

    CLIP's last hidden state is layer-normalised per token, with per-channel scales and offsets
    shared by every prompt, a few outlier channels, a begin-of-text row that is nearly the same for
    every prompt and larger than the rest, and padding rows after the end-of-text token that are
    near copies of one another. The model-level statistics (channel scales, offsets, outliers, the
    BOS row) come from a fixed seed so every sample shares them; the tokens vary with ``rng``.
    """
    *lead, length, dim = shape
    model = np.random.default_rng(7)
    scale = np.exp(0.25 * model.standard_normal(dim))
    offset = 0.3 * model.standard_normal(dim)
    outliers = model.choice(dim, size=min(2, dim), replace=False)
    scale[outliers] *= 8.0
    bos = 3.0 * model.standard_normal(dim)
    x = rng.standard_normal((*lead, length, dim)) * scale + offset
    x[..., 0, :] = bos + 0.05 * rng.standard_normal((*lead, dim))
    e = int(eos if eos is not None else rng.integers(5, max(6, length // 2)))
    if e + 1 < length:
        pad = x[..., e, :][..., None, :]
        x[..., e + 1:, :] = pad + 0.1 * scale * rng.standard_normal((*lead, length - e - 1, dim))
    return x.astype(np.float32)


def token_ids(rng: np.random.Generator, shape: tuple[int, ...], vocab: int) -> np.ndarray:
    """CLIP-style ids: BOS, random tokens, EOS at a random position, EOS padding."""
    bos, eos = (CLIP_BOS, CLIP_EOS) if vocab > CLIP_EOS else (vocab - 2, vocab - 1)
    *lead, length = shape
    ids = rng.integers(0, min(bos, 49405), size=shape)
    end = int(rng.integers(2, max(3, length)))
    ids[..., 0] = bos
    ids[..., end:] = eos
    return ids


def timesteps_spanning(n: int, rng: np.random.Generator | None, low: int = 0, high: int = TIMESTEPS - 1) -> list[int]:
    """``n`` timesteps covering [low, high]: both ends, and (with ``rng``) one random step in each
    of the ``n - 2`` equal strata between them, else evenly spaced."""
    if n <= 0:
        return []
    if n == 1:
        return [high]
    if rng is None:
        return [int(round(v)) for v in np.linspace(low, high, n)]
    edges = np.linspace(low, high, n - 1)
    inner = [int(rng.integers(math.ceil(edges[i]), max(math.ceil(edges[i]) + 1, int(edges[i + 1]))))
             for i in range(n - 2)]
    return [low, *inner, high]


def unet_inputs(graph: gs.Graph, specs: list[InputSpec], n: int, rng: np.random.Generator, evenly: bool):
    steps = timesteps_spanning(n, None if evenly else rng)

    def fill(i: int, s: InputSpec, rng: np.random.Generator):
        if s.name == "timestep":
            return np.full(s.shape, steps[i], dtype=s.dtype)
        if s.name == "encoder_hidden_states":
            return clip_like_context(rng, s.shape).astype(s.dtype)
        return None

    return fill, ({"timesteps": steps} if steps else {})


def unet_timestep_domain(graph: gs.Graph) -> tuple[str, list[int]] | None:
    """The U-Net's one-element ``timestep``: every diffusion step 0..999."""
    for t in graph.inputs:
        if t.name == "timestep" and t.shape is not None and int(np.prod(t.shape)) == 1:
            return t.name, list(range(TIMESTEPS))
    return None


def text_encoder_inputs(graph: gs.Graph, specs: list[InputSpec], n: int, rng: np.random.Generator, evenly: bool):
    vocab = index_bound(graph, "input_ids") or CLIP_VOCAB

    def fill(i: int, s: InputSpec, rng: np.random.Generator):
        return token_ids(rng, s.shape, vocab).astype(s.dtype) if s.name == "input_ids" else None

    return fill, {}


def vae_decoder_inputs(graph: gs.Graph, specs: list[InputSpec], n: int, rng: np.random.Generator, evenly: bool):
    def fill(i: int, s: InputSpec, rng: np.random.Generator):
        if s.name == "latent_sample":
            return (rng.standard_normal(s.shape) / VAE_SCALING).astype(s.dtype)
        return None

    return fill, {}


register_component_inputs("unet", unet_inputs, unet_timestep_domain)
register_component_inputs("text-encoder", text_encoder_inputs)
register_component_inputs("vae-decoder", vae_decoder_inputs)
