"""Engines: a model bundle turned into something that runs (ONNX Runtime, PyTorch, TensorRT)."""
