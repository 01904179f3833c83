"""hirelc-onnx: compress ONNX models by RL-searched pruning and quantization, emitted as real ONNX.

From Python: `hirelc_onnx.compress(model_path, data=..., budget="6x", out_dir=...)` returns a
`CompressResult`; every error a caller can cause is a `UserError` (subclasses below).
`hirelc_onnx.compress` is the function: the module of that name is `sys.modules["hirelc_onnx.compress"]`.
"""
from hirelc_onnx.compress import CompressResult, compress
from hirelc_onnx.config import CompressionConfig, ConfigError, KernelConfig
from hirelc_onnx.errors import (BudgetError, DataError, InvalidOptionError, ModelLoadError, NothingToCompressError,
                                UserError)
from hirelc_onnx.evaluate.data import Dataset
from hirelc_onnx.progress import ProgressFn

__all__ = ["compress", "CompressResult", "Dataset", "CompressionConfig", "KernelConfig", "ProgressFn",
           "UserError", "InvalidOptionError", "ModelLoadError", "DataError", "BudgetError", "ConfigError",
           "NothingToCompressError"]
__version__ = "0.1.0"
