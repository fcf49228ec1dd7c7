"""Errors a user can cause.

Every error a user can trigger (a bad file, an unknown pass, a dynamic shape with no ``--shape``,
a target file with a missing field ...) is an :class:`EdgefcError` subclass carrying one clear
sentence. The CLI prints ``error: <sentence>`` and exits with status 2; it never shows a traceback
for these. Anything else escaping is a bug in edgefc.
"""


class EdgefcError(Exception):
    """Base class of every user-facing edgefc error (CLI exit status 2)."""


class ModelLoadError(EdgefcError):
    """The model file is missing, not ONNX, truncated, or its external data is missing/unsafe."""


class ShapeError(EdgefcError):
    """An input shape is dynamic with no ``--shape`` given, or a ``--shape`` is malformed."""


class PassError(EdgefcError):
    """An unknown or duplicate pass, bad pass options, or a pass that cannot apply."""


class InternalError(PassError):
    """A pass raised an unexpected exception (a bug in edgefc or in a plugin pass, or a model the
    pass does not handle). Reported like a user error, as one line naming the pass and, where
    known, the node, so that a compile never ends in a traceback; the corpus test counts it as a
    crash."""


class VerificationError(EdgefcError):
    """``--verify`` found a pass whose output differs from the original model."""


class TargetError(EdgefcError):
    """An unknown target, or a target description with a missing or mistyped field."""


class ExportError(EdgefcError):
    """Model export failed for a reason the user can fix (bad weights folder, bad size)."""


class QuantizationError(EdgefcError):
    """Bad calibration data or quantization options."""


class QualityFloorError(QuantizationError):
    """A quantized build measures below its quality floor (``--min-sqnr``) on its evaluation inputs."""


class BuildError(EdgefcError):
    """A build folder is missing or incomplete, or a lowering cannot proceed."""


class OutputError(EdgefcError):
    """An output path that cannot be written (a missing or unwritable folder, a file where a
    folder is needed, /proc ...), or a folder ``-o`` must not write into (not an edgefc build and
    no ``--force``, or one that would replace the input model)."""
