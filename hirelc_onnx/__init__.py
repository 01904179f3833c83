"""hirelc-onnx: compress ONNX models by RL-searched pruning and quantization, emitted as real ONNX."""
from hirelc_onnx.config import CompressionConfig, KernelConfig
from hirelc_onnx.errors import UserError

__all__ = ["CompressionConfig", "KernelConfig", "UserError"]
__version__ = "0.1.0"
