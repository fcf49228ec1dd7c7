"""The NPU composites as TVM Relax patterns (DESIGN.md "TVM lowering").

``pattern_table(check)`` gives ``(name, pattern, annotations, check)`` for every ``edgefc_npu.*``
composite, lowest priority first, in the shape of TVM's NPU BYOC template
(``relax/backend/contrib/example_npu``): conv2d and matmul with their epilogues (bias,
activation, residual add), one attention tile with the slices that cut it, group norm + SiLU,
GeGLU, and every single operator the NPU has a kernel for. Patterns run before ``LegalizeOps``.
The composites, their parts, activations and priority order are generated from
:mod:`edgefc.composites`, the description the ONNX fusion passes build their patterns from.

The patterns do not decide what runs where: ``check`` is built from the Program's placement
(:func:`placement_check`), so ``FuseOpsByPattern`` only groups calls of nodes the Program put on
the NPU, and never a call the kernels cannot execute.
"""

from __future__ import annotations

from edgefc import composites
from edgefc.targets.tvm_kernels import _BINARY, KERNELS, kernel_rejects
from edgefc.targets.tvm_node_stamps import node_of

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


def _act(y, act: composites.Activation):
    """``act`` applied to ``y``, as the Relax op, or for a gated activation also as the exporters
    write it (SiLU: ``x * sigmoid(x)``)."""
    from tvm.relax.dpl.pattern import is_op, wildcard

    pat = is_op(act.relax_op)(y, *[wildcard() for _ in act.bounds])
    if act.gated:
        pat = pat | is_op("relax.multiply")(y, is_op(act.relax_gate_op)(y))
    return pat


def _epilogue(e: composites.Epilogue, check) -> tuple:
    """The (name, pattern, annotations, check) of an epilogue composite: root, bias add (the bias
    possibly reshaped, as TVM's Conv converter writes it), activation, residual add."""
    from tvm.relax.dpl.pattern import is_op, wildcard

    root = is_op(e.root.relax_op)(*[wildcard() for _ in range(_NARGS.get(e.root.relax_op, 1))])
    y = root
    if e.bias:
        y = is_op("relax.add")(y, is_op("relax.reshape")(wildcard(), wildcard()) | wildcard())
    if e.activation:
        y = _act(y, e.activation)
    if e.residual:
        y = is_op("relax.add")(y, wildcard())
    return PREFIX + e.name, y, {"root": root}, check


def _single(op: str, check) -> tuple:
    from tvm.relax.dpl.pattern import is_op, wildcard

    nargs = 2 if op in _BINARY else _NARGS.get(op, 1)
    if op == composites.ATTENTION_TILE.relax_slice:
        pat = is_op(op)(wildcard(), wildcard(), wildcard(), wildcard(), varg_default_wildcard=True)
    else:
        pat = is_op(op)(*[wildcard() for _ in range(nargs)])
    return PREFIX + op.removeprefix("relax.").replace(".", "_"), pat, {"root": pat}, check


# the number of arguments of the kernels' ops that take more than one (the binary ops: 2)
_NARGS = {"relax.nn.conv2d": 2, "relax.nn.conv1d": 2, "relax.nn.conv2d_transpose": 2, "relax.nn.conv1d_transpose": 2,
          "relax.nn.prelu": 2, "relax.matmul": 2, "relax.nn.attention": 3, "relax.nn.layer_norm": 3,
          "relax.nn.group_norm": 3, "relax.quantize": 3, "relax.dequantize": 3, "relax.clip": 3, "relax.where": 3,
          "relax.reshape": 2, "relax.broadcast_to": 2, "relax.image.resize2d": 2}


def pattern_table(check) -> list[tuple]:
    """(name, pattern, annotations, check) for every NPU pattern, lowest priority first: the
    single-op kernels, the attention tiles, the epilogues (:data:`edgefc.composites.EPILOGUES`,
    reversed), group norm + SiLU, GeGLU."""
    from tvm.relax.dpl.pattern import is_op, is_tuple_get_item, wildcard

    singles = [_single(op, check) for op in KERNELS]

    # One attention tile with the strided slices that cut its Q rows / K,V prefix out of the
    # block (the tile's DMA loads); a slice shared by several tiles (a head group's K and V)
    # leaks out of the match, so the check rejects that variant and a smaller one applies.
    tile = composites.ATTENTION_TILE
    tiles = []
    for name, sliced in tile.variants():
        ins = [_single(tile.relax_slice, check)[1] if cut else wildcard() for cut in sliced]
        att = is_op(tile.relax_op)(*ins)
        tiles.append((PREFIX + name, att, {"root": att}, check))
    epilogues = [_epilogue(e, check) for e in reversed(composites.EPILOGUES)]
    gn_silu = composites.GROUP_NORM_SILU
    gn = is_op(gn_silu.root.relax_op)(wildcard(), wildcard(), wildcard())
    gate = composites.GEGLU
    split = is_op(gate.relax_split)(wildcard())
    glu = is_op("relax.multiply")(is_tuple_get_item(split, 0), _act(is_tuple_get_item(split, 1), gate.activation))
    return [*singles, *tiles, *epilogues, (PREFIX + gn_silu.name, _act(gn, gn_silu.activation), {"root": gn}, check),
            (PREFIX + gate.name, glu, {"root": split}, check)]


def composite_names() -> set[str]:
    """The names (without the prefix) of the table's composites of more than one op."""
    singles = {_single(op, None)[0] for op in KERNELS}
    return {name.removeprefix(PREFIX) for name, *_ in pattern_table(None) if name not in singles}
