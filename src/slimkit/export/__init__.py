"""Deployment back ends: the pickle-free artifact (``artifact.py``), ONNX fp32 / QDQ int8 / dynamic int8 (``onnx.py``
over ``onnx_static.py`` and ``onnx_dynamic.py``), PyTorch's x86 int8 kernels (``torch_int8.py``) and ONNX Runtime
sessions (``runtime.py``). Back ends read models and artifacts; they never import algorithms: algorithms register
handlers for their layers in ``registry.py`` (float twin, integer view, packing), which back ends look up."""
