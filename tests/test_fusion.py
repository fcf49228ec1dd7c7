"""Operator fusion (the ``fuse`` pass and its parts) on the tiny exports and on small torch modules.

Counts come from the model configs, numerics from onnxruntime on the unfused model.
"""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnx.inliner
import pytest

import edgefc
from edgefc import functions, ir, ort
from edgefc.models import configs
from edgefc.pass_base import PassContext
from edgefc.passes.fusion import ORDER

TINY = [("unet", "bk-sdm-tiny"), ("text-encoder", "bk-sdm-tiny"), ("vae-decoder", "bk-sdm-tiny"), ("unet", "sd-v1.5")]
FUSED_LEFTOVERS = ("Softmax", "InstanceNormalization", "Erf")


def _ops(graph) -> collections.Counter:
    return collections.Counter(n.op for n in graph.nodes)


def _canonical(path):
    return edgefc.PassManager(["canonicalize"]).run(edgefc.load(path), PassContext())


@pytest.fixture(scope="module")
def tiny(tiny_models, tiny_sd15_unet):
    """(component, arch) -> dict(path, canonical graph, fused graph, report)."""
    paths = {**{(c, "bk-sdm-tiny"): p for c, p in tiny_models.items()}, ("unet", "sd-v1.5"): tiny_sd15_unet}
    out = {}
    for key in TINY:
        ctx = PassContext()
        canonical = _canonical(paths[key])
        fused = edgefc.PassManager(["fuse"]).run(canonical.copy(), ctx)
        out[key] = {"path": paths[key], "canonical": canonical, "fused": fused, "report": ctx.report}
    return out


@pytest.mark.parametrize("key", TINY, ids=lambda k: "-".join(k))
def test_every_attention_and_groupnorm_is_fused(tiny, key):
    component, arch = key
    t = tiny[key]
    ops, canonical = _ops(t["fused"]), _ops(t["canonical"])
    want = configs.expected_attention_count(component, arch, "tiny")
    assert canonical["Softmax"] == want  # the export has what the config says
    assert sum(c for op, c in ops.items() if "attention" in op.lower()) == want
    assert ops["Attention"] == want and t["report"]["fusion"]["attention"] == want
    groupnorms = ops["GroupNormalization"] + ops["GroupNormSiLU"]
    assert groupnorms == canonical["InstanceNormalization"] == t["report"]["fusion"]["groupnorm"]
    assert not {op: ops[op] for op in FUSED_LEFTOVERS if ops[op]}
    assert t["report"]["fusion"]["misses"] == {}


