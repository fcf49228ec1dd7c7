"""Export the Stable Diffusion components (text encoder, U-Net, VAE decoder) to ONNX.

``export_component`` builds a model (:func:`edgefc.models.torch_modules.build_model`: from its
config with seeded random weights, or from a local diffusers folder; never from the network)
and writes a static-shape, batch-1 ONNX model with one of torch's two ONNX exporters (``exporter``):

* ``torchscript`` (the default): ``torch.onnx.export(..., dynamo=False)``, opset 17 unless told
  otherwise, constant folding on. The project's figures (fusion counts, cost-model tables,
  quantization SQNR, the acceptance caches) were measured on this form, it exports the full
  U-Net about 2.5x faster and needs no onnxscript, so it stays the default while torch ships it;
* ``dynamo``: ``torch.onnx.export(..., dynamo=True)``, torch's own default since 2.9 (opset 18+
  by default; a lower ``opset`` goes through onnx's version converter). Its graphs differ
  (SDPA with the scale split across Q and K, ``[B*H, S, d]`` detours, ``Gelu`` as one op), and
  every fusion matches them (fusion by the math, see ``passes/fuse_attention.py``).

The components:

* text-encoder: ``input_ids`` int64 [1, 77] -> ``last_hidden_state`` f32 [1, 77, D],
  ``pooler_output`` f32 [1, D]
* unet: ``sample`` f32 [1, 4, H/8, W/8], ``timestep`` int64 [1],
  ``encoder_hidden_states`` f32 [1, 77, D] -> ``out_sample`` f32 [1, 4, H/8, W/8]
* vae-decoder: ``latent_sample`` f32 [1, 4, H/8, W/8] -> ``sample`` f32 [1, 3, H, W]
  (``post_quant_conv`` + decoder; the latent is taken as already divided by the scaling
  factor, as in diffusers' ``AutoencoderKL.decode``)

Models over 2 GB (the SD-v1.5 U-Net) are written with all weights in one external data file
``<output>.data`` beside the model. The output appears only when complete: everything is written
into a temporary folder next to it and renamed into place.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from edgefc.errors import ExportError
from edgefc.models import configs
from edgefc.models.torch_modules import (
    WEIGHTS_SUBFOLDER,
    build_model,
    check_weights,
    import_backends,
    resolve_size,
)

__all__ = ["DEFAULT_EXPORTER", "EXPORTERS", "INPUT_NAMES", "OPSET", "OUTPUT_NAMES", "WEIGHTS_SUBFOLDER", "build_model",
           "check_weights", "count_parameters", "export_component", "resolve_size"]

OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
DYNAMO_MIN_OPSET = 18
#: models above this size are written with their weights in ``<output>.data`` (protobuf's 2 GB limit)
EXTERNAL_DATA_BYTES = 1 << 31

INPUT_NAMES = {
    "text-encoder": ["input_ids"],
    "unet": ["sample", "timestep", "encoder_hidden_states"],
    "vae-decoder": ["latent_sample"],
}
OUTPUT_NAMES = {
    "text-encoder": ["last_hidden_state", "pooler_output"],
    "unet": ["out_sample"],
    "vae-decoder": ["sample"],
}
def _echo(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def count_parameters(path: str | os.PathLike) -> int:
    """Sum of the element counts of a model's initializers (external data is not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        n = 1
        for d in tensor.dims:
            n *= d
        total += n
    return total


