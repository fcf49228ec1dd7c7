"""What optimum-onnx writes, compiled by edgefc: fusion counts and the error against the export.

Many users export diffusers pipelines with Hugging Face's optimum-onnx (``optimum-cli export onnx
--task text-to-image``), not with torch directly. optimum-onnx pins transformers < 4.58, so it
cannot live in edgefc's environment: this script runs in two steps, in two environments.

1. With a Python that has optimum-onnx (a separate venv)::

       python -m venv /tmp/venv-optimum
       /tmp/venv-optimum/bin/pip install torch==2.13.0 optimum-onnx diffusers onnxruntime
       /tmp/venv-optimum/bin/python bench/optimum_export.py export OUT

   builds a random-weight Stable Diffusion pipeline in the BK-SDM-Tiny layout (``--scale tiny``
   by default: the project's tiny configs, seed 0; ``--scale full`` for the full-size one), saves it
   as a diffusers folder (with a byte-level CLIP vocabulary, since no tokenizer can be downloaded)
   and exports it with ``optimum.exporters.onnx.main_export(task="text-to-image")`` to OUT/onnx/.

2. With edgefc's environment::

       python bench/optimum_export.py check OUT

   compiles each exported component with the target-free pipeline and ``verify=True`` (every
   pass checked against onnxruntime), fixing optimum's dynamic axes with ``shapes=`` (as
   ``--shape`` does on the command line), and prints per component the attentions and group norms
   fused, what is left of Softmax / Erf / InstanceNormalization, and the strict comparator's
   error of the compiled graph against the export on seeded random inputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


def _project_module(name: str):
    """``models/NAME.py`` loaded by path: configs.py and tokenizer.py need only numpy, so the
    export step runs in optimum's venv without edgefc or its dependencies."""
    spec = importlib.util.spec_from_file_location(f"edgefc_{name}", ROOT / "models" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _configs(scale: str) -> dict:
    """The project's model configs of the BK-SDM-Tiny components at ``scale``."""
    configs = _project_module("configs")
    return {c: configs.get_config(c, "bk-sdm-tiny", scale) for c in ("unet", "text-encoder", "vae-decoder")}


def export(out: Path, scale: str) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from optimum.exporters.onnx import main_export
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = {k: {n: v for n, v in c.items() if not n.startswith("_")} for k, c in _configs(scale).items()}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae-decoder"])
    text = CLIPTextModel(CLIPTextConfig(**cfg["text-encoder"]))
    # CLIP's byte-level BPE with no merges (every byte its own token, CLIP's ids: what edgefc's
    # no-download fallback emits), written by the project's own tokenizer module
    tok_dir = _project_module("tokenizer").write_word_tokenizer(out / "tokenizer-files", [])
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline")
    main_export(str(out / "pipeline"), output=str(out / "onnx"), task="text-to-image", device="cpu")
    for c in COMPONENTS:
        p = out / "onnx" / c / "model.onnx"
        print(f"{p}  {p.stat().st_size / 1e6:.1f} MB")


def _shapes(scale: str) -> dict[str, dict[str, tuple]]:
    side = 64 if scale == "full" else 8          # latent side: 512 px full, 64 px tiny
    width = _configs(scale)["text-encoder"]["hidden_size"]
    return {"text_encoder": {"input_ids": (1, 77)},
            "unet": {"sample": (1, 4, side, side), "timestep": (), "encoder_hidden_states": (1, 77, width)},
            "vae_decoder": {"latent_sample": (1, 4, side, side)}}


def check(out: Path, scale: str) -> int:
    import numpy as np
    import onnx

    import edgefc
    from edgefc import ir, ort

    bad = 0
    print(f"{'component':<13} {'opset':>5} {'attention':>9} {'groupnorm':>9} {'layernorm':>9}  {'left':<24} {'max rel err':>11}")
    for comp, shapes in _shapes(scale).items():
        path = out / "onnx" / comp / "model.onnx"
        if not path.is_file():
            sys.exit(f"{path}: missing; run `bench/optimum_export.py export {out}` with optimum-onnx first")
        opset = next(o.version for o in onnx.load(path, load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx"))
        result = edgefc.compile(path, None, shapes={k: v for k, v in shapes.items() if v}, verify=True)
        ops = Counter(n.op for n in result.graph.nodes)
        rng = np.random.default_rng(0)
        feeds = {}
        for name, shape in shapes.items():
            if name == "input_ids":
                feeds[name] = rng.integers(0, 400, shape).astype(np.int64)
            elif name == "timestep":
                feeds[name] = np.array(500.0, np.float32)
            else:
                feeds[name] = rng.standard_normal(shape).astype(np.float32)
        diff = ort.compare(ort.run(str(path), feeds), ort.run(ir.to_model(result.graph), feeds))
        left = {o: ops[o] for o in ("Softmax", "Erf", "InstanceNormalization") if ops[o]}
        ok = diff.reason == "" and diff.rel_error <= 1e-4 and not left
        bad += not ok
        print(f"{comp:<13} {opset!s:>5} {ops['Attention']:>9} {ops['GroupNormalization'] + ops['GroupNormSiLU']:>9} "
              f"{ops['LayerNormalization']:>9}  {json.dumps(left) if left else '-':<24} "
              f"{diff.rel_error:>11.2e}{'' if ok else '  ' + (diff.reason or 'OFF')}")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("export", "check"), help="export: with optimum-onnx; check: with edgefc")
    ap.add_argument("out", type=Path, help="working folder (pipeline/, onnx/)")
    ap.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    args = ap.parse_args(argv)
    if args.step == "export":
        export(args.out, args.scale)
        return 0
    return check(args.out, args.scale)


if __name__ == "__main__":
    sys.exit(main())
