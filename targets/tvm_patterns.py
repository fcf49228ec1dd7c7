"""The NPU composites as TVM Relax patterns (DESIGN.md "TVM lowering").

``pattern_table(check)`` gives ``(name, pattern, annotations, check)`` for every ``edgefc_npu.*``
composite, lowest priority first, in the shape of TVM's NPU BYOC template
(``relax/backend/contrib/example_npu``): conv2d and matmul with their epilogues (bias,
activation, residual add), one attention tile with the slices that cut it, group norm + SiLU,
GeGLU, and every single operator the NPU has a kernel for. Patterns run before ``LegalizeOps``.

The patterns do not decide what runs where: ``check`` is built from the Program's placement
(:func:`placement_check`), so ``FuseOpsByPattern`` only groups calls of nodes the Program put on
the NPU, and never a call the kernels cannot execute.
"""

from __future__ import annotations

from edgefc.targets.tvm_import import node_of
from edgefc.targets.tvm_kernels import _BINARY, KERNELS, kernel_rejects

CODEGEN = "edgefc_npu"
PREFIX = CODEGEN + "."


def placement_check(host_nodes: set[str]):
    """The check every pattern uses: no call of a node the Program placed on the host, no call a
    kernel cannot execute, no intermediate value leaking out of a multi-call match."""

    def check(context) -> bool:
        from tvm import relax
        from tvm.relax.backend.utils import has_leaking_intermediate_variables

        for expr in context.matched_bindings.values():
            if isinstance(expr, relax.Call) and (node_of(expr) in host_nodes or kernel_rejects(expr) is not None):
                return False
        return not (len(context.matched_bindings) > 1 and has_leaking_intermediate_variables(context))

    return check


ACTIVATIONS = ("relax.nn.silu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.relu", "relax.sigmoid")


def _act(y):
    from tvm.relax.dpl.pattern import is_op

    pat = None
    for name in ACTIVATIONS:
        p = is_op(name)(y)
        pat = p if pat is None else pat | p
    # SiLU as the exporters write it: x * sigmoid(x)
    return pat | is_op("relax.multiply")(y, is_op("relax.sigmoid")(y))


def _epilogue_patterns(root_name: str, make_root, check) -> list:
    """root, root+bias, root+bias+act, root+bias+act+residual, root+bias+residual, root+act."""
    from tvm.relax.dpl.pattern import is_op, wildcard

    out = []
    for bias in (False, True):
        for act in (False, True):
            for res in (False, True):
                if not (bias or act or res):
                    continue
                root = make_root()
                y = root
                if bias:
                    b = is_op("relax.reshape")(wildcard(), wildcard()) | wildcard()
                    y = is_op("relax.add")(y, b)
                if act:
                    y = _act(y)
                if res:
                    y = is_op("relax.add")(y, wildcard())
                name = root_name + ("_bias" if bias else "") + ("_act" if act else "") + ("_residual" if res else "")
                out.append((PREFIX + name, y, {"root": root}, check))
    # longer chains win: residual, then activation, then bias
    out.sort(key=lambda p: p[0].count("_"))
    return out


def pattern_table(check) -> list[tuple]:
    """(name, pattern, annotations, check) for every NPU pattern, lowest priority first."""
    from tvm.relax.dpl.pattern import is_op, is_tuple_get_item, wildcard

    singles = []
    for op in KERNELS:
        short = op.removeprefix("relax.").replace(".", "_")
        nargs = {"relax.nn.conv2d": 2, "relax.matmul": 2, "relax.nn.attention": 3, "relax.nn.layer_norm": 3,
                 "relax.nn.group_norm": 3, "relax.quantize": 3, "relax.dequantize": 3, "relax.clip": 3, "relax.where": 3,
                 "relax.reshape": 2, "relax.broadcast_to": 2, "relax.image.resize2d": 2}.get(op)
        if op in _BINARY:
            nargs = 2
        if op == "relax.strided_slice":
            pat = is_op(op)(wildcard(), wildcard(), wildcard(), wildcard(), varg_default_wildcard=True)
        elif nargs:
            pat = is_op(op)(*[wildcard() for _ in range(nargs)])
        else:
            pat = is_op(op)(wildcard())
        singles.append((PREFIX + short, pat, {"root": pat}, check))

    def conv():
        return is_op("relax.nn.conv2d")(wildcard(), wildcard())

    def matmul():
        return is_op("relax.matmul")(wildcard(), wildcard())

    # One attention tile with the strided slices that cut its Q rows / K,V prefix out of the
    # block (the tile's DMA loads); a slice shared by several tiles (a head group's K and V)
    # leaks out of the match, so the check rejects that variant and a smaller one applies.
    tiles = []
    for mask in range(1, 8):
        ins = [is_op("relax.strided_slice")(wildcard(), wildcard(), wildcard(), wildcard(), varg_default_wildcard=True)
               if mask & (1 << i) else wildcard() for i in range(3)]
        att = is_op("relax.nn.attention")(*ins)
        tiles.append((mask.bit_count(), (PREFIX + "attention_tile" + "".join("_" + "qkv"[i] for i in range(3) if mask & (1 << i)),
                                             att, {"root": att}, check)))
    tiles = [t for _, t in sorted(tiles, key=lambda x: x[0])]
    gn = is_op("relax.nn.group_norm")(wildcard(), wildcard(), wildcard())
    gn_silu = (PREFIX + "group_norm_silu", _act(gn), {"root": gn}, check)
    split = is_op("relax.split")(wildcard())
    gelu_b = is_op("relax.nn.gelu")(is_tuple_get_item(split, 1)) | is_op("relax.nn.gelu_tanh")(is_tuple_get_item(split, 1))
    geglu = is_op("relax.multiply")(is_tuple_get_item(split, 0), gelu_b)
    return [*singles, *tiles, *_epilogue_patterns("conv2d", conv, check), *_epilogue_patterns("matmul", matmul, check), gn_silu,
            (PREFIX + "geglu", geglu, {"root": split}, check)]

