"""Element types as the cost model and the tiling name them (``fp32``, ``fp16``, ``int16``, ``int8``).

A tensor-engine op's precision (the target's ``[tensor.rate]`` key, e.g. ``int8xint16``) is
built from its operands' codes; byte sizes of deployed tensors come from :data:`DTYPE_BYTES`.
"""

from __future__ import annotations

import numpy as np

DTYPE_BYTES = {"fp64": 8, "fp32": 4, "fp16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "bool": 1}
_NP_CODE = {np.dtype(np.float64): "fp64", np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16",
            np.dtype(np.int64): "int64", np.dtype(np.uint64): "int64", np.dtype(np.int32): "int32",
            np.dtype(np.uint32): "int32", np.dtype(np.int16): "int16", np.dtype(np.uint16): "int16",
            np.dtype(np.int8): "int8", np.dtype(np.uint8): "int8", np.dtype(np.bool_): "bool"}


def dtype_code(dtype) -> str:
    """numpy/onnx dtype -> element type code (fp32, fp16, int16, int8 ...); None -> fp32."""
    if dtype is None:
        return "fp32"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return "fp32"
    if dt in _NP_CODE:
        return _NP_CODE[dt]
    if "bfloat16" in str(dtype) or "float8" in str(dtype):
        return "fp16"
    if dt.kind in "iu":
        return f"int{dt.itemsize * 8}" if dt.itemsize * 8 in (8, 16, 32, 64) else "int32"
    return "fp32"
