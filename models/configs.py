"""Model configurations for the exported components (plain data: no torch import).

Every config here is the keyword set of the diffusers / transformers class that builds it:

* U-Net: ``diffusers.UNet2DConditionModel(**config)``
* text encoder: ``transformers.CLIPTextModel(CLIPTextConfig(**config))``
* VAE: ``diffusers.AutoencoderKL(**config)`` (only the decoder path is exported)

Two scales per component. ``full`` is the published model (parameter counts in
shared/PAPER_FIGURES.md: BK-SDM-Tiny U-Net 323.4 M, SD-v1.5 U-Net 859.5 M, CLIP ViT-L/14 text
encoder 123.1 M, SD VAE decoder 49.5 M). ``tiny`` keeps the topology -- the same block types,
the same number of transformer blocks / attentions / layers, no mid block for BK-SDM-Tiny --
with small widths, so tests can export and run all of it in seconds and count the same
attention blocks as the full model (:func:`expected_attention_count`).
"""

from __future__ import annotations

import copy

COMPONENTS = ("text-encoder", "unet", "vae-decoder")
#: Names of the components in messages.
LABELS = {"text-encoder": "text encoder", "unet": "U-Net", "vae-decoder": "VAE decoder"}
ARCHS = ("bk-sdm-tiny", "sd-v1.5")
SCALES = ("full", "tiny")

#: Default image size (pixels, square) per scale; the latent is 1/8 of it.
DEFAULT_IMAGE_SIZE = {"full": 512, "tiny": 64}

#: Fixed text length of the CLIP tokenizer used by Stable Diffusion.
TEXT_LENGTH = 77

# --- U-Net -------------------------------------------------------------------------------------

# SD-v1.5 U-Net: the model card's unet/config.json (runwayml/stable-diffusion-v1-5, now
# stable-diffusion-v1-5/stable-diffusion-v1-5 on the Hugging Face Hub, diffusers 0.17 format).
# `attention_head_dim: 8` is, for the SD-v1 U-Net, the number of heads (diffusers keeps the old
# misnomer): 8 heads of 40/80/160 channels. 859.52 M parameters.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}

# BK-SDM-Tiny U-Net: Nota BK-SDM repo (github.com/Nota-NetsPresso/BK-SDM),
# src/unet_config/bk_tiny/config.json. The SD-v1 U-Net with the innermost stage (the
# DownBlock2D / UpBlock2D pair at 1280 channels) and the mid block removed and one ResNet +
# transformer per down stage (two per up stage). 323.38 M parameters.
BK_SDM_TINY_UNET = {
    **SD15_UNET,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "mid_block_type": None,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 1,
}

# Tiny scale: widths / 10 (rounded to a multiple of the norm groups), 2 heads, 8 norm groups;
# cross_attention_dim matches the tiny text encoder's hidden size so the tiny components chain.
_TINY_UNET = {
    "norm_num_groups": 8,
    "attention_head_dim": 2,
    "cross_attention_dim": 64,
}
SD15_UNET_TINY = {**SD15_UNET, **_TINY_UNET, "block_out_channels": [32, 64, 64, 64], "sample_size": 8}
BK_SDM_TINY_UNET_TINY = {**BK_SDM_TINY_UNET, **_TINY_UNET, "block_out_channels": [32, 64, 64], "sample_size": 8}

# --- Text encoder ------------------------------------------------------------------------------

# CLIP ViT-L/14 text encoder (openai/clip-vit-large-patch14), as in the SD-v1.5 model card's
# text_encoder/config.json. BK-SDM keeps SD-v1.5's text encoder unchanged, so both archs share
# it. 123.06 M parameters.
CLIP_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": TEXT_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}
# Tiny scale: all 12 layers kept (12 attentions), hidden 64 in 4 heads. The vocabulary stays at
# 49,408 so the real CLIP tokenizer's ids are valid inputs.
CLIP_TEXT_TINY = {
    **CLIP_TEXT,
    "hidden_size": 64,
    "intermediate_size": 256,
    "projection_dim": 64,
    "num_attention_heads": 4,
}

# --- VAE ---------------------------------------------------------------------------------------

# SD VAE (AutoencoderKL, the SD-v1.5 model card's vae/config.json, shared by BK-SDM).
# Decoder + post_quant_conv: 49.49 M parameters.
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# Tiny scale: same blocks and layers (one mid-block self-attention), widths 16-32, 8 groups.
SD_VAE_TINY = {**SD_VAE, "block_out_channels": [16, 16, 32, 32], "norm_num_groups": 8, "sample_size": 64}

