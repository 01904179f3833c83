"""The torch bridge: onnx2torch import, exact fake quantization, the distillation training engine and
its users (fine-tuning, sparsity), write-back, Fisher.

torch and onnx2torch are imported only inside this package; everything else in hirelc_onnx
works on ONNX protos and numpy.
"""
from hirelc_onnx.bridge.convert import BridgeError, Binding, bindings, parameter_map, to_torch, torch_threads
from hirelc_onnx.bridge.fake_quant import FakeQuant, apply_fake_quant, fake_quantize_tensor, remove_fake_quant
from hirelc_onnx.bridge.finetune import FinetuneResult, FinetuneSettings, finetune, quant_specs
from hirelc_onnx.bridge.fisher import FisherResult, fisher_sensitivity
from hirelc_onnx.bridge.writeback import write_back

__all__ = [
    "BridgeError",
    "Binding",
    "to_torch",
    "bindings",
    "parameter_map",
    "torch_threads",
    "FakeQuant",
    "fake_quantize_tensor",
    "apply_fake_quant",
    "remove_fake_quant",
    "finetune",
    "quant_specs",
    "FinetuneResult",
    "FinetuneSettings",
    "fisher_sensitivity",
    "FisherResult",
    "write_back",
]
