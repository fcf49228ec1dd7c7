"""The companion models: ONNX export of the Stable Diffusion components (``edgefc export``).

Kept import-light: ``edgefc.models.configs`` is plain data (no torch); ``edgefc.models.export``
imports torch, diffusers and transformers only when a model is built; ``calib_inputs`` (numpy
only) registers the components' calibration inputs with the core (``edgefc.model_inputs``).
"""

from edgefc.models import calib_inputs  # noqa: F401  (registers the components' calibration inputs)
