"""Data, metrics and ONNX Runtime measurement."""
