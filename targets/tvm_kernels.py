"""The NPU's kernels, as numpy reference implementations (DESIGN.md "TVM lowering").

``KERNELS`` maps a Relax operator to ``fn(args, attrs, out_shape, out_dtype) -> ndarray | tuple``:
conv2d, matmul, attention (one tile or a whole block), norms, softmax, elementwise and
reduction ops, int16/int8 quantize/dequantize, and the data movement the NPU does (reshape,
transpose, slices, concat, split, nearest resize). FP16 is computed in FP32 accumulators.
``targets/tvm_runtime.py`` executes NPU programs with them; ``kernel_rejects`` says which calls
of a supported operator a kernel cannot take (layouts, modes, dynamic shapes), which the TVM
partition checks against the Program's placement.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from edgefc import attention

# the dtype a fused composite keeps an intermediate value in (fp32 accumulators for fp16)
_ACC = {"float16": "float32"}


# ----------------------------------------------------------------------------------------------
# numpy kernels: relax op name -> fn(args, attrs, out_shape, out_dtype) -> ndarray | tuple


def _f(x: np.ndarray) -> np.ndarray:
    """Compute dtype: float16 is computed in float32 (fp32 accumulators), others as they are."""
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _erf(x: np.ndarray) -> np.ndarray:
    # erfc by Chebyshev fitting (Numerical Recipes), fractional error < 1.2e-7 everywhere.
    x = np.asarray(x, dtype=np.float64)
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    r = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - r, r - 1.0)


def _sigmoid(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _gelu(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relax.sigmoid": _sigmoid,
    "relax.tanh": lambda x: np.tanh(_f(x)),
    "relax.exp": lambda x: np.exp(_f(x)),
    "relax.sin": lambda x: np.sin(np.asarray(x, np.float64)),
    "relax.cos": lambda x: np.cos(np.asarray(x, np.float64)),
    "relax.log": lambda x: np.log(np.asarray(x, np.float64)),
    "relax.sqrt": lambda x: np.sqrt(_f(x)),
    "relax.rsqrt": lambda x: 1.0 / np.sqrt(_f(x)),
    "relax.erf": _erf,
    "relax.negative": lambda x: -x,
    "relax.abs": np.abs,
    "relax.square": lambda x: _f(x) * _f(x),
    "relax.nn.relu": lambda x: np.maximum(x, 0),
    "relax.nn.silu": lambda x: np.asarray(x, np.float64) * _sigmoid(x),
    "relax.nn.gelu": _gelu,
    "relax.nn.gelu_tanh": _gelu_tanh,
    "relax.isnan": lambda x: np.isnan(x),
}

_BINARY = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.maximum": np.maximum, "relax.minimum": np.minimum,
    "relax.power": np.power, "relax.logical_and": np.logical_and,
}


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axis = [axis] if isinstance(axis, int) else list(axis)
    return tuple(a % ndim for a in axis)


def _reduce(fn):
    def k(args, attrs, shape, dtype):
        x = np.asarray(args[0], dtype=np.float64)
        return fn(x, axis=_axes(attrs.get("axis"), x.ndim), keepdims=bool(attrs.get("keepdims")))
    return k


def _conv2d(args, attrs, shape, dtype):
    x, w = _f(args[0]), _f(args[1])
    if attrs.get("data_layout", "NCHW") != "NCHW" or attrs.get("kernel_layout", "OIHW") != "OIHW":
        raise ValueError("the NPU runtime supports NCHW/OIHW conv2d only")
    sh, sw = attrs["strides"]
    dh, dw = attrs["dilation"]
    pt, pl, pb, pr = attrs["padding"]
    g = int(attrs["groups"])
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    oh, ow = shape[2], shape[3]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    out = np.zeros((n, o, oh, ow), dtype=np.float32)
    og = o // g
    for gi in range(g):
        xs_g = xp[:, gi * cg:(gi + 1) * cg]
        wg = w[gi * og:(gi + 1) * og]
        acc = np.zeros((og, n, oh, ow), dtype=np.float32)
        for i in range(kh):
            for j in range(kw):
                xs = xs_g[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
                acc += np.tensordot(wg[:, :, i, j], xs, axes=([1], [1]))
        out[:, gi * og:(gi + 1) * og] = acc.transpose(1, 0, 2, 3)
    return out


def _matmul(args, attrs, shape, dtype):
    # contiguous operands: numpy only hands contiguous (or simply transposed) blocks to BLAS
    return np.matmul(np.ascontiguousarray(_f(args[0])), np.ascontiguousarray(_f(args[1])))


def _softmax(x, axis):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(args, attrs, shape, dtype):
    x, gamma, beta = (np.asarray(a, dtype=np.float64) for a in args[:3])
    axes = _axes(attrs["axes"], x.ndim)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + attrs["epsilon"])
    if attrs.get("scale", True):
        y = y * gamma
    if attrs.get("center", True):
        y = y + beta
    return y


def _group_norm(args, attrs, shape, dtype):
    x, gamma, beta = (np.asarray(a, dtype=np.float64) for a in args[:3])
    g = int(attrs["num_groups"])
    if int(attrs["channel_axis"]) % x.ndim != 1:
        raise ValueError("the NPU runtime supports channel axis 1 group norm only")
    n, c = x.shape[:2]
    xg = x.reshape(n, g, c // g, *x.shape[2:])
    axes = tuple(range(2, xg.ndim))
    mean = xg.mean(axis=axes, keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=axes, keepdims=True)
    y = ((xg - mean) / np.sqrt(var + attrs["epsilon"])).reshape(x.shape)
    bshape = (1, c) + (1,) * (x.ndim - 2)
    if attrs.get("scale", True):
        y = y * gamma.reshape(bshape)
    if attrs.get("center", True):
        y = y + beta.reshape(bshape)
    return y


def _attention(args, attrs, shape, dtype):
    if len(args) > 3 and args[3] is not None:
        raise ValueError("the NPU runtime does not support attention bias")
    return attention.reference(args[0], args[1], args[2], attrs.get("scale"), attrs.get("causal_mask"))


def _strided_slice(args, attrs, shape, dtype):
    x = args[0]
    axes, begin, end = args[1], args[2], args[3]
    strides = args[4] if len(args) > 4 and args[4] is not None else [1] * len(axes)
    idx = [slice(None)] * x.ndim
    for a, b, e, s in zip(axes, begin, end, strides):
        idx[a % x.ndim] = slice(int(b), int(e), int(s))
    return x[tuple(idx)]


def _split(args, attrs, shape, dtype):
    x = args[0]
    ios = attrs["indices_or_sections"]
    axis = attrs["axis"]
    if isinstance(ios, int):
        return tuple(np.split(x, ios, axis=axis))
    return tuple(np.split(x, list(ios), axis=axis))


def _resize2d(args, attrs, shape, dtype):
    x = args[0]
    if attrs.get("layout", "NCHW") != "NCHW" or attrs.get("method") != "nearest_neighbor":
        raise ValueError("the NPU runtime supports NCHW nearest-neighbour resize only")
    mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    rounding = attrs.get("rounding_method", "round")
    idx = []
    for axis, out_len in ((2, shape[2]), (3, shape[3])):
        in_len = x.shape[axis]
        o = np.arange(out_len, dtype=np.float64)
        scale = out_len / in_len
        if mode == "asymmetric":
            c = o / scale
        elif mode == "half_pixel":
            c = (o + 0.5) / scale - 0.5
        elif mode == "align_corners":
            c = o * (in_len - 1) / (out_len - 1) if out_len > 1 else np.zeros_like(o)
        elif mode == "tf_half_pixel_for_nn":
            c = (o + 0.5) / scale
        else:
            raise ValueError(f"resize coordinate mode {mode} is not supported")
        if rounding == "floor":
            r = np.floor(c)
        elif rounding == "ceil":
            r = np.ceil(c)
        elif rounding == "round_prefer_ceil":
            r = np.floor(c + 0.5)
        elif rounding in ("round_prefer_floor", ""):
            r = np.ceil(c - 0.5)
        elif rounding == "round":
            r = np.where(c >= 0, np.floor(c + 0.5), np.ceil(c - 0.5))
        else:
            raise ValueError(f"resize rounding {rounding} is not supported")
        idx.append(np.clip(r.astype(np.int64), 0, in_len - 1))
    return x[:, :, idx[0][:, None], idx[1][None, :]]


def _qparams(arr, axis, ndim):
    arr = np.asarray(arr)
    if arr.ndim == 0 or arr.size == 1:
        return arr.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = arr.size
    return arr.reshape(shape)


def _quantize(args, attrs, shape, dtype):
    x = np.asarray(args[0], dtype=np.float32)
    scale = _qparams(np.asarray(args[1], dtype=np.float32), attrs["axis"], x.ndim)
    zp = _qparams(np.asarray(args[2], dtype=np.int64), attrs["axis"], x.ndim)
    info = np.iinfo(np.dtype(dtype))
    q = np.rint(x / scale) + zp  # round half to even, like QuantizeLinear
    return np.clip(q, info.min, info.max)


def _dequantize(args, attrs, shape, dtype):
    x = np.asarray(args[0], dtype=np.int64)
    scale = _qparams(np.asarray(args[1], dtype=np.float32), attrs["axis"], x.ndim)
    zp = _qparams(np.asarray(args[2], dtype=np.int64), attrs["axis"], x.ndim)
    return ((x - zp).astype(np.float32) * scale).astype(np.float32)


def _unary(fn):
    return lambda args, attrs, shape, dtype: fn(args[0])


def _binary(fn):
    def k(args, attrs, shape, dtype):
        a, b = args[0], args[1]
        if np.issubdtype(np.asarray(a).dtype, np.floating) or np.issubdtype(np.asarray(b).dtype, np.floating):
            a, b = _f(np.asarray(a)), _f(np.asarray(b))
        return fn(a, b)
    return k


def _squeeze(args, attrs, shape, dtype):
    return args[0].reshape(shape)


KERNELS: dict[str, Callable] = {
    **{op: _unary(fn) for op, fn in _UNARY.items()},
    **{op: _binary(fn) for op, fn in _BINARY.items()},
    "relax.nn.conv2d": _conv2d,
    "relax.matmul": _matmul,
    "relax.nn.attention": _attention,
    "relax.nn.softmax": lambda a, at, s, d: _softmax(a[0], at["axis"]),
    "relax.nn.layer_norm": _layer_norm,
    "relax.nn.group_norm": _group_norm,
    "relax.mean": _reduce(np.mean),
    "relax.variance": _reduce(np.var),
    "relax.sum": _reduce(np.sum),
    "relax.max": _reduce(np.max),
    "relax.min": _reduce(np.min),
    "relax.clip": lambda a, at, s, d: np.clip(a[0], a[1], a[2]),
    "relax.where": lambda a, at, s, d: np.where(a[0], a[1], a[2]),
    "relax.astype": lambda a, at, s, d: a[0],
    "relax.quantize": _quantize,
    "relax.dequantize": _dequantize,
    "relax.reshape": lambda a, at, s, d: a[0].reshape(s),
    "relax.flatten": lambda a, at, s, d: a[0].reshape(s),
    "relax.expand_dims": lambda a, at, s, d: a[0].reshape(s),
    "relax.squeeze": _squeeze,
    "relax.permute_dims": lambda a, at, s, d: np.transpose(a[0], at.get("axes")),
    "relax.broadcast_to": lambda a, at, s, d: np.broadcast_to(a[0], s),
    "relax.strided_slice": _strided_slice,
    "relax.concat": lambda a, at, s, d: np.concatenate(a[0], axis=at["axis"]),
    "relax.split": _split,
    "relax.image.resize2d": _resize2d,
}


# ----------------------------------------------------------------------------------------------
# What a kernel cannot take (checked by the partition; the Program decides placement).


def _tensor_types(expr) -> list:
    from tvm import relax

    ty = expr.ty
    if isinstance(ty, relax.TensorType):
        return [ty]
    if isinstance(ty, relax.TupleType):
        return [f for f in ty.fields if isinstance(f, relax.TensorType)]
    return []


def _arg_tensor_types(arg) -> list:
    from tvm import relax

    if isinstance(arg, relax.Tuple):
        return [t for f in arg.fields for t in _arg_tensor_types(f)]
    if isinstance(arg, relax.ShapeExpr):
        return []
    try:
        return _tensor_types(arg)
    except AttributeError:
        return []


def _static(ty) -> list[int] | None:
    try:
        return [int(d) for d in ty.shape]
    except (TypeError, ValueError, AttributeError):
        return None


def kernel_rejects(call) -> str | None:
    """Why no NPU kernel can execute ``call`` (an operator it has no kernel for, a dynamic shape,
    a layout or mode the kernel does not implement), or None."""
    from tvm import relax

    op = getattr(call.op, "name", None)
    if op is None:
        return "not an operator call"
    if op not in KERNELS:
        return f"no NPU kernel for {op.removeprefix('relax.')}"
    for ty in _tensor_types(call) + [t for a in call.args for t in _arg_tensor_types(a)]:
        if _static(ty) is None:
            return f"{op.removeprefix('relax.')} has a dynamic shape"
    attrs = call.attrs
    if op == "relax.nn.conv2d" and (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW"):
        return "conv2d layout other than NCHW/OIHW"
    if op == "relax.nn.attention" and (attrs.window_size is not None or len(call.args) > 3):
        return "attention with a bias or a sliding window"
    if op == "relax.image.resize2d":
        if attrs.method != "nearest_neighbor" or attrs.layout != "NCHW":
            return f"resize2d {attrs.method} (the NPU resizes by nearest neighbour)"
        if attrs.coordinate_transformation_mode not in ("asymmetric", "half_pixel", "align_corners", "tf_half_pixel_for_nn"):
            return f"resize2d coordinate mode {attrs.coordinate_transformation_mode}"
    if op == "relax.astype" and not isinstance(call.ty, relax.TensorType):
        return "astype of a non-tensor"
    return None