def test_unet_blocks_fuse_as_expected(tiny):
    """GEGLU in every transformer block, SiLU folded into GroupNorm, residuals into the tensor-engine ops."""
    blocks = configs.expected_transformer_blocks("unet", "bk-sdm-tiny", "tiny")
    ops = _ops(tiny[("unet", "bk-sdm-tiny")]["fused"])
    assert ops["GeGLU"] == blocks and ops["GroupNormSiLU"] > 0 and ops["FusedConv"] > 0 and ops["FusedMatMul"] > 0
    attentions = [n for n in tiny[("unet", "bk-sdm-tiny")]["fused"].nodes if n.op == "Attention"]
    assert len(attentions) == 2 * blocks  # self- and cross-attention per transformer block
    for node in attentions:
        if node.op == "Attention":
            q, k, v = node.inputs[:3]
            assert all(t.inputs[0].op in ("MatMul", "FusedMatMul") for t in (q, k, v))  # projections visible
            assert node.attrs["is_causal"] == 0 and len(node.inputs) == 3
    text = tiny[("text-encoder", "bk-sdm-tiny")]["fused"]
    text_attn = [n for n in text.nodes if n.op == "Attention"]
    assert text_attn and all(n.attrs["is_causal"] == 1 for n in text_attn)
    heads = configs.get_config("text-encoder", "bk-sdm-tiny", "tiny")["num_attention_heads"]
    hidden = configs.text_hidden_size("bk-sdm-tiny", "tiny")
    for n in text.nodes:
        if n.op == "Attention":
            assert n.attrs["q_num_heads"] == heads and math.isclose(n.attrs["scale"], (hidden // heads) ** -0.5, rel_tol=1e-6)


@pytest.mark.parametrize("key", TINY, ids=lambda k: "-".join(k))
def test_fused_matches_onnxruntime_on_the_unfused_model(tiny, key):
    t = tiny[key]
    feeds = ort.random_inputs(t["fused"], seed=11)
    reference = ort.run(str(t["path"]), feeds)
    ort.check(reference, ort.run(ir.to_model(t["fused"]), feeds), 1e-4)


def test_fuse_is_idempotent(tiny):
    graph = tiny[("unet", "bk-sdm-tiny")]["fused"]
    before = [(n.op, n.name, [t.name for t in n.inputs], dict(n.attrs)) for n in graph.nodes]
    ctx = PassContext()
    again = edgefc.PassManager(["fuse"]).run(graph, ctx)
    assert [(n.op, n.name, [t.name for t in n.inputs], dict(n.attrs)) for n in again.nodes] == before
    counts = {k: v for k, v in ctx.report["fusion"].items() if k != "misses"}
    assert len(counts) >= 8 and set(counts.values()) == {0}, counts


@pytest.mark.parametrize("name", ORDER)
def test_each_fusion_pass_is_idempotent(tiny, name):
    graph = tiny[("unet", "bk-sdm-tiny")]["canonical"].copy()
    graph = edgefc.PassManager([name]).run(graph, PassContext())
    before = [(n.op, [t.name for t in n.inputs]) for n in graph.nodes]
    ctx = PassContext()
    graph = edgefc.PassManager([name]).run(graph, ctx)
    assert [(n.op, [t.name for t in n.inputs]) for n in graph.nodes] == before
    counts = {k: v for k, v in ctx.report["fusion"].items() if k != "misses"}
    assert counts and set(counts.values()) == {0}, counts


def test_fused_model_file_checks_inlines_and_reloads(tiny, tmp_path):
    """Saved with its local functions (overloads, IR >= 10): the ONNX checker passes, the inliner
    expands them to standard ops that compute the same, and a reload + re-export still runs."""
    t = tiny[("unet", "bk-sdm-tiny")]
    path = ir.save(t["fused"], tmp_path / "fused.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version >= functions.MIN_IR_VERSION
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 23), ("edgefc", 1)}
    used = {(n.op_type, n.overload) for n in model.graph.node if n.domain == "edgefc"}
    assert used <= {(f.name, f.overload) for f in model.functions}
    assert ("FusedConv", "none_residual") in used
    feeds = ort.random_inputs(model, seed=2)
    expected = ort.run(model, feeds)
    inlined = onnx.inliner.inline_local_functions(model)
    assert not [n for n in inlined.graph.node if n.domain == "edgefc"]
    ort.check(expected, ort.run(inlined, feeds), 0.0)
    again = edgefc.load(path)
    ort.check(expected, ort.run(ir.to_model(again), feeds), 0.0)
    # a fresh process that only loads (no pass imported) must keep the overloads too
    script = (f"import edgefc, numpy as np; from edgefc import ir, ort; g = edgefc.load({str(path)!r}); "
              f"f = ort.random_inputs(g, 2); print(ort.check(ort.run({str(path)!r}, f), ort.run(ir.to_model(g), f)).rel_error)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and float(proc.stdout.split()[-1]) == 0.0, proc.stderr[-2000:]


def test_compile_writes_fusion_report(tiny_models, tmp_path):
    result = edgefc.compile(tiny_models["vae-decoder"], None, output=tmp_path / "vae")
    report = json.loads((tmp_path / "vae" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["canonicalize", *ORDER]
    assert report["fusion"]["attention"] == configs.expected_attention_count("vae-decoder", "bk-sdm-tiny", "tiny")
    assert report["fusion"]["misses"] == {} and result.report["fusion"] == report["fusion"]
    assert ort.run(str(tmp_path / "vae" / "model.onnx"), ort.random_inputs(result.graph))


def test_no_fuse_option_skips_a_fusion_and_bad_names_are_user_errors(tiny_models):
    result = edgefc.compile(tiny_models["vae-decoder"], None, options={"no_fuse": ("attention",)})
    ops = _ops(result.graph)
    assert ops["Attention"] == 0 and ops["Softmax"] == 1 and result.report["fusion"]["skipped"] == ["fuse-attention"]
    with pytest.raises(edgefc.PassError, match="--no-fuse nope: no such fusion"):
        edgefc.compile(tiny_models["vae-decoder"], None, options={"no_fuse": ("nope",)})


def test_cli_no_fuse_error_is_one_line(tiny_models, tmp_path):
    from tests.test_core import assert_user_error, run_cli

    rc, out = run_cli("compile", str(tiny_models["vae-decoder"]), "--target", "exynos2400", "--no-fuse", "nope",
                      "-o", str(tmp_path / "out"))
    assert_user_error(rc, out, "--no-fuse nope")
    assert not (tmp_path / "out").exists()


def test_fusion_needs_a_canonical_graph(tmp_path):
    from tests.synthetic import mlp_model

    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    with pytest.raises(edgefc.PassError, match="run canonicalize first"):
        edgefc.PassManager(["fuse"]).run(edgefc.load(path), PassContext())


def test_initializer_sizes_come_from_dims():
    """ir's weight counting reads dims and types, never the (copied) raw bytes."""
    raw = onnx.numpy_helper.from_array(np.zeros((64, 32), np.float32), "raw")
    typed = onnx.helper.make_tensor("typed", onnx.TensorProto.FLOAT, [300], np.zeros(300, np.float32).tolist())
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["raw", "raw"], ["y"])], "g", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, 32])], [raw, typed]))
    assert ir.weight_bytes(model) == 64 * 32 * 4 + 300 * 4
    sk = ir._skeleton(model)
    assert {i.name for i in sk.graph.input} == {"raw", "typed"} and not sk.graph.initializer


