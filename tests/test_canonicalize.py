"""canonicalize on the tiny exports: numerics unchanged, static shapes, and TVM Relax imports the result."""

from __future__ import annotations

import numpy as np
import pytest

import edgefc
from edgefc import ir, ort

COMPONENTS = ("text-encoder", "unet", "vae-decoder")


@pytest.fixture(scope="module")
def canonical(tiny_models):
    """component -> (original path, canonicalized graph)."""
    return {c: (p, edgefc.PassManager(["canonicalize"]).run(edgefc.load(p))) for c, p in tiny_models.items()}


@pytest.mark.parametrize("component", COMPONENTS)
def test_canonicalize_keeps_outputs(canonical, component):
    path, graph = canonical[component]
    feeds = ort.random_inputs(graph, seed=3)
    ort.check(ort.run(str(path), feeds), ort.run(ir.to_model(graph), feeds), 1e-5)


@pytest.mark.parametrize("component", COMPONENTS)
def test_canonicalize_leaves_static_shapes_and_no_noops(canonical, component):
    _, graph = canonical[component]
    assert graph.opset == 23
    dynamic = [t.name for t in graph.tensors().values() if ir.static_shape(t) is None]
    assert not dynamic, dynamic[:5]
    assert not [n for n in graph.nodes if n.op in ("Identity", "Shape", "ConstantOfShape")]


def test_canonicalize_is_idempotent(canonical):
    _, graph = canonical["unet"]
    before = [(n.op, [t.name for t in n.inputs]) for n in graph.nodes]
    again = edgefc.PassManager(["canonicalize"]).run(graph)
    assert [(n.op, [t.name for t in n.inputs]) for n in again.nodes] == before


def test_canonical_tiny_unet_builds_with_tvm_and_matches_onnxruntime(canonical):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    _, graph = canonical["unet"]
    model = ir.to_model(graph)
    feeds = ort.random_inputs(graph, seed=4)
    ref = ort.run(model, feeds)
    mod = from_onnx(model, keep_params_in_input=False)
    mod = relax.transform.LegalizeOps()(relax.transform.DecomposeOpsForInference()(mod))
    exe = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[t.name]) for t in graph.inputs])
    got = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    ort.check(ref, {graph.outputs[0].name: got}, 1e-4)
    assert np.isfinite(got).all()