_CONFIGS = {
    ("unet", "bk-sdm-tiny", "full"): BK_SDM_TINY_UNET,
    ("unet", "bk-sdm-tiny", "tiny"): BK_SDM_TINY_UNET_TINY,
    ("unet", "sd-v1.5", "full"): SD15_UNET,
    ("unet", "sd-v1.5", "tiny"): SD15_UNET_TINY,
}
for _arch in ARCHS:
    for _scale, _te, _vae in (("full", CLIP_TEXT, SD_VAE), ("tiny", CLIP_TEXT_TINY, SD_VAE_TINY)):
        _CONFIGS[("text-encoder", _arch, _scale)] = _te
        _CONFIGS[("vae-decoder", _arch, _scale)] = _vae

#: Published parameter counts (shared/PAPER_FIGURES.md) of the full-scale exports.
PAPER_PARAMETERS = {
    ("unet", "bk-sdm-tiny"): 323.4e6,
    ("unet", "sd-v1.5"): 859.5e6,
    ("text-encoder", "bk-sdm-tiny"): 123.1e6,
    ("text-encoder", "sd-v1.5"): 123.1e6,
    ("vae-decoder", "bk-sdm-tiny"): 49.5e6,
    ("vae-decoder", "sd-v1.5"): 49.5e6,
}


def _check(component: str, arch: str, scale: str) -> None:
    for value, allowed, what in ((component, COMPONENTS, "component"), (arch, ARCHS, "arch"),
                                 (scale, SCALES, "scale")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def get_config(component: str, arch: str, scale: str = "full") -> dict:
    """The constructor keywords of ``component`` for ``arch`` at ``scale`` (a fresh copy)."""
    _check(component, arch, scale)
    return copy.deepcopy(_CONFIGS[(component, arch, scale)])


def unet_attention_layout(config: dict) -> list[tuple[str, int]]:
    """Transformer blocks of a UNet2DConditionModel config, in execution order.

    Returns ``(where, count)`` per block that has transformers: ``("down0", n)``, ...,
    ``("mid", n)``, ``("up1", n)``, ... with ``n`` the number of Transformer2DModels in it
    (one per ResNet; each holds a self-attention and a cross-attention).
    """
    layers = config.get("layers_per_block", 2)
    per_block = config.get("transformer_layers_per_block", 1)
    if not isinstance(per_block, int):
        raise TypeError("per-block transformer_layers_per_block lists are not supported")
    layout = []
    for i, kind in enumerate(config["down_block_types"]):
        if "CrossAttn" in kind:
            layout.append((f"down{i}", layers * per_block))
    if config.get("mid_block_type") == "UNetMidBlock2DCrossAttn":
        layout.append(("mid", per_block))
    for i, kind in enumerate(config["up_block_types"]):
        if "CrossAttn" in kind:
            layout.append((f"up{i}", (layers + 1) * per_block))
    return layout


def expected_transformer_blocks(component: str, arch: str, scale: str = "full") -> int:
    """Number of transformer blocks (U-Net Transformer2D blocks / CLIP encoder layers /
    VAE mid-block attentions), counted from the config."""
    config = get_config(component, arch, scale)
    if component == "unet":
        return sum(n for _, n in unet_attention_layout(config))
    if component == "text-encoder":
        return config["num_hidden_layers"]
    return 1 if config.get("mid_block_add_attention", True) else 0


def expected_attention_count(component: str, arch: str, scale: str = "full") -> int:
    """Number of attention operations (one Softmax each in the exported ONNX), from the config.

    U-Net: two per transformer block (self + cross): 18 for bk-sdm-tiny, 32 for sd-v1.5.
    Text encoder: one causal self-attention per layer (12). VAE decoder: the mid block's one
    self-attention.
    """
    blocks = expected_transformer_blocks(component, arch, scale)
    return 2 * blocks if component == "unet" else blocks


def spatial_multiple(component: str, arch: str, scale: str = "full") -> int:
    """The image height/width must be a multiple of this (pixels).

    8 for the VAE decoder (one latent pixel per 8x8 image pixels); for the U-Net also every
    downsampling stage must divide evenly: 8 * 2**(number of down blocks - 1).
    """
    config = get_config(component, arch, scale)
    if component == "unet":
        return 8 * 2 ** (len(config["down_block_types"]) - 1)
    if component == "vae-decoder":
        return 8
    return 1


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Latent height and width for an image size (the VAE scales by 8)."""
    return height // 8, width // 8


def text_hidden_size(arch: str, scale: str = "full") -> int:
    """Width of the text encoder's output (= the U-Net's cross_attention_dim)."""
    return get_config("text-encoder", arch, scale)["hidden_size"]


def describe(component: str, arch: str, scale: str = "full") -> str:
    """One line: what is built, for progress messages."""
    config = get_config(component, arch, scale)
    if component == "unet":
        return (f"UNet2DConditionModel channels {config['block_out_channels']}, "
                f"{expected_transformer_blocks(component, arch, scale)} transformer blocks, "
                f"mid block {config['mid_block_type'] or 'none'}")
    if component == "text-encoder":
        return (f"CLIPTextModel hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
                f"{config['num_attention_heads']} heads")
    return f"AutoencoderKL decoder channels {config['block_out_channels']}"

