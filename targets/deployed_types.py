"""Deployed element types of a graph's tensors (PERFORMANCE.md "Byte sizes: the deployed types").

:class:`DeployedTypes` gives every tensor the type it has when deployed -- the graph's own, or the
quantized type behind a QuantizeLinear/DequantizeLinear, or a what-if precision's -- and says
which tensors are weights. The lowering prices bytes with it; the placement checks element types
against the target's ``tensor.dtypes`` with it; the operand precision of a tensor op comes from it.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from edgefc.dtypes import dtype_code
from edgefc.targets.geometry import is_float
from edgefc.targets.placement import ALIAS_OPS

# what-if precision -> (weight type, activation type) of float tensors
WHAT_IF = {"fp32": ("fp32", "fp32"), "fp16": ("fp16", "fp16"), "w8a16": ("int8", "int16"), "w8a8": ("int8", "int8")}


class DeployedTypes:
    """Deployed element type of every tensor, and which tensors are weights (compile-time data).

    Tensors joined by alias ops (Reshape, Squeeze, Q/DQ, ...) form one class that shares one
    storage and one type: in ``as-built`` the quantized type when the class passes through a
    QuantizeLinear/DequantizeLinear, else the graph's dtype; with a what-if precision every float
    activation takes the activation type and every float weight the weight type.
    """

    def __init__(self, graph: gs.Graph, precision: str):
        self.precision = precision
        self.root: dict[str, str] = {}
        self.const: set[str] = set()
        self.code: dict[str, str] = {}
        self.quantized: set[str] = set()
        tensors = graph.tensors()
        for name, t in tensors.items():
            if isinstance(t, gs.Constant):
                self.const.add(name)
        for node in graph.nodes:
            ins = [t for t in node.inputs if t is not None and t.name]
            if node.op in ALIAS_OPS | {"Cast", "Transpose"} and ins and all(self.find(t.name) in self.const for t in ins):
                for o in node.outputs:
                    self.const.add(o.name)
            if node.op in ALIAS_OPS and ins:
                for o in node.outputs:
                    self.root[o.name] = self.find(ins[0].name)
        qtype: dict[str, str] = {}
        for node in graph.nodes:
            if node.op == "QuantizeLinear" and node.outputs:
                qtype[self.find(node.outputs[0].name)] = dtype_code(node.outputs[0].dtype)
            elif node.op == "DequantizeLinear" and node.inputs:
                qtype[self.find(node.inputs[0].name)] = dtype_code(node.inputs[0].dtype)
        self.quantized = set(qtype)
        for name, t in tensors.items():
            r = self.find(name)
            if r in self.code:
                continue
            graph_code = dtype_code(tensors[r].dtype if tensors[r].dtype is not None else t.dtype)
            if precision == "as-built" or (not is_float(graph_code) and r not in qtype):
                self.code[r] = qtype.get(r, graph_code)
            elif r in self.const:
                self.code[r] = WHAT_IF[precision][0]
            else:
                self.code[r] = WHAT_IF[precision][1]

    def find(self, name: str) -> str:
        while name in self.root:
            name = self.root[name]
        return name

    def of(self, t: gs.Tensor) -> str:
        return self.code.get(self.find(t.name), dtype_code(t.dtype))

    def is_const(self, t: gs.Tensor) -> bool:
        return self.find(t.name) in self.const

    def bias(self, t: gs.Tensor) -> str:
        """A tensor-engine bias: INT32 in integer precisions, else the weights' float type."""
        return "int32" if self.precision in ("w8a16", "w8a8") else self.of(t)