# --- variants, exported from small torch modules -------------------------------------------------

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ModuleNotFoundError:  # the compiler's own tests above and below run without the models extra
    torch = nn = F = None

#: the tests that export small torch modules skip, each, when torch is not installed
needs_torch = pytest.mark.skipif(torch is None, reason="exports torch modules: needs torch (the models extra)")
#: what the torch modules below derive from (a plain class without torch: they are then never built)
Module = nn.Module if nn is not None else object


class HostTarget(edgefc.Target):
    """A non-NPU target: runs elementwise epilogues as separate kernels."""

    name = "host"
    is_npu = False


def fuse_module(tmp_path, module, *inputs, target=None, name="m"):
    """Export ``module`` (legacy exporter, opset 17), canonicalize + fuse; returns the fused graph,
    the report and the max relative error against onnxruntime on the export."""
    torch.manual_seed(0)
    path = tmp_path / f"{name}.onnx"
    names = [f"in{i}" for i in range(len(inputs))]
    with torch.no_grad():
        torch.onnx.export(module.eval(), inputs, str(path), opset_version=17, dynamo=False, input_names=names)
    ctx = PassContext(target=target)
    graph = edgefc.PassManager(["canonicalize", "fuse"]).run(edgefc.load(path), ctx)
    feeds = {n: t.numpy() for n, t in zip(names, inputs)}
    diff = ort.compare(ort.run(str(path), feeds), ort.run(ir.to_model(graph), feeds))
    assert not diff.reason, diff.reason
    return graph, ctx.report["fusion"], diff.rel_error


class Heads(Module):
    """diffusers-style attention: projections, head split, F.scaled_dot_product_attention."""

    def __init__(self, dim=16, heads=2, causal=False, ctx_dim=None, bias=False):
        super().__init__()
        self.h, self.causal = heads, causal
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(ctx_dim or dim, dim, bias=bias)
        self.v = nn.Linear(ctx_dim or dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim)

    def split(self, t):
        return t.view(t.shape[0], -1, self.h, t.shape[-1] // self.h).transpose(1, 2)

    def forward(self, x, ctx=None):
        kv = x if ctx is None else ctx
        y = F.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(kv)), self.split(self.v(kv)),
                                           is_causal=self.causal)
        return x + self.o(y.transpose(1, 2).reshape(x.shape[0], -1, x.shape[-1]))