def _consolidate_external_data(onnx_path: Path, data_name: str) -> bool:
    """Gather the per-tensor files the TorchScript exporter writes for a >2 GB model into one file.

    Streams tensor by tensor (never holds the weights in memory) and rewrites the model's
    external-data entries to point at ``data_name`` beside the model. Returns whether the model
    has external data.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    folder = onnx_path.parent
    if [p for p in folder.iterdir() if p != onnx_path] == []:
        return False  # the exporter wrote one self-contained file (under 2 GB)
    model = onnx.load(str(onnx_path), load_external_data=False)
    tensors = [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not tensors:
        return False
    offset = 0
    old_files = set()
    with open(folder / data_name, "wb") as out:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            src = folder / info.location
            old_files.add(src)
            with open(src, "rb") as f:
                if info.offset:
                    f.seek(info.offset)
                data = f.read(info.length) if info.length else f.read()
            pad = (-offset) % 4096  # page-aligned, so the data file can be memory-mapped
            out.write(b"\0" * pad)
            offset += pad
            out.write(data)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(data)
    onnx.save(model, str(onnx_path))
    for f in old_files:
        if f.name != data_name:
            f.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def _quiet(torch):
    """Silence the tracer's and the deprecated exporter's warnings (expected for static export)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_dynamo(torch, module, inputs, path: Path, component: str, opset: int | None, external: bool) -> None:
    """torch's default exporter (torch.export + onnxscript); its messages go to stderr only."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("--exporter dynamo needs onnxscript: pip install onnxscript") from None
    kwargs = {"opset_version": opset} if opset else {}
    with _quiet(torch), torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        try:
            torch.onnx.export(module, inputs, str(path), dynamo=True, external_data=external,
                              input_names=INPUT_NAMES[component], output_names=OUTPUT_NAMES[component],
                              verbose=False, **kwargs)
        except Exception as e:  # torch.export / onnxscript failures: the user's torch setup, one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"the dynamo exporter failed ({type(e).__name__}: {first}); "
                              f"try --exporter torchscript") from None


def export_component(component: str, arch: str, output: str | os.PathLike, *, weights=None,
                     height: int | None = None, width: int | None = None, scale: str = "full",
                     seed: int = 0, progress: bool = True, exporter: str = DEFAULT_EXPORTER,
                     opset: int | None = None) -> Path:
    """Export one component to ``output`` (ONNX, static shapes, batch 1) with ``exporter``
    (``torchscript``: opset 17 by default; ``dynamo``: torch's default opset).

    ``height``/``width`` default to 512 at ``scale="full"`` and 64 at ``scale="tiny"``.
    Returns the written path. Raises :class:`~edgefc.errors.ExportError` for bad arguments,
    a missing weights folder/subfolder, or missing torch/diffusers/transformers.
    """
    try:
        configs.get_config(component, arch, scale)
    except ValueError as e:
        raise ExportError(f"{e}.") from None
    output = Path(output).expanduser()
    if output.suffix != ".onnx":
        raise ExportError(f"output {str(output)!r} must end in .onnx.")
    if output.is_dir():
        raise ExportError(f"output {str(output)!r} is a folder; give a file name ending in .onnx.")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r} (choose from {', '.join(EXPORTERS)}).")
    if opset is not None and not 7 <= int(opset) <= 23:
        raise ExportError(f"--opset {opset} is outside 7..23.")
    if exporter == "dynamo" and opset is not None and int(opset) < DYNAMO_MIN_OPSET:
        # torch 2.13 down-converts with onnx's version converter and writes e.g. Split(num_outputs)
        # into an opset-17 model, which the ONNX checker rejects
        raise ExportError(f"the dynamo exporter writes valid models from opset {DYNAMO_MIN_OPSET} on; "
                          f"for opset {opset} use --exporter torchscript.")
    height, width = resolve_size(component, arch, scale, height, width)
    check_weights(component, weights)
    if weights is not None and scale != "full":
        raise ExportError("--scale tiny builds random weights and cannot be combined with --weights.")
    torch, _, _ = import_backends()
    parent = output.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise ExportError(f"cannot write in output folder {str(parent)!r}: {e.strerror or e}.") from None
    try:
        return _export_into(component, arch, output, tmpdir, torch, weights=weights, height=height,
                            width=width, scale=scale, seed=seed, progress=progress, exporter=exporter,
                            opset=opset)
    except OSError as e:
        raise ExportError(f"cannot write {str(output)!r}: {e.strerror or e}.") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if not output.exists():
            for folder in created:  # folders made for an output that never came (innermost first)
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _export_into(component, arch, output: Path, tmpdir: Path, torch, *, weights, height, width, scale, seed,
                 progress, exporter: str = DEFAULT_EXPORTER, opset: int | None = None) -> Path:
    """Build, export into ``tmpdir``, check, and move the result to ``output``."""
    parent = output.parent
    t0 = time.perf_counter()
    source = f"weights from {weights}" if weights is not None else f"random weights, seed {seed}"
    _echo(progress, f"[1/3] build {component} {arch} ({scale} scale, {source}): "
                    f"{configs.describe(component, arch, scale) if weights is None else 'diffusers folder'}")
    with _quiet(torch):
        module, inputs = build_model(component, arch, weights=weights, height=height, width=width,
                                     scale=scale, seed=seed)
    n_params = sum(p.numel() for p in module.parameters())
    shapes = ", ".join(f"{n} {list(x.shape)}" for n, x in zip(INPUT_NAMES[component], inputs))
    _echo(progress, f"      {n_params / 1e6:.1f} M parameters, inputs {shapes} "
                    f"[{time.perf_counter() - t0:.1f} s]")

    tmp_onnx = tmpdir / output.name
    data_name = output.name + ".data"
    t1 = time.perf_counter()
    if exporter == "dynamo":
        _echo(progress, f"[2/3] export to ONNX (dynamo exporter, opset {opset or 'default'}) ...")
        big = sum(p.numel() * p.element_size() for p in module.parameters()) >= EXTERNAL_DATA_BYTES
        _export_dynamo(torch, module, inputs, tmp_onnx, component, opset, big)
    else:
        _echo(progress, f"[2/3] trace and export to ONNX (TorchScript exporter, opset {opset or OPSET}) ...")
        with _quiet(torch), torch.no_grad():
            torch.onnx.export(
                module, inputs, str(tmp_onnx),
                input_names=INPUT_NAMES[component], output_names=OUTPUT_NAMES[component],
                opset_version=opset or OPSET, dynamo=False, do_constant_folding=True,
            )
    del module, inputs
    gc.collect()
    _echo(progress, f"      done [{time.perf_counter() - t1:.1f} s]")

    t2 = time.perf_counter()
    if exporter == "dynamo":  # one self-contained file, or the model and <output>.data already
        external = (tmpdir / data_name).exists()
    else:
        external = _consolidate_external_data(tmp_onnx, data_name)
    import onnx

    onnx.checker.check_model(str(tmp_onnx))  # by path: never loads the external data
    final_params = count_parameters(tmp_onnx)
    size = sum(f.stat().st_size for f in tmpdir.iterdir())
    _echo(progress, f"[3/3] save {output}{' + ' + data_name if external else ''} "
                    f"({size / 2**20:.1f} MiB, {final_params / 1e6:.1f} M parameters)")
    # data first, then the model: whoever sees the .onnx finds its data
    if external:
        os.replace(tmpdir / data_name, parent / data_name)
    os.replace(tmp_onnx, output)
    if not external:
        (parent / data_name).unlink(missing_ok=True)  # stale data of an earlier large export
    _echo(progress, f"      done [{time.perf_counter() - t2:.1f} s], total {time.perf_counter() - t0:.1f} s")
    return output
