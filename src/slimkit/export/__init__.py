"""Deployment back ends: the pickle-free artifact (``artifact.py``), ONNX fp32 / QDQ int8 (``onnx.py``) and
ONNX Runtime sessions (``runtime.py``). Back ends read models and artifacts; they never import algorithms."""
