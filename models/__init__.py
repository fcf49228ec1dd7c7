"""The companion models: ONNX export of the Stable Diffusion components (``edgefc export``).

Kept import-light: ``edgefc.models.configs`` is plain data (no torch); ``edgefc.models.export``
imports torch, diffusers and transformers only when a model is built.
"""
