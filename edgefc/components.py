"""Which Stable Diffusion component a graph is, told from its input names (the export contract).

One rule for every stage that needs it: ``quantize --precision auto`` (FP16 or W8A16), the cost
model's labels and ``edgefc generate``'s build-folder detection.
"""

from __future__ import annotations

from collections.abc import Iterable

#: component -> the input names that identify it, in the order they are tried.
SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("unet", frozenset({"sample", "timestep", "encoder_hidden_states"})),
    ("text-encoder", frozenset({"input_ids"})),
    ("vae-decoder", frozenset({"latent_sample"})),
)


def detect_component(input_names: Iterable[str]) -> str | None:
    """``unet`` / ``text-encoder`` / ``vae-decoder`` from a model's input names; None if none matches."""
    names = set(input_names)
    for component, needed in SIGNATURES:
        if needed <= names:
            return component
    return None