class ScoresAttention(Heads):
    """CLIP-style: the scale on the scores, an additive mask, optionally a soft cap (not fusable)."""

    def __init__(self, mask: torch.Tensor, softcap: bool = False, **kw):
        super().__init__(**kw)
        self.register_buffer("mask", mask)
        self.softcap = softcap

    def forward(self, x, ctx=None):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)
        if self.softcap:
            s = torch.tanh(s / 30.0) * 30.0
        p = torch.softmax(s + self.mask, dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(x.shape[0], -1, x.shape[-1]))


def _attention(graph):
    return [n for n in graph.nodes if n.op == "Attention"]


@needs_torch
def test_sdpa_self_cross_and_causal(tmp_path):
    x, c = torch.randn(1, 10, 16), torch.randn(1, 7, 24)
    graph, report, rel = fuse_module(tmp_path, Heads(), x, name="self")
    [att] = _attention(graph)
    assert rel <= 1e-5 and att.attrs["q_num_heads"] == 2 and math.isclose(att.attrs["scale"], 8 ** -0.5, rel_tol=1e-6)
    assert att.inputs[0].inputs[0].op == "MatMul" and att.outputs[0].outputs[0].op == "FusedMatMul"
    graph, _, rel = fuse_module(tmp_path, Heads(ctx_dim=24), x, c, name="cross")
    [att] = _attention(graph)
    assert rel <= 1e-5 and ir.static_shape(att.inputs[1]) == (1, 7, 16)
    graph, report, rel = fuse_module(tmp_path, Heads(causal=True, bias=True), x, name="causal")
    assert rel <= 1e-5 and [a.attrs["is_causal"] for a in _attention(graph)] == [1], report["misses"]


@needs_torch
def test_scores_scale_causal_and_general_masks(tmp_path):
    x = torch.randn(1, 6, 16)
    causal = torch.full((6, 6), torch.finfo(torch.float32).min).triu(1)[None, None]
    graph, _, rel = fuse_module(tmp_path, ScoresAttention(causal, bias=True), x, name="clip")
    [att] = _attention(graph)
    assert rel <= 1e-5 and att.attrs["is_causal"] == 1 and len(att.inputs) == 3
    padding = torch.zeros(1, 1, 1, 6)
    padding[..., 4:] = -1e4  # a padding mask: not causal, kept as attn_mask
    graph, _, rel = fuse_module(tmp_path, ScoresAttention(padding), x, name="pad")
    [att] = _attention(graph)
    assert rel <= 1e-5 and att.attrs["is_causal"] == 0
    assert np.array_equal(att.inputs[3].values, np.broadcast_to(padding.numpy(), (1, 1, 6, 6)))


@needs_torch
def test_unfusable_attention_is_a_miss_with_reason(tmp_path):
    x = torch.randn(1, 6, 16)
    graph, report, rel = fuse_module(tmp_path, ScoresAttention(torch.zeros(1, 1, 6, 6), softcap=True), x, name="cap")
    assert rel <= 1e-5 and not _attention(graph) and _ops(graph)["Softmax"] == 1
    [miss] = report["misses"]["attention"]
    assert miss["node"].endswith("Softmax") and "Tanh" in miss["reason"]


