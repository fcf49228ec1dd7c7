"""What a model is fed: the one ``InputSpec``, and seeded inputs for calibration and checks.

Generic inputs (standard-normal floats, integers in [0, 1000), all-true booleans) suit any model.
Realistic ones - latents, timesteps spanning the schedule, CLIP token ids (paper Sec. 4.2's
calibration data) - are Stable Diffusion knowledge, which lives with the companion models:
``edgefc.models`` registers a generator per component here (:func:`register_component_inputs`),
and the core finds it by the component's name, so the compiler never imports the models (and
needs no torch: the generators are numpy only). DESIGN.md "Repository layout".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from edgefc import ir


class InputSpec(NamedTuple):
    """One model input: name, shape (None, or -1 per dimension, where not static) and numpy dtype."""

    name: str
    shape: tuple[int, ...] | None
    dtype: np.dtype

    @property
    def static(self) -> bool:
        return self.shape is not None and all(d >= 0 for d in self.shape)


def input_specs(model: onnx.ModelProto | gs.Graph) -> list[InputSpec]:
    """The spec of each real graph input (initializers excluded), in the graph's order."""
    if isinstance(model, gs.Graph):
        return [InputSpec(t.name, ir.static_shape(t), np.dtype(t.dtype)) for t in model.inputs]
    init = {t.name for t in model.graph.initializer}
    specs = []
    for i in model.graph.input:
        if i.name in init:
            continue
        tt = i.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        specs.append(InputSpec(i.name, shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


#: generic integer inputs are drawn from [0, INT_RANGE) (timesteps, token ids), or below the size
#: of the table they index (:func:`index_bound`).
INT_RANGE = 1000
_VIEW_OPS = {"Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}


def index_bound(graph: gs.Graph, name: str) -> int | None:
    """Rows of the smallest constant table the input ``name`` indexes (``Gather`` with constant
    data, through casts and reshapes), or None: a generated index must stay below it."""
    frontier = [t for t in graph.inputs if t.name == name]
    seen, bound = set(), None
    while frontier:
        t = frontier.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for c in t.outputs:
            if c.op == "Gather" and len(c.inputs) > 1 and c.inputs[1] is t and isinstance(c.inputs[0], gs.Constant):
                rows = int(c.inputs[0].shape[int(c.attrs.get("axis", 0))])
                bound = rows if bound is None else min(bound, rows)
            elif c.op in _VIEW_OPS:
                frontier.extend(c.outputs)
    return bound


def random_input(spec: InputSpec, rng: np.random.Generator, bound: int | None = None) -> np.ndarray:
    """A generic input: integers in [0, min(bound, INT_RANGE)) (timesteps, token ids), all-true
    booleans, else standard-normal values."""
    if np.issubdtype(spec.dtype, np.integer):
        high = INT_RANGE if bound is None else max(1, min(bound, INT_RANGE))
        return rng.integers(0, high, size=spec.shape).astype(spec.dtype)
    if spec.dtype == np.bool_:
        return np.ones(spec.shape, dtype=bool)
    return rng.standard_normal(spec.shape).astype(spec.dtype)


# --- per-component generators (filled by edgefc.models) -----------------------------------------

#: fill(sample index, spec, rng) -> an array for that input, or None for a generic one
Fill = Callable[[int, InputSpec, np.random.Generator], "np.ndarray | None"]
#: make(graph, specs, n, rng, evenly) -> (fill, what to add to the description)
MakeInputs = Callable[[gs.Graph, list[InputSpec], int, np.random.Generator, bool], tuple[Fill, dict]]
#: domain(graph) -> (input name, every value it takes) or None
Domain = Callable[[gs.Graph], "tuple[str, list[int]] | None"]

_GENERATORS: dict[str, tuple[MakeInputs, Domain | None]] = {}
_PROVIDER = "edgefc.models"  # imported on first lookup, as the pass registry imports edgefc.passes


def register_component_inputs(component: str, make: MakeInputs, domain: Domain | None = None) -> None:
    """Register how to make realistic inputs for ``component`` (and, optionally, an input whose
    whole domain calibration can enumerate). Registering a component twice is an error."""
    if component in _GENERATORS:
        raise ValueError(f"inputs for component '{component}' are already registered")
    _GENERATORS[component] = (make, domain)


def _lookup(component: str | None) -> tuple[MakeInputs, Domain | None] | None:
    if component is None:
        return None
    if component not in _GENERATORS:
        importlib.import_module(_PROVIDER)
    return _GENERATORS.get(component)


def generate(graph: gs.Graph, component: str | None, n: int, seed: int, *, evenly: bool = False,
             specs: Iterable[InputSpec] | None = None) -> tuple[list[dict], dict]:
    """``n`` seeded input dicts (the component's generator where one is registered, generic inputs
    for the rest) and a description (``source``, ``seed``, ``samples`` and what the generator adds).
    ``evenly``: spread what a generator would draw (held-out inputs). Inputs must be static."""
    specs = list(specs if specs is not None else input_specs(graph))
    rng = np.random.default_rng(seed)
    info: dict = {"source": "generated", "seed": seed, "samples": n}
    found = _lookup(component)
    fill, extra = found[0](graph, specs, n, rng, evenly) if found else (None, {})
    bounds = {s.name: index_bound(graph, s.name) for s in specs
              if np.issubdtype(s.dtype, np.integer) and isinstance(graph, gs.Graph)}
    samples = []
    for i in range(n):
        sample = {}
        for s in specs:
            a = fill(i, s, rng) if fill is not None else None
            sample[s.name] = a if a is not None else random_input(s, rng, bounds.get(s.name))
        samples.append(sample)
    info.update(extra)
    return samples, info


def input_domain(graph: gs.Graph, component: str | None) -> tuple[str, list[int]] | None:
    """An input of ``component`` whose whole domain calibration can enumerate (the U-Net's
    timestep, 0..999), or None."""
    found = _lookup(component)
    return found[1](graph) if found and found[1] is not None else None
