"""ONNX graph rewrites (mechanism only): never imports hirelc_onnx."""