@needs_torch
def test_gelu_forms_layernorm_and_geglu(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.g, self.b = nn.Parameter(torch.randn(16)), nn.Parameter(torch.randn(16))
            self.up, self.proj, self.down = nn.Linear(16, 32), nn.Linear(16, 64), nn.Linear(32, 16)

        def forward(self, x):
            d = x - x.mean(-1, keepdim=True)                                       # LayerNorm, by hand
            x = d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5) * self.g + self.b
            h, gate = self.proj(x).chunk(2, dim=-1)                                # GEGLU
            x = x + self.down(h * F.gelu(gate))
            return F.gelu(self.up(x), approximate="tanh") + F.gelu(x).sum(-1, keepdim=True)

    graph, report, rel = fuse_module(tmp_path, Block(), torch.randn(1, 5, 16))
    ops = _ops(graph)
    assert rel <= 1e-5
    assert ops["LayerNormalization"] == 1 and ops["GeGLU"] == 1 and not ops["Erf"] and not ops["Tanh"]
    assert report["layernorm"] == 1 and report["geglu"] == 1 and report["gelu"] == 3
    approx = sorted(n.attrs["approximate"] for n in graph.nodes if n.op == "Gelu")
    assert approx == ["none", "tanh"]
    # the tanh GELU after a matmul is not an epilogue FusedMatMul takes (activation "gelu" is exact)
    [miss] = report["misses"]["epilogue"]
    assert "approximate='tanh'" in miss["reason"]


@needs_torch
def test_resnet_block_groupnorm_silu_and_conv_epilogue(tmp_path):
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn, self.conv = nn.GroupNorm(4, 8), nn.Conv2d(8, 8, 3, padding=1)
            self.gn2 = nn.GroupNorm(2, 8, affine=False)

        def forward(self, x):
            return self.gn2(x + self.conv(F.silu(self.gn(x))))

    x = torch.randn(1, 8, 6, 6)
    graph, report, rel = fuse_module(tmp_path, Res(), x)
    ops = _ops(graph)
    assert rel <= 1e-5 and ops["GroupNormSiLU"] == 1 and ops["GroupNormalization"] == 1 and ops["FusedConv"] == 1
    [conv] = [n for n in graph.nodes if n.op == "FusedConv"]
    assert len(conv.inputs) == 4 and conv.inputs[3] is graph.inputs[0] and conv.attrs["pads"] == [1, 1, 1, 1]
    # a target that runs epilogues as separate kernels keeps the Conv and the Add, and says why
    graph, report, rel = fuse_module(tmp_path, Res(), x, target=HostTarget())
    ops = _ops(graph)
    assert rel <= 1e-5 and ops["Conv"] == 1 and ops["Add"] == 1 and not ops["FusedConv"]
    [miss] = report["misses"]["epilogue"]
    assert "target 'host'" in miss["reason"]


@needs_torch
def test_linear_gelu_and_silu_epilogues(tmp_path):
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 16)

        def forward(self, x):
            return F.silu(self.c(x + self.b(F.gelu(self.a(x)))))

    graph, report, rel = fuse_module(tmp_path, MLP(), torch.randn(1, 4, 16))
    acts = sorted((n.attrs["activation"], len(n.inputs)) for n in graph.nodes if n.op == "FusedMatMul")
    assert rel <= 1e-5 and acts == [("gelu", 3), ("none", 4), ("silu", 3)]
    assert report["activation"] == 2 and report["residual"] == 1 and report["matmul_bias"] == 3


@needs_torch
def test_groupnorm_with_a_shared_intermediate_is_a_miss(tmp_path):
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn = nn.GroupNorm(2, 4)

        def forward(self, x):
            y = self.gn(x)
            return y, torch.sigmoid(y) * 2.0  # the SiLU shape, but not a SiLU: y is used twice

    graph, report, rel = fuse_module(tmp_path, Leaky(), torch.randn(1, 4, 3, 3))
    assert rel <= 1e-5 and _ops(graph)["GroupNormalization"] == 1
    [miss] = report["misses"]["groupnorm_silu"]
    assert miss.get("reason")


