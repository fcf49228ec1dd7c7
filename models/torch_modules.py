"""The Stable Diffusion components as torch modules, ready to export (paper Sec. 2: the text
encoder, the BK-SDM U-Net, the VAE decoder).

:func:`build_model` builds a component from its config (:mod:`edgefc.models.configs`) with seeded
random weights (normalisation layers and constant parameters perturbed, so a pass that drops a
scale cannot go unnoticed), or loads it from a local diffusers folder (``unet/``,
``text_encoder/``, ``vae/`` as ``save_pretrained`` writes them; never from the network), and
wraps it in a module whose ``forward`` takes and returns the export's tensors; with example
inputs of the export shapes. ``models/export.py`` writes them to ONNX.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from edgefc.errors import ExportError
from edgefc.models import configs

#: Subfolder of a diffusers pipeline folder holding each component.
WEIGHTS_SUBFOLDER = {"text-encoder": "text_encoder", "unet": "unet", "vae-decoder": "vae"}



def import_backends():
    """Import torch, diffusers and transformers, or explain how to install them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    missing = []
    mods = {}
    for name in ("torch", "diffusers", "transformers"):
        try:
            mods[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if not missing:  # their own warnings would add lines around our one-line errors
        mods["diffusers"].utils.logging.set_verbosity_error()
        mods["transformers"].utils.logging.set_verbosity_error()
    if missing:
        raise ExportError(
            f"exporting needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            "installed; install the companion with: pip install 'edgefc[models]'"
        )
    return mods["torch"], mods["diffusers"], mods["transformers"]


def resolve_size(component: str, arch: str, scale: str, height: int | None, width: int | None) -> tuple[int, int]:
    """Apply the per-scale default image size and check it fits the component's downsampling."""
    default = configs.DEFAULT_IMAGE_SIZE[scale]
    height = default if height is None else int(height)
    width = default if width is None else int(width)
    if component == "text-encoder":
        return height, width
    multiple = configs.spatial_multiple(component, arch, scale)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            why = ("the VAE works on 8x8-pixel latents" if component == "vae-decoder" else
                   f"the {arch} U-Net downsamples the 1/8 latent "
                   f"{len(configs.get_config(component, arch, scale)['down_block_types']) - 1} times")
            raise ExportError(f"--{name} {value} is not a positive multiple of {multiple} ({why}).")
    return height, width


def check_weights(component: str, weights: str | os.PathLike | None) -> Path | None:
    """The component's subfolder of a local diffusers folder; an ExportError if it is not there."""
    if weights is None:
        return None
    root = Path(weights).expanduser()
    if not root.is_dir():
        raise ExportError(f"weights folder {str(root)!r} does not exist or is not a folder.")
    sub = root / WEIGHTS_SUBFOLDER[component]
    if not (sub / "config.json").is_file():
        raise ExportError(
            f"weights folder {str(root)!r} has no {WEIGHTS_SUBFOLDER[component]}/config.json "
            f"(expected a diffusers pipeline folder with {WEIGHTS_SUBFOLDER[component]}/ in it)."
        )
    return sub


def _randomize_norms(torch, model) -> None:
    """Give normalisation layers random affine parameters (default init is 1 / 0), and perturb
    any other parameter that starts as a constant.

    With ones and zeros a pass that swapped or dropped the scale or bias would still match
    onnxruntime; the exporter would also merge the identical tensors into one initializer.
    """
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, norm_types) and getattr(module, "weight", None) is not None:
                module.weight.copy_(1.0 + 0.1 * torch.randn_like(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn_like(module.bias))
        # Other constant tensors (CLIP's Linear biases start at zero): identical values would also
        # be merged by the exporter, sharing one initializer between unrelated layers.
        for param in model.parameters():
            if param.numel() > 1 and bool((param == param.reshape(-1)[0]).all()):
                param.add_(0.02 * torch.randn_like(param))


def build_model(component: str, arch: str, *, weights=None, height: int | None = None, width: int | None = None,
                scale: str = "full", seed: int = 0):
    """Build the export wrapper module and its example inputs.

    Returns ``(module, inputs)``: ``module(*inputs)`` returns the outputs named in
    :data:`edgefc.models.export.OUTPUT_NAMES`; ``inputs`` are seeded random example inputs with the export shapes.
    Random weights come from ``torch.manual_seed(seed)``, so two calls with the same arguments
    build identical models (tests rely on this to compare torch and onnxruntime outputs).
    """
    configs.get_config(component, arch, scale)  # validates the names
    if weights is not None and scale != "full":
        raise ExportError("--scale tiny builds random weights and cannot be combined with --weights.")
    sub = check_weights(component, weights)
    height, width = resolve_size(component, arch, scale, height, width)
    torch, diffusers, transformers = import_backends()

    torch.manual_seed(seed)
    if component == "unet":
        if sub is None:
            model = diffusers.UNet2DConditionModel(**configs.get_config(component, arch, scale))
        else:
            model = _load(sub, lambda: diffusers.UNet2DConditionModel.from_pretrained(
                str(sub), local_files_only=True, torch_dtype=torch.float32))
        if sub is not None:
            _check_loaded_unet(model.config, arch, sub, height, width)
        cross = model.config.cross_attention_dim
        lh, lw = configs.latent_size(height, width)
        inputs = (
            torch.randn(1, model.config.in_channels, lh, lw),
            torch.tensor([int(torch.randint(1, 1000, ()))], dtype=torch.int64),
            torch.randn(1, configs.TEXT_LENGTH, cross),
        )

        class Wrapper(torch.nn.Module):
            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def forward(self, sample, timestep, encoder_hidden_states):
                return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    elif component == "text-encoder":
        if sub is None:
            config = transformers.CLIPTextConfig(**configs.get_config(component, arch, scale))
            config._attn_implementation = "eager"
            model = transformers.CLIPTextModel(config)
        else:
            model = _load(sub, lambda: transformers.CLIPTextModel.from_pretrained(
                str(sub), local_files_only=True, torch_dtype=torch.float32, attn_implementation="eager"))
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (1, configs.TEXT_LENGTH), dtype=torch.int64)
        ids[0, 0] = model.config.bos_token_id if model.config.bos_token_id is not None else 0
        ids[0, 20] = vocab - 1  # the end-of-text token is the highest id: the pooler takes argmax
        inputs = (ids,)

        class Wrapper(torch.nn.Module):
            def __init__(self, text_encoder):
                super().__init__()
                self.text_encoder = text_encoder

            def forward(self, input_ids):
                out = self.text_encoder(input_ids, return_dict=True)
                return out.last_hidden_state, out.pooler_output

    else:  # vae-decoder
        if sub is None:
            model = diffusers.AutoencoderKL(**configs.get_config(component, arch, scale))
        else:
            model = _load(sub, lambda: diffusers.AutoencoderKL.from_pretrained(
                str(sub), local_files_only=True, torch_dtype=torch.float32))
        lh, lw = configs.latent_size(height, width)
        inputs = (torch.randn(1, model.config.latent_channels, lh, lw),)

        class Wrapper(torch.nn.Module):
            def __init__(self, vae):
                super().__init__()
                self.post_quant_conv = vae.post_quant_conv
                self.decoder = vae.decoder
                self.use_post_quant_conv = getattr(vae.config, "use_post_quant_conv", True)

            def forward(self, latent_sample):
                z = self.post_quant_conv(latent_sample) if self.use_post_quant_conv else latent_sample
                return self.decoder(z)

    if sub is None:
        _randomize_norms(torch, model)
    wrapper = Wrapper(model).eval()
    return wrapper, inputs


