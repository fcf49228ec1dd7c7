"""Which ONNX node each Relax call came from (DESIGN.md "TVM lowering").

The TVM import binds every node's result to ``onnx<k>``; :func:`tag_nodes` then stamps every
operator call of ``main`` with its ONNX node's name, on the call's span, so the stamp survives
partitioning (``FuseOpsByPattern`` and ``MergeCompositeFunctions`` copy calls with their spans).
:func:`node_of` reads it back: the partition report, the placement check of the NPU patterns and
the NPU programs attribute each call to the node the Program priced.
"""

from __future__ import annotations

NODE_SPAN = "edgefc-node:"


def tag_nodes(mod, nodes: list[tuple[str, str]], results: dict[int, list[str]]):
    """Stamp every operator call of ``main`` with the name of the ONNX node it came from: node k
    owns every binding its result variables (``results[k]``) depend on that no earlier node owns
    (nodes convert in order, so what node k's conversion emitted is exactly that)."""
    from tvm import ir, relax

    main = mod["main"]
    defs = {b.var.name: b for block in main.body.blocks for b in block.bindings}
    owner: dict[str, int] = {}

    def deps(e, out):
        if isinstance(e, relax.Var):
            out.append(e.name)
        elif isinstance(e, relax.Call):
            for a in e.args:
                deps(a, out)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                deps(f, out)
        elif isinstance(e, relax.TupleGetItem):
            deps(e.tuple_value, out)

    for k in sorted(results):
        stack = list(results[k])
        while stack:
            v = stack.pop()
            if v in owner or v not in defs:
                continue
            owner[v] = k
            deps(defs[v].value, stack)

    @relax.expr_functor.mutator
    class Tagger(relax.PyExprMutator):
        def visit_var_binding_(self, b):
            v = b.value
            if b.var.name in owner and isinstance(v, relax.Call) and isinstance(v.op, ir.Op):
                span = ir.Span(ir.SourceName(NODE_SPAN + nodes[owner[b.var.name]][0]), 0, 0, 0, 0)
                new = relax.Call(v.op, [self.visit_expr(a) for a in v.args], v.attrs, v.ty_args, span=span)
                self.builder_.emit_normalized(relax.VarBinding(b.var, self.builder_.normalize(new)))
            else:
                super().visit_var_binding_(b)

    body = Tagger(mod).visit_expr(main.body)
    mod["main"] = relax.Function(main.params, body, main.ty.ret, main.is_pure, main.attrs, main.span)
    return mod


def node_of(call) -> str | None:
    """The ONNX node name :func:`tag_nodes` stamped on ``call``, or None."""
    span = getattr(call, "span", None)
    name = span.source_name.name if span is not None and span.source_name is not None else ""
    return name[len(NODE_SPAN):] if name.startswith(NODE_SPAN) else None
