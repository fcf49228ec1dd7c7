"""Where a node belongs in the model, for the Program's and the profile's grouping: the
component (:func:`component_of`: unet / text-encoder / vae-decoder, from the graph's input names)
and the block (:func:`block_of`: e.g. ``down_blocks.0/attentions.0``, from the exporter's scope
names), the rows of ``edgefc profile``'s per-block table.
"""

from __future__ import annotations

import re

import onnx_graphsurgeon as gs

from edgefc.components import detect_component


def component_of(graph: gs.Graph) -> str:
    """unet / text-encoder / vae-decoder from the input names (edgefc.components), else "model"."""
    return detect_component(t.name for t in graph.inputs) or "model"


_INDEXED = re.compile(r"^[A-Za-z_]+\.\d+$")
_WRAPPERS = {"unet", "text_encoder", "vae", "vae_decoder", "model", "module"}
_CONTAINERS = {"encoder", "decoder", "text_model"}


def block_of(name: str) -> str:
    """The model block a node belongs to, from its (exporter-given) scope name, e.g.
    ``/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/MatMul`` -> ``down_blocks.0/attentions.0``,
    ``/text_encoder/encoder/layers.3/mlp/fc1/MatMul`` -> ``encoder/layers.3``,
    ``/decoder/up_blocks.3/resnets.0/conv1/Conv`` -> ``decoder/up_blocks.3/resnets.0``."""
    parts = [p for p in name.strip("/").split("/") if p][:-1]   # the scopes, without the op's own name
    while parts and parts[0] in _WRAPPERS:
        parts = parts[1:]
    keep: list[str] = []
    indexed = 0
    for p in parts:
        is_idx = bool(_INDEXED.match(p))
        if keep and not is_idx and (indexed or keep[-1] not in _CONTAINERS):
            break
        keep.append(p)
        indexed += is_idx
        if indexed == 2:
            break
    return "/".join(keep) or "(top)"