def test_edgefc_function_bodies_are_exact():
    """Every FusedMatMul / FusedConv overload, GroupNormSiLU and GeGLU, run by onnxruntime from their
    local functions, against a float64 reference."""
    import onnx_graphsurgeon as gs

    rng = np.random.default_rng(0)
    erf = np.vectorize(math.erf)
    acts = {"none": lambda z: z, "gelu": lambda z: 0.5 * z * (1 + erf(z / math.sqrt(2))),
            "silu": lambda z: z / (1 + np.exp(-z)), "clip": lambda z: np.clip(z, -0.5, 0.5)}
    bounds = {"clip": {"clip_min": -0.5, "clip_max": 0.5}}
    x, r = gs.Variable("x", np.float32, [1, 8, 16]), gs.Variable("r", np.float32, [1, 8, 6])
    img, rimg = gs.Variable("img", np.float32, [1, 4, 5, 5]), gs.Variable("rimg", np.float32, [1, 6, 5, 5])
    w, b = rng.standard_normal((16, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    cw, cb = rng.standard_normal((6, 4, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    gamma, beta = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    conv_attrs = {"dilations": [1, 1], "group": 1, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1]}
    mm_in = [x, gs.Constant("w", w), gs.Constant("b", b)]
    cv_in = [img, gs.Constant("cw", cw), gs.Constant("cb", cb)]
    nodes, outs = [], []
    for act in functions.ACTIVATIONS:
        for res in (False, True):
            y1 = gs.Variable(f"mm_{act}_{res}", np.float32, [1, 8, 6])
            y2 = gs.Variable(f"cv_{act}_{res}", np.float32, [1, 6, 5, 5])
            nodes.append(functions.make_node("FusedMatMul", mm_in + [r] * res, [y1], name=f"mm_{act}_{res}",
                                             attrs={"activation": act, **bounds.get(act, {})}))
            nodes.append(functions.make_node("FusedConv", cv_in + [rimg] * res, [y2], name=f"cv_{act}_{res}",
                                             attrs={"activation": act, **conv_attrs, **bounds.get(act, {})}))
            outs += [y1, y2]
    gn, ge = gs.Variable("gn", np.float32, [1, 4, 5, 5]), gs.Variable("ge", np.float32, [1, 8, 8])
    nodes.append(functions.make_node("GroupNormSiLU", [img, gs.Constant("g", gamma), gs.Constant("be", beta)], [gn],
                                     name="gn", attrs={"epsilon": 1e-5, "num_groups": 2}))
    nodes.append(functions.make_node("GeGLU", [x], [ge], name="ge"))
    graph = functions.ensure_functions(gs.Graph(nodes=nodes, inputs=[x, r, img, rimg], outputs=outs + [gn, ge], opset=23))
    assert not graph.functions  # the functions are stamped on export, not kept in graphsurgeon
    model = ir.to_model(graph)
    onnx.checker.check_model(model, full_check=True)
    feeds = ort.random_inputs(model, seed=4)
    got = ort.run(model, feeds)
    f = {k: v.astype(np.float64) for k, v in feeds.items()}
    # float64 references
    z_mm = f["x"] @ w + b
    cols = np.lib.stride_tricks.sliding_window_view(np.pad(f["img"], ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), (2, 3))
    z_cv = np.einsum("bchwij,ocij->bohw", cols, cw.astype(np.float64)) + cb[None, :, None, None]
    for act in functions.ACTIVATIONS:
        for res in (False, True):
            want_mm = acts[act](z_mm) + (f["r"] if res else 0)
            want_cv = acts[act](z_cv) + (f["rimg"] if res else 0)
            for name, want in ((f"mm_{act}_{res}", want_mm), (f"cv_{act}_{res}", want_cv)):
                assert np.abs(got[name] - want).max() <= 1e-5 * np.abs(want).max(), name
    g = f["img"].reshape(1, 2, -1)
    norm = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(1, 4, 5, 5)
    want = acts["silu"](norm * gamma[None, :, None, None] + beta[None, :, None, None])
    assert np.abs(got["gn"] - want).max() <= 1e-5 * np.abs(want).max()
    want = f["x"][..., :8] * acts["gelu"](f["x"][..., 8:])
    assert np.abs(got["ge"] - want).max() <= 1e-5 * np.abs(want).max()


# --- both torch exporters, every fusion a visible pass ---------------------------------------------

@pytest.mark.parametrize("component", ("text-encoder", "unet", "vae-decoder"))
@pytest.mark.parametrize("exporter", ("torchscript", "dynamo"))
def test_both_exporters_fuse_everything_and_verify_names_each_fusion(request, exporter, component):
    """Each tiny component from either exporter: --verify with the default pipeline names every
    fusion pass, every attention and GroupNorm is fused, nothing unfused left, and the result
    matches onnxruntime on the export within 1e-4."""
    path = request.getfixturevalue("tiny_models" if exporter == "torchscript" else "tiny_dynamo")[component]
    result = edgefc.compile(path, None, verify=True)
    assert [r.name for r in result.records] == ["canonicalize", *ORDER]
    assert all(r.verify_rel_error is not None and r.verify_rel_error <= 1e-4 for r in result.records)
    ops, want = _ops(result.graph), configs.expected_attention_count(component, "bk-sdm-tiny", "tiny")
    assert ops["Attention"] == want == result.report["fusion"]["attention"], result.report["fusion"]["misses"]
    assert not {op: ops[op] for op in ("Softmax", "Erf", "InstanceNormalization") if ops[op]}
    assert result.report["fusion"]["misses"].get("attention") is None
    if component != "text-encoder":
        assert ops["GroupNormalization"] + ops["GroupNormSiLU"] > 0 and "groupnorm" not in result.report["fusion"]["misses"]
    feeds = ort.random_inputs(result.graph, seed=5)
    ort.check(ort.run(str(path), feeds), ort.run(ir.to_model(result.graph), feeds), 1e-4)


# --- fusion by the math: diffusers blocks x exporters x opsets -------------------------------------

_BLOCK_EXPORTS: dict = {}


def _diffusers_block(variant: str):
    """A tiny diffusers Transformer2DModel (GroupNorm, proj in/out, self + cross attention, GEGLU,
    LayerNorms) in one of the configurations U-Nets use, with its inputs."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    heads, head_dim = {"heads1": (1, 16), "heads4": (4, 4)}.get(variant, (2, 8))
    block = Transformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                               norm_num_groups=4, cross_attention_dim=12, num_layers=2 if variant == "layers2" else 1,
                               use_linear_projection=variant == "linear", activation_fn="geglu",
                               upcast_attention=variant == "upcast").eval()
    for m in block.modules():
        if hasattr(m, "set_processor"):
            m.set_processor(AttnProcessor() if variant == "classic" else AttnProcessor2_0())

    class Wrap(nn.Module):
        def __init__(self, b):
            super().__init__()
            self.b = b

        def forward(self, x, ctx):
            return self.b(x, encoder_hidden_states=ctx, return_dict=False)[0]

    torch.manual_seed(0)
    return Wrap(block), (torch.randn(1, 16, 4, 4), torch.randn(1, 5, 12))


@needs_torch
@pytest.mark.parametrize("variant, exporter, opset", [
    ("sdpa", "torchscript", 14), ("sdpa", "torchscript", 17), ("classic", "torchscript", 17),
    ("linear", "torchscript", 20), ("heads1", "torchscript", 17), ("heads4", "torchscript", 17),
    ("layers2", "torchscript", 17), ("upcast", "torchscript", 17),
    ("sdpa", "dynamo", 18), ("classic", "dynamo", 20), ("linear", "dynamo", 23), ("heads1", "dynamo", 20),
])
def test_diffusers_transformer_blocks_fuse_from_any_exporter(tmp_path, variant, exporter, opset):
    """Every attention, GroupNorm, LayerNorm and GEGLU of a diffusers transformer block is fused,
    whatever processor (SDPA or the classic baddbmm one), projection, head layout, exporter and
    opset produced it, and the fused graph computes what the export does."""
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    module, inputs = _diffusers_block(variant)
    path = tmp_path / f"{variant}-{exporter}-{opset}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=exporter == "dynamo", opset_version=opset,
                          input_names=["x", "ctx"], output_names=["y"])
    source = _ops(edgefc.load(path))
    ctx = PassContext()
    graph = edgefc.PassManager(["canonicalize", "fuse"]).run(edgefc.load(path), ctx)
    ops, layers = _ops(graph), 2 if variant == "layers2" else 1
    assert ops["Attention"] == 2 * layers == ctx.report["fusion"]["attention"], ctx.report["fusion"]["misses"]
    assert ops["GroupNormalization"] + ops["GroupNormSiLU"] == 1 and ops["GeGLU"] == layers
    assert ops["LayerNormalization"] == 3 * layers
    assert not {op: ops[op] for op in ("Softmax", "Erf", "InstanceNormalization", "ReduceMean") if ops[op]}
    assert source["Softmax"] + source["Attention"] == 2 * layers  # opset 23 dynamo: 4D Attention-23, made 3D
    assert all(len(ir.static_shape(n.inputs[0])) == 3 for n in graph.nodes if n.op == "Attention")
    feeds = {"x": inputs[0].numpy(), "ctx": inputs[1].numpy()}
    ort.check(ort.run(str(path), feeds), ort.run(ir.to_model(graph), feeds), 1e-5)


def test_native_groupnormalization_takes_its_silu(tmp_path):
    """A GroupNormalization-21 already in the export (dynamo at opset 21+) followed by SiLU becomes
    GroupNormSiLU, exactly; a second run finds nothing to do."""
    from onnx import TensorProto as T
    from onnx import helper as h

    rng = np.random.default_rng(0)
    vi = [h.make_tensor_value_info(n, T.FLOAT, [1, 8, 4, 4]) for n in ("x", "g", "sg", "y")]
    inits = [onnx.numpy_helper.from_array(rng.random(8).astype(np.float32), n) for n in ("s", "b")]
    nodes = [h.make_node("GroupNormalization", ["x", "s", "b"], ["g"], name="gn", num_groups=2, epsilon=1e-5),
             h.make_node("Sigmoid", ["g"], ["sg"], name="sig"), h.make_node("Mul", ["g", "sg"], ["y"], name="mul")]
    model = h.make_model(h.make_graph(nodes, "g", [vi[0]], [vi[3]], inits, value_info=vi[1:3]),
                         opset_imports=[h.make_opsetid("", 21)])
    path = tmp_path / "gn21.onnx"
    onnx.save(model, path)
    ctx = PassContext()
    graph = edgefc.PassManager(["canonicalize", "fuse"]).run(edgefc.load(path), ctx)
    assert _ops(graph) == {"GroupNormSiLU": 1} and ctx.report["fusion"]["groupnorm_silu"] == 1
    feeds = ort.random_inputs(graph, 1)
    ort.check(ort.run(str(path), feeds), ort.run(ir.to_model(graph), feeds), 0.0)
    again = PassContext()
    edgefc.PassManager(["fuse"]).run(graph, again)
    assert all(v == 0 for k, v in again.report["fusion"].items() if k != "misses")


@needs_torch
def test_optimum_style_dynamic_export_fuses_once_shapes_are_fixed(tmp_path):
    """What optimum's ONNX export writes (TorchScript exporter, opset 14, dynamic batch, spatial
    and sequence axes), compiled with ``shapes`` (``--shape``): every attention and the GroupNorm
    fused, and the result matches the export at the fixed shapes."""
    module, inputs = _diffusers_block("sdpa")
    path = tmp_path / "dynamic.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=14, input_names=["x", "ctx"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"},
                                                            "ctx": {0: "batch", 1: "sequence"}, "y": {0: "batch"}})
    assert any(d.dim_param for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim)
    shapes = {"x": (2, 16, 6, 4), "ctx": (2, 9, 12)}
    result = edgefc.compile(path, None, shapes=shapes)
    ops = _ops(result.graph)
    assert ops["Attention"] == 2 and ops["GroupNormalization"] + ops["GroupNormSiLU"] == 1, result.report["fusion"]
    assert not {op: ops[op] for op in ("Softmax", "Erf", "InstanceNormalization") if ops[op]}
    rng = np.random.default_rng(3)
    feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    ort.check(ort.run(str(path), feeds), ort.run(ir.to_model(result.graph), feeds), 1e-5)
