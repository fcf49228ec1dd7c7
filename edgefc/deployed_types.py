"""Deployed element types and op precisions of a graph, read from the graph (PERFORMANCE.md "Byte
sizes: the deployed types"; the vocabulary is :mod:`edgefc.precision`).

:class:`DeployedTypes` is the one reader of what ``quantize`` decided: every tensor's storage type
(the graph's dtype, or the quantized type of the QuantizeLinear/DequantizeLinear it passes
through) and every op's precision (the record ``quantize`` wrote on the node). MLT sizes attention
tiles with it, the lowering prices bytes and picks tensor-engine rates with it, the placement
checks element types against the target's with it, ``quantize`` reports the deployed types with
it. Priced at a what-if precision instead (``edgefc profile --precision w8a8``), every float
activation takes that precision's activation type, every float weight its weight type, and every
op that precision.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from edgefc import precision as pr
from edgefc.dtypes import dtype_code


class DeployedTypes:
    """Deployed element type of every tensor, precision of every op, and which tensors are
    compile-time constants (weights), for ``pricing`` ``as-built`` or a what-if precision.

    Tensors joined by :data:`edgefc.precision.STORAGE_ALIAS_OPS` (Reshape, Squeeze, Q/DQ, ...)
    form one class with one storage and one type: as built, the quantized type when the class
    passes through a QuantizeLinear/DequantizeLinear, else the graph's dtype.
    """

    def __init__(self, graph: gs.Graph, pricing: str = "as-built"):
        if pricing not in pr.PRICINGS:
            raise ValueError(f"unknown precision '{pricing}' (choose from {', '.join(pr.PRICINGS)})")
        self.pricing = pricing
        self.root: dict[str, str] = {}
        self.const: set[str] = set()
        self.code: dict[str, str] = {}
        self.conversions: set[int] = set()   # ids of the QuantizeLinear nodes that requantise (priced)
        tensors = graph.tensors()
        for name, t in tensors.items():
            if isinstance(t, gs.Constant):
                self.const.add(name)
        for node in graph.nodes:
            ins = [t for t in node.inputs if t is not None and t.name]
            if (node.op in pr.STORAGE_ALIAS_OPS | {"Cast", "Transpose"} and ins
                    and all(self.find(t.name) in self.const for t in ins)):
                for o in node.outputs:
                    self.const.add(o.name)
        # Views (Reshape ...) share their input's storage; a DequantizeLinear reads its input's.
        qtype: dict[str, str] = {}
        direct: set[str] = set()   # classes some op reads as they are (not through a Q/DQ or a view)
        for node in graph.nodes:
            ins = [t for t in node.inputs if t is not None and t.name]
            if node.op in pr.ALIAS_OPS | {"DequantizeLinear"} and ins:
                for o in node.outputs:
                    self._join(ins[0].name, o.name)
            if node.op == "DequantizeLinear" and ins:
                qtype[self.find(ins[0].name)] = dtype_code(ins[0].dtype)
        for node in graph.nodes:
            if node.op in pr.STORAGE_ALIAS_OPS or node.op in ("Shape", "Size"):
                continue
            for t in node.inputs:
                if t is not None and t.name and t.name not in self.const:
                    direct.add(self.find(t.name))
        # A QuantizeLinear is its producer writing the quantized type (no storage, no work of its
        # own) unless, as built, its input is stored as it is for another reader or is quantized
        # already: then it converts (a requantisation a mixed plan adds; priced on the vector engine).
        for node in graph.nodes:
            if node.op != "QuantizeLinear" or not node.inputs or not node.outputs:
                continue
            i, o = self.find(node.inputs[0].name), self.find(node.outputs[0].name)
            out_code = dtype_code(node.outputs[0].dtype)
            if pricing == "as-built" and (i in qtype or i in direct):
                self.conversions.add(id(node))
                qtype.setdefault(o, out_code)
                continue
            flags_o = (qtype.pop(o, None), o in direct)
            self._join(node.inputs[0].name, node.outputs[0].name)
            r = self.find(i)
            qtype[r] = out_code if flags_o[0] is None else flags_o[0]
            if flags_o[1]:
                direct.add(r)
        self.quantized = set(qtype)
        self.real: set[str] = set()   # classes of real numbers: float in the graph, or quantized
        for name, t in tensors.items():
            r = self.find(name)
            if r in self.code:
                continue
            graph_code = dtype_code(tensors[r].dtype if tensors[r].dtype is not None else t.dtype)
            if pr.is_float_type(graph_code) or r in qtype:
                self.real.add(r)
            if pricing == "as-built" or (not pr.is_float_type(graph_code) and r not in qtype):
                self.code[r] = qtype.get(r, graph_code)
            elif r in self.const:
                self.code[r] = pr.weight_type(pricing)
            else:
                self.code[r] = pr.act_type(pricing)

    def _join(self, into: str, name: str) -> None:
        """Put ``name``'s class into ``into``'s (the producer's side keeps the class name)."""
        a, b = self.find(into), self.find(name)
        if a != b:
            self.root[b] = a

    def converts(self, node: gs.Node) -> bool:
        """Whether ``node`` is a conversion between precisions the NPU does (a requantising
        QuantizeLinear; Casts between types are priced by the placement's own rule)."""
        return id(node) in self.conversions

    # tensors -----------------------------------------------------------------------------------
    def find(self, name: str) -> str:
        """The class (stored tensor) ``name`` belongs to."""
        while name in self.root:
            name = self.root[name]
        return name

    def of(self, t: gs.Tensor) -> str:
        """The element type ``t`` is stored at."""
        return self.code.get(self.find(t.name), dtype_code(t.dtype))

    def is_const(self, t: gs.Tensor) -> bool:
        return self.find(t.name) in self.const

    # ops ---------------------------------------------------------------------------------------
    def op_precision(self, node: gs.Node) -> str | None:
        """The precision ``node`` computes at: the what-if precision, else the one ``quantize``
        recorded; for a graph edgefc did not quantize (an FP32 build, a model quantized
        elsewhere), the precision its operands' stored types make (None: no float operand)."""
        if self.pricing != "as-built":
            return self.pricing if self.operand_types(node) else None
        recorded = pr.op_precision(node)
        if recorded is not None:
            return recorded
        return pr.operand_precision(self.operand_types(node))

    def operand_types(self, node: gs.Node) -> list[str]:
        """Stored types of the operands that set an op's precision: its activation inputs and the
        weight of a tensor op; constant parameters (biases, vector ops' constants) do not count."""
        codes = []
        weight = pr.WEIGHT_INPUT.get(node.op)
        for i, t in enumerate(node.inputs):
            if t is None or not t.name:
                continue
            if self.is_const(t) and i != weight:
                continue
            if self.find(t.name) in self.real:
                codes.append(self.of(t))
        return codes

    def rate_key(self, node: gs.Node) -> str:
        """The ``[tensor.rate]`` key a tensor op (Conv, MatMul, Gemm and the fused forms) is priced
        at: from its recorded precision (weights x activations, or activations x activations when
        its second operand is not a constant), else from its operands' stored types."""
        w, x = node.inputs[1], node.inputs[0]
        recorded = pr.op_precision(node) if self.pricing == "as-built" else None
        if recorded is not None:
            return pr.precision_rate_key(recorded, self.is_const(w))
        return pr.rate_key(self.of(w), self.of(x))

    def attention_act_type(self, node: gs.Node) -> str:
        """Element type of an attention block's Q, K, V and output: its recorded precision's
        activation type, else the stored type of Q."""
        recorded = pr.op_precision(node) if self.pricing == "as-built" else None
        if recorded is not None:
            return pr.act_type(recorded)
        return self.of(node.inputs[0])

    def attention_types(self, node: gs.Node) -> tuple[str, str]:
        """(activations, softmax internals) of an attention block: the internals are its
        activations' type unless ``quantize`` recorded them wider (a W8A8 attention's INT16
        scores, ``edgefc.scores``); "" means the activations' type."""
        scores = pr.metadata(node).get(pr.SCORES_KEY, "") if self.pricing == "as-built" else ""
        return self.attention_act_type(node), scores

    def bias(self, node: gs.Node, t: gs.Tensor) -> str:
        """A tensor-engine bias: INT32 when the op runs at an integer precision, else its stored type."""
        return "int32" if self.op_precision(node) in pr.INTEGER_PRECISIONS else self.of(t)
