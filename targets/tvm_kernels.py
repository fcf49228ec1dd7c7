"""The NPU's kernels, as numpy reference implementations (DESIGN.md "TVM lowering").

``KERNELS`` maps a Relax operator to ``fn(args, attrs, out_shape, out_dtype) -> ndarray | tuple``:
conv2d / conv1d and their transposes, matmul, attention (one tile or a whole block), norms,
softmax, pooling (max / average, 1-D and 2-D), elementwise ops and activations (clip, leaky
ReLU, PReLU ...), reductions, int16/int8 quantize/dequantize, and the data movement the NPU does
(reshape, transpose, slices, concat, split, pad, nearest and bilinear resize). FP16 is computed in FP32 accumulators.
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


def _conv1d(args, attrs, shape, dtype):
    """A 1-D convolution as a 2-D one with a unit height (how the NPU runs it)."""
    if attrs.get("data_layout", "NCW") != "NCW" or attrs.get("kernel_layout", "OIW") != "OIW":
        raise ValueError("the NPU runtime supports NCW/OIW conv1d only")
    pl, pr = attrs["padding"]
    at = {"strides": [1, attrs["strides"][0]], "dilation": [1, attrs["dilation"][0]], "padding": [0, pl, 0, pr],
          "groups": attrs["groups"]}
    return _conv2d([args[0][:, :, None, :], args[1][:, :, None, :]], at, [shape[0], shape[1], 1, shape[2]], dtype)[:, :, 0, :]


def _conv2d_transpose(args, attrs, shape, dtype):
    """A transposed convolution: the input spread out by the stride (zeros between), convolved with
    the flipped kernel (inputs and outputs swapped per group), the border cropped by the padding."""
    if attrs.get("data_layout", "NCHW") != "NCHW" or attrs.get("kernel_layout", "IOHW") != "IOHW":
        raise ValueError("the NPU runtime supports NCHW/IOHW conv2d_transpose only")
    x, w = _f(args[0]), _f(args[1])
    n, c, h, wd = x.shape
    sh, sw = attrs["strides"]
    dh, dw = attrs["dilation"]
    pt, pl, _pb, _pr = attrs["padding"]
    g = int(attrs["groups"])
    cg, og, kh, kw = w.shape[0] // g, w.shape[1], w.shape[2], w.shape[3]
    spread = np.zeros((n, c, (h - 1) * sh + 1, (wd - 1) * sw + 1), dtype=x.dtype)
    spread[:, :, ::sh, ::sw] = x
    eh, ew = dh * (kh - 1), dw * (kw - 1)
    full_h, full_w = spread.shape[2] + eh, spread.shape[3] + ew
    oh, ow = shape[2], shape[3]
    extra_h, extra_w = max(0, pt + oh - full_h), max(0, pl + ow - full_w)   # output_padding past the end
    kernel = np.concatenate([np.flip(w[gi * cg:(gi + 1) * cg], (2, 3)).transpose(1, 0, 2, 3) for gi in range(g)])
    full = _conv2d([spread, kernel], {"strides": [1, 1], "dilation": [dh, dw], "padding": [eh, ew, eh + extra_h, ew + extra_w],
                                      "groups": g}, [n, og * g, full_h + extra_h, full_w + extra_w], dtype)
    return full[:, :, pt:pt + oh, pl:pl + ow]


def _conv1d_transpose(args, attrs, shape, dtype):
    if attrs.get("data_layout", "NCW") != "NCW" or attrs.get("kernel_layout", "IOW") != "IOW":
        raise ValueError("the NPU runtime supports NCW/IOW conv1d_transpose only")
    pl, pr = attrs["padding"]
    at = {"strides": [1, attrs["strides"][0]], "dilation": [1, attrs["dilation"][0]], "padding": [0, pl, 0, pr],
          "groups": attrs["groups"], "output_padding": [0, attrs["output_padding"][0]]}
    y = _conv2d_transpose([args[0][:, :, None, :], args[1][:, :, None, :]], at, [shape[0], shape[1], 1, shape[2]], dtype)
    return y[:, :, 0, :]


def _pool(kind: str, spatial: int):
    """Max / average pooling over the last ``spatial`` axes (1 or 2; NCW / NCHW): one pass per
    window tap over the output, as the cost model prices it. Padding takes no part in a maximum;
    an average divides by the taps inside the padded input (``count_include_pad``) or inside the
    input itself."""

    def k(args, attrs, shape, dtype):
        layout = attrs.get("layout", "NCHW" if spatial == 2 else "NCW")
        if layout != ("NCHW" if spatial == 2 else "NCW"):
            raise ValueError(f"the NPU runtime supports {'NCHW' if spatial == 2 else 'NCW'} pooling only")
        x = np.asarray(_f(args[0]), dtype=np.float64)
        size, strides, dil = list(attrs["pool_size"]), list(attrs["strides"]), list(attrs["dilation"])
        pad = list(attrs["padding"])
        before, after = pad[:spatial], pad[spatial:]
        out = list(shape[2:])
        if spatial == 1:
            x, size, strides, dil, before, after, out = (x[:, :, None, :], [1] + size, [1] + strides, [1] + dil,
                                                        [0] + before, [0] + after, [1] + out)
        # pad to the padding, and past it as far as the last window reaches (ceil mode): the
        # part past the padding counts in no average and in no maximum
        reach = [(o - 1) * s + d * (kk - 1) + 1 for o, s, d, kk in zip(out, strides, dil, size)]
        beyond = [max(0, r - (n + b + a)) for r, n, b, a in zip(reach, x.shape[2:], before, after)]
        widths = ((0, 0), (0, 0)) + tuple((b, a + e) for b, a, e in zip(before, after, beyond))
        inside = np.pad(np.ones(x.shape[2:]), widths[2:])                      # 1: the input itself
        padded = np.ones(tuple(n + b + a for n, b, a in zip(x.shape[2:], before, after)))
        counted = np.pad(padded, tuple((0, e) for e in beyond))                # 1: input or padding
        xp = np.pad(x, widths, constant_values=-np.inf if kind == "max" else 0.0)
        acc = np.full(x.shape[:2] + tuple(out), -np.inf if kind == "max" else 0.0)
        count = np.zeros(tuple(out))
        weights = inside if kind == "max" or not attrs.get("count_include_pad") else counted
        for i in range(size[0]):
            for j in range(size[1]):
                sl = (slice(i * dil[0], i * dil[0] + strides[0] * (out[0] - 1) + 1, strides[0]),
                      slice(j * dil[1], j * dil[1] + strides[1] * (out[1] - 1) + 1, strides[1]))
                tap = xp[(slice(None), slice(None)) + sl]
                if kind == "max":
                    acc = np.maximum(acc, tap)
                else:
                    acc = acc + tap
                    count = count + weights[sl]
        y = acc if kind == "max" else acc / np.maximum(count, 1)
        return y[:, :, 0, :] if spatial == 1 else y

    return k


def _pad(args, attrs, shape, dtype):
    x = args[0]
    w = list(attrs["pad_width"])
    widths = tuple((w[2 * i], w[2 * i + 1]) for i in range(x.ndim))
    mode = attrs.get("pad_mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, constant_values=np.asarray(attrs.get("pad_value", 0.0)).astype(x.dtype))
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise ValueError(f"the NPU runtime does not pad in mode {mode}")


def _prelu(args, attrs, shape, dtype):
    x, a = _f(args[0]), _f(args[1])
    axis = int(attrs.get("axis", 1)) % x.ndim
    bshape = [1] * x.ndim
    bshape[axis] = a.size
    return np.where(x < 0, x * a.reshape(bshape), x)


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


_RESIZE_COORDINATES = ("asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners", "tf_half_pixel_for_nn")


def _source_coordinates(mode: str, in_len: int, out_len: int) -> np.ndarray:
    """Where each output position samples the input (ONNX Resize's coordinate transformations)."""
    o = np.arange(out_len, dtype=np.float64)
    scale = out_len / in_len
    if mode == "asymmetric":
        return o / scale
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out_len > 1 else np.zeros_like(o)
    if mode == "align_corners":
        return o * (in_len - 1) / (out_len - 1) if out_len > 1 else np.zeros_like(o)
    if mode == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    raise ValueError(f"resize coordinate mode {mode} is not supported")


def _resize2d(args, attrs, shape, dtype):
    x = args[0]
    method = attrs.get("method")
    if attrs.get("layout", "NCHW") != "NCHW" or method not in ("nearest_neighbor", "linear"):
        raise ValueError("the NPU runtime supports NCHW nearest-neighbour and bilinear resize only")
    mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    rounding = attrs.get("rounding_method", "round")
    if method == "linear":
        # separable: along H, then along W, each output a blend of its two neighbours (clamped)
        y = np.asarray(_f(x), dtype=np.float64)
        for axis, out_len in ((2, shape[2]), (3, shape[3])):
            in_len = y.shape[axis]
            c = np.clip(_source_coordinates(mode, in_len, out_len), 0, in_len - 1)
            lo = np.floor(c).astype(np.int64)
            hi = np.minimum(lo + 1, in_len - 1)
            frac = (c - lo).reshape([-1 if a == axis else 1 for a in range(4)])
            y = np.take(y, lo, axis=axis) * (1 - frac) + np.take(y, hi, axis=axis) * frac
        return y
    idx = []
    for axis, out_len in ((2, shape[2]), (3, shape[3])):
        in_len = x.shape[axis]
        c = _source_coordinates(mode, in_len, out_len)
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
    "relax.nn.conv1d": _conv1d,
    "relax.nn.conv2d_transpose": _conv2d_transpose,
    "relax.nn.conv1d_transpose": _conv1d_transpose,
    "relax.nn.max_pool2d": _pool("max", 2),
    "relax.nn.avg_pool2d": _pool("avg", 2),
    "relax.nn.max_pool1d": _pool("max", 1),
    "relax.nn.avg_pool1d": _pool("avg", 1),
    "relax.nn.pad": _pad,
    "relax.nn.leakyrelu": lambda a, at, s, d: np.where(_f(a[0]) < 0, _f(a[0]) * at["alpha"], _f(a[0])),
    "relax.nn.prelu": _prelu,
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
    if op in ("relax.nn.conv2d", "relax.nn.conv1d") and (attrs.data_layout not in ("NCHW", "NCW")
                                                         or attrs.kernel_layout not in ("OIHW", "OIW")):
        return f"{op.removeprefix('relax.')} layout other than NCHW/OIHW"
    if op in ("relax.nn.conv2d_transpose", "relax.nn.conv1d_transpose") and (
            attrs.data_layout not in ("NCHW", "NCW") or attrs.kernel_layout not in ("IOHW", "IOW")):
        return f"{op.removeprefix('relax.')} layout other than NCHW/IOHW"
    if op.startswith("relax.nn.") and "pool" in op and attrs.layout not in ("NCHW", "NCW"):
        return f"{op.removeprefix('relax.')} layout {attrs.layout}"
    if op == "relax.nn.pad" and attrs.pad_mode not in ("constant", "reflect", "replicate"):
        return f"pad mode {attrs.pad_mode}"
    if op == "relax.nn.attention" and (attrs.window_size is not None or len(call.args) > 3):
        return "attention with a bias or a sliding window"
    if op == "relax.image.resize2d":
        if attrs.method not in ("nearest_neighbor", "linear") or attrs.layout != "NCHW":
            return f"resize2d {attrs.method} (the NPU resizes by nearest neighbour or bilinearly)"
        if attrs.coordinate_transformation_mode not in _RESIZE_COORDINATES:
            return f"resize2d coordinate mode {attrs.coordinate_transformation_mode}"
    if op == "relax.astype" and not isinstance(call.ty, relax.TensorType):
        return "astype of a non-tensor"
    return None
