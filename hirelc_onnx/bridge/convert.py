"""ONNX -> torch through onnx2torch, and the map from ONNX initializer names to the torch tensors.

The bridge exists so that fine-tuning and Fisher scores can use autograd on the very graph the
passes rewrite; the trained weights go back into the ONNX initializers by name (`write_back`),
never through a re-export. Rules:

  1. The model is brought to opset 17 (onnx's version converter), the newest opset onnx2torch
     reads. A model newer than 17 that cannot be converted, or that uses an op with no opset-17
     form (Gelu-20, Attention-23, ...), is refused with a `BridgeError` naming the op. An older
     model that the converter cannot raise is handed to onnx2torch as it is (it reads old opsets).
  2. onnx2torch is imported with a stub `torchvision` in sys.modules (only its NMS / RoiAlign
     converters need the real one); the stub is removed afterwards, even on error, because left
     in place it breaks torch.onnx's exporter.
  3. Every op is checked against onnx2torch's registry first, and any failure inside onnx2torch
     becomes a `BridgeError` naming the op type, the node and the opset.
  4. Each float initializer is bound to the torch tensor that holds it (`Binding`): Conv /
     ConvTranspose / Linear / LayerNorm / BatchNorm / InstanceNorm parameters by the node's input
     position, every other initializer (MatMul weights, bias Adds, embeddings) through the buffer
     onnx2torch created for it. A bound tensor is checked equal to the initializer. Linear stores
     Gemm's B transposed when transB=0 (`Binding.transposed`). A Gemm with a constant B and
     alpha or beta != 1 is refused: onnx2torch folds alpha into the weight, which could not be
     written back exactly.
  5. onnx2torch makes one buffer per USE of an initializer; uses of the same initializer are
     re-pointed to one buffer so that training keeps them tied.
  6. Float buffers with more than one element become trainable nn.Parameters (weights, biases,
     embeddings); scalars (epsilons, exponents, scale factors) stay frozen buffers.
  7. The module is returned in eval() mode (onnx2torch returns train mode), so BatchNorm and
     Dropout compute what the ONNX graph computes.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from hirelc_onnx.errors import UserError
from passes.normalize import opset_of

__all__ = ["TORCH_OPSET", "BridgeError", "torch_inputs", "Binding", "to_torch", "bindings", "parameter_map", "latent", "onnx_layout",
           "torch_threads"]

log = logging.getLogger(__name__)

TORCH_OPSET = 17
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16)
_BOUND_BY_POSITION = {  # module type -> attribute holding node input i (from 1)
    nn.modules.conv._ConvNd: ("weight", "bias"),
    nn.Linear: ("weight", "bias"),
    nn.LayerNorm: ("weight", "bias"),
    nn.modules.batchnorm._BatchNorm: ("weight", "bias", "running_mean", "running_var"),
    nn.modules.instancenorm._InstanceNorm: ("weight", "bias"),
}
_BINDINGS_ATTR = "onnx_bindings"


class BridgeError(UserError):
    """The model cannot go through the torch bridge; the message names the op and what to do."""


@dataclass(frozen=True)
class Binding:
    """Where one ONNX initializer lives in the converted module.

    path: the owning submodule's dotted path; attr: its parameter or buffer name; transposed:
    the torch tensor is the 2-D initializer transposed (Gemm transB=0 turned into nn.Linear).
    """

    initializer: str
    path: str
    attr: str
    transposed: bool = False

    def owner(self, module: nn.Module) -> nn.Module:
        return module.get_submodule(self.path)



@contextlib.contextmanager
def onnx2torch_imported() -> Iterator[Any]:
    """Import onnx2torch with a temporary stub `torchvision` (removed afterwards, even on error)."""
    stubbed: list[str] = []
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")
        ops.roi_align = None  # type: ignore[attr-defined]
        tv.ops = ops  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
        stubbed = ["torchvision", "torchvision.ops"]
    try:
        import onnx2torch

        yield onnx2torch
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on `n` intra-op threads, restoring the previous count afterwards.

    The bridge's models are small: on a busy 2-core machine two threads measured 5-50x slower
    than one (threads wait on each other), and a fixed count keeps float sums repeatable.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _label(node: onnx.NodeProto) -> str:
    return f"node '{node.name}'" if node.name else "an unnamed node"


def _no_opset17_form(model: onnx.ModelProto, opset: int) -> list[str]:
    """Default-domain ops of `model` that did not exist yet at opset 17."""
    missing = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            onnx.defs.get_schema(node.op_type, TORCH_OPSET, "")
        except onnx.defs.SchemaError:
            missing.append(f"{node.op_type}-{opset} ({_label(node)})")
    return sorted(set(missing))


def _at_opset17(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 17, or as it is when older and not convertible (rule 1)."""
    opset = opset_of(model)
    if opset == TORCH_OPSET:
        return model
    if opset > TORCH_OPSET:
        missing = _no_opset17_form(model, opset)
        if missing:
            raise BridgeError(
                f"onnx2torch reads opset <= {TORCH_OPSET}; {', '.join(missing)} has no opset-{TORCH_OPSET} form. "
                f"Export the model at opset {TORCH_OPSET} (torch.onnx.export(dynamo=False, opset_version=17)).")
    try:
        return onnx.version_converter.convert_version(model, TORCH_OPSET)
    except Exception as exc:  # the C++ converter raises RuntimeError / ConvertError / IndexError
        if opset < TORCH_OPSET:
            log.debug("opset %d kept (version converter failed: %s)", opset, exc)
            return model
        raise BridgeError(f"cannot convert the opset-{opset} model to opset {TORCH_OPSET} for onnx2torch: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _check_registry(model: onnx.ModelProto) -> None:
    """Refuse ops onnx2torch has no converter for, naming the first few (rule 3)."""
    from onnx2torch.node_converters import get_converter

    versions = {o.domain: o.version for o in model.opset_import}
    missing: dict[str, str] = {}
    for node in model.graph.node:
        version = versions.get(node.domain) or (versions.get("ai.onnx") if node.domain == "" else None)
        key = f"{node.domain + '::' if node.domain else ''}{node.op_type}"
        try:
            if version is None:
                raise NotImplementedError
            get_converter(domain=node.domain, operation_type=node.op_type, version=version)
        except NotImplementedError:
            missing.setdefault(key, f"{key} (opset {version}, {_label(node)})")
    if missing:
        raise BridgeError(f"onnx2torch cannot convert {', '.join(missing.values())}; the torch bridge needs an fp32 "
                          f"graph of standard ops at opset <= {TORCH_OPSET} (no QuantizeLinear/DequantizeLinear).")


def _failing_node(exc: BaseException) -> onnx.NodeProto | None:
    """The ONNX node whose converter raised, read from onnx2torch.convert's frame."""
    tb = exc.__traceback__
    node = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "convert" and "onnx2torch" in frame.f_code.co_filename:
            found = frame.f_locals.get("onnx_node")
            node = getattr(found, "proto", node)
        tb = tb.tb_next
    return node


def to_torch(model: onnx.ModelProto) -> nn.Module:
    """Convert a normalised fp32 ONNX model into an eval-mode torch module with bound initializers.

    The module's `onnx_bindings` attribute maps initializer names to `Binding`s; read tensors
    with `parameter_map`. Raises BridgeError when onnx2torch cannot convert the graph.
    """
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") for n in model.graph.node):
        op = next(n for n in model.graph.node if "QuantizeLinear" in n.op_type)
        raise BridgeError(f"onnx2torch cannot convert {op.op_type} (opset {opset_of(model)}, {_label(op)}): "
                          "fine-tune the fp32 graph and quantize afterwards")
    graph_inputs = {i.name for i in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    if inits & graph_inputs:
        raise BridgeError(f"weights given as graph inputs ({sorted(inits & graph_inputs)[0]!r}) cannot be bound; "
                          "run passes.normalize first")
    m17 = _at_opset17(model)
    with onnx2torch_imported() as o2t:
        _check_registry(m17)
        try:
            module = o2t.convert(m17, attach_onnx_mapping=True)
        except Exception as exc:  # converters raise NotImplementedError, KeyError, ValueError, ...
            node = _failing_node(exc)
            where = (f"{node.op_type} (opset {opset_of(m17)}, {_label(node)})" if node is not None
                     else f"the graph (opset {opset_of(m17)})")
            raise BridgeError(f"onnx2torch cannot convert {where}: {type(exc).__name__}: {exc}") from exc
        from onnx2torch.onnx_graph import OnnxGraph, ValueType

        table = _bind(module, OnnxGraph(m17.graph), ValueType.GRAPH_INITIALIZER, model)
    module.eval()
    setattr(module, _BINDINGS_ATTR, table)
    log.debug("converted %d nodes, %d initializers bound", len(m17.graph.node), len(table))
    return module


def _bind(module: nn.Module, graph: Any, initializer_kind: Any, source: onnx.ModelProto) -> dict[str, Binding]:
    """Bind every float initializer of `source` to its tensor in `module` (rules 4-6)."""
    float_inits = {t.name: t for t in source.graph.initializer if t.data_type in _FLOAT_TYPES}
    table: dict[str, Binding] = {}
    buffers: dict[str, list[str]] = {}
    count = 0
    for name, onnx_node in graph.nodes.items():  # the order onnx2torch created buffers in
        sub = module.get_submodule(name)
        mapped = sub.onnx_mapping.inputs
        for value in mapped:
            if graph.value_type(value) == initializer_kind:
                buffers.setdefault(value, []).append(f"onnx_initializer_{count}")
                count += 1
        absorbed = [(i, v) for i, v in enumerate(onnx_node.input_values) if v in float_inits and v not in mapped]
        if not absorbed:
            continue
        owner_path, owner = name, sub
        if isinstance(sub, nn.Sequential):  # Conv with asymmetric padding: (pad, conv)
            owner_path, owner = f"{name}.{len(sub) - 1}", sub[-1]
        attrs = next((a for t, a in _BOUND_BY_POSITION.items() if isinstance(owner, t)), None)
        if attrs is None:
            log.debug("node %s (%s) absorbs %s into %s: not trainable", name, onnx_node.operation_type,
                      [v for _, v in absorbed], type(owner).__name__)
            continue
        transposed = False
        if isinstance(owner, nn.Linear):
            a = onnx_node.attributes
            if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise BridgeError(f"Gemm ({_label(onnx_node.proto)}) has alpha/beta != 1 with constant B: onnx2torch "
                                  "folds them into the weights, which cannot be written back exactly")
            transposed = a.get("transB", 0) == 0
        for i, value in absorbed:
            table[value] = Binding(value, owner_path, attrs[i - 1], transposed and i == 1)
    _tie_buffers(module, buffers)
    for value, names in buffers.items():
        if value in float_inits:
            table[value] = Binding(value, "initializers", names[0])
    _make_trainable(module, table)
    for value, b in table.items():
        expected = numpy_helper.to_array(float_inits[value])
        got = onnx_layout(b, _tensor(b.owner(module), b.attr)).detach().cpu().numpy()
        if got.shape != expected.shape or not np.array_equal(got, expected, equal_nan=True):
            raise BridgeError(f"internal: initializer {value!r} is not where onnx2torch was expected to put it "
                              f"({b.path}.{b.attr})")
    return table


def _tie_buffers(module: nn.Module, buffers: dict[str, list[str]]) -> None:
    """Point every use of an initializer at its first buffer and drop the copies (rule 5)."""
    redirect = {f"initializers.{n}": f"initializers.{names[0]}" for names in buffers.values() for n in names[1:]}
    if not redirect:
        return
    for node in module.graph.nodes:
        if node.op == "get_attr" and node.target in redirect:
            node.target = redirect[node.target]
    container = module.get_submodule("initializers")
    for target in redirect:
        del container._buffers[target.split(".", 1)[1]]
    module.graph.lint()
    module.recompile()


def _make_trainable(module: nn.Module, table: dict[str, Binding]) -> None:
    """Float buffers with more than one element become parameters (rule 6)."""
    for b in table.values():
        if b.path != "initializers":
            continue
        container = module.get_submodule("initializers")
        t = container._buffers.get(b.attr)
        if t is not None and t.is_floating_point() and t.numel() > 1:
            del container._buffers[b.attr]
            container.register_parameter(b.attr, nn.Parameter(t.clone()))


def _tensor(owner: nn.Module, attr: str) -> torch.Tensor:
    """The latent tensor `attr` of `owner`: under a parametrization, its `original`."""
    parametrizations = getattr(owner, "parametrizations", None)
    if parametrizations is not None and attr in parametrizations:
        return parametrizations[attr].original
    return getattr(owner, attr)


def onnx_layout(binding: Binding, tensor: torch.Tensor) -> torch.Tensor:
    """A bound torch tensor viewed in its ONNX initializer's layout."""
    return tensor.t() if binding.transposed else tensor


def bindings(module: nn.Module) -> dict[str, Binding]:
    """The initializer -> Binding table `to_torch` attached to `module`."""
    table = getattr(module, _BINDINGS_ATTR, None)
    if table is None:
        raise BridgeError("this module was not made by hirelc_onnx.bridge.to_torch (no initializer bindings)")
    return table


def latent(module: nn.Module, binding: Binding) -> torch.Tensor:
    """The trainable (latent, not fake-quantized) tensor behind a binding, in torch layout."""
    return _tensor(binding.owner(module), binding.attr)


def parameter_map(module: nn.Module, model: onnx.ModelProto) -> dict[str, torch.Tensor]:
    """ONNX initializer name -> the live torch tensor holding it (the latent weight under fake-quant).

    Tensors are in torch layout: a Gemm weight with transB=0 is its transpose (see `Binding`).
    Only initializers of `model` are listed, and their shapes must agree with the module's.
    """
    table = bindings(module)
    out: dict[str, torch.Tensor] = {}
    for init in model.graph.initializer:
        b = table.get(init.name)
        if b is None:
            continue
        t = latent(module, b)
        if tuple(onnx_layout(b, t).shape) != tuple(init.dims):
            raise BridgeError(f"initializer {init.name!r} has shape {tuple(init.dims)} in the model but "
                              f"{tuple(onnx_layout(b, t).shape)} in the module: they come from different graphs")
        out[init.name] = t
    return out


def torch_inputs(inputs: Any, rows: Any = None) -> list[torch.Tensor]:
    """A converted module's positional inputs from one array (a single-input model) or a mapping of
    arrays in graph-input order (a fitted Dataset's `inputs`), optionally only `rows`.

    Floating arrays become float32; integer and boolean arrays (token ids, masks) keep their dtype:
    a Gather needs integer indices, and an id cast to float loses its meaning."""
    arrays = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    out = []
    for a in arrays:
        a = np.asarray(a if rows is None else a[rows])
        if a.dtype.kind == "f" and a.dtype != np.float32:
            a = a.astype(np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(a)))
    return out