def _check_loaded_unet(config, arch: str, sub: Path, height: int, width: int) -> None:
    """A loaded U-Net must divide the image size; say so if it is not the ``--arch`` topology."""
    multiple = 8 * 2 ** (len(config.down_block_types) - 1)
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise ExportError(f"--{name} {value} is not a multiple of {multiple}, which the U-Net in "
                              f"{str(sub)!r} needs ({len(config.down_block_types)} down blocks).")
    want = configs.get_config("unet", arch)
    if (list(config.down_block_types) != want["down_block_types"]
            or config.mid_block_type != want["mid_block_type"]):
        print(f"warning: the U-Net in {str(sub)!r} ({len(config.down_block_types)} down blocks, mid block "
              f"{config.mid_block_type or 'none'}) does not have the {arch} topology; exporting it as it is.",
              file=sys.stderr)


def _load(sub: Path, loader):
    """Run a from_pretrained call; a broken folder is the user's error, in one sentence."""
    import diffusers
    import transformers

    levels = [lib.utils.logging.get_verbosity() for lib in (diffusers, transformers)]
    try:
        # diffusers logs an error line of its own before raising; ours is the one line shown
        diffusers.utils.logging.set_verbosity(50)
        transformers.utils.logging.set_verbosity(50)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return loader()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.removeprefix("Error ").rstrip(".")
        raise ExportError(f"cannot load weights from {str(sub)!r}: {first}.") from None
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])
