"""Fuzz cases: mutated ONNX models and mutated data, generated from a fixed seed.

A Case is plain bytes plus a command line: `write(root)` lays its files out in a fresh folder and
`argv(root)` gives the `hirelc-onnx` arguments that read them. The same seed gives the same cases.
"""
from __future__ import annotations

import io
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.defs
import onnx.helper
import onnx.parser
from onnx import numpy_helper

import onnx.backend.test as _bt

__all__ = ["Case", "ONNX_MUTATIONS", "DATA_MUTATIONS", "base_models", "generate", "quick_cases", "SQUEEZENET"]

SQUEEZENET = Path(_bt.__file__).parent / "data" / "light" / "light_squeezenet.onnx"

# a small conv classifier (N, 3, 8, 8) -> 10 whose input fits image folders and .npz alike
_TINY = """
<ir_version: 8, opset_import: ["" : OPSET]>
tinyconv (float[N, 3, 8, 8] x) => (float[N, 10] y) {
    c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, cw, cb)
    r = Relu(c)
    p = GlobalAveragePool(r)
    f = Flatten(p)
    y = Gemm(f, gw, gb)
}
"""


@dataclass(frozen=True)
class Case:
    """One fuzz input and the command that reads it.

    files: relative path -> bytes (a `folder/` key with b"" makes an empty folder).
    args: the command line with {root} standing for the case's folder.
    hang: the case is expected to hit the product's own plugin time bound (run in a subprocess).
    """

    id: str
    tool: str
    kind: str
    files: dict[str, bytes] = field(hash=False)
    args: tuple[str, ...]
    hang: bool = False

    def write(self, root: Path) -> list[Path]:
        """Lay the files out under `root`; returns the input files (to hash before and after)."""
        paths = []
        for rel, data in self.files.items():
            p = root / rel
            if rel.endswith("/"):
                p.mkdir(parents=True, exist_ok=True)
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            paths.append(p)
        return paths

    def argv(self, root: Path) -> list[str]:
        return [a.replace("{root}", str(root)) for a in self.args]


# ---------------------------------------------------------------- base models

def tiny_model(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """The text-built conv classifier at `opset`, random weights, ir_version fitted to the opset."""
    model = onnx.parser.parse_model(_TINY.replace("OPSET", str(opset)))
    model.ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    rng = np.random.default_rng(seed)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "cw"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "cb"),
        numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "gw"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "gb"),
    ])
    if model.ir_version < 4:  # before IR 4 every initializer must also be a graph input
        model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                 for t in model.graph.initializer)
    return model


def base_models() -> dict[str, onnx.ModelProto]:
    """The models every mutation starts from: the tiny text model and the onnx wheel's light squeezenet."""
    return {"tiny": tiny_model(), "squeezenet": onnx.load(str(SQUEEZENET))}


# ---------------------------------------------------------------- ONNX mutations

def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def _truncated(m: onnx.ModelProto, rng: random.Random) -> bytes:
    data = m.SerializeToString()
    return data[: rng.randrange(1, len(data))]


def _byte_flips(m: onnx.ModelProto, rng: random.Random) -> bytes:
    data = bytearray(m.SerializeToString())
    for _ in range(rng.choice((1, 2, 4, 16, 64))):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _wrong_dtype(m: onnx.ModelProto, rng: random.Random) -> bytes:
    m = _copy(m)
    t = rng.choice(list(m.graph.initializer))
    choices = [d for d in (onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE, onnx.TensorProto.UINT8,
                           onnx.TensorProto.STRING, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16,
                           onnx.TensorProto.BOOL, onnx.TensorProto.INT4, 0, 99) if d != t.data_type]
    t.data_type = rng.choice(choices)
    return m.SerializeToString()


def _dims_disagree(m: onnx.ModelProto, rng: random.Random) -> bytes:
    m = _copy(m)
    big = [t for t in m.graph.initializer if t.dims]
    t = rng.choice(big)
    i = rng.randrange(len(t.dims))
    t.dims[i] = rng.choice((t.dims[i] * 2, t.dims[i] + 1, 0, max(1, t.dims[i] // 2)))
    if rng.random() < 0.3:
        t.dims.append(3)
    return m.SerializeToString()


def _dangling_input(m: onnx.ModelProto, rng: random.Random) -> bytes:
    m = _copy(m)
    node = rng.choice([n for n in m.graph.node if n.input])
    node.input[rng.randrange(len(node.input))] = "fuzz_ghost_tensor"
    return m.SerializeToString()


def _duplicate_names(m: onnx.ModelProto, rng: random.Random) -> bytes:
    m = _copy(m)
    nodes = list(m.graph.node)
    how = rng.choice(("node", "output", "initializer"))
    if how == "node" or len(nodes) < 2:
        for n in rng.sample(nodes, min(2, len(nodes))):
            n.name = "fuzz_same_name"
    elif how == "output":
        a, b = rng.sample(range(len(nodes)), 2)
        nodes[b].output[0] = nodes[a].output[0]
    else:
        m.graph.initializer.append(m.graph.initializer[0])
    return m.SerializeToString()


def _cycle(m: onnx.ModelProto, rng: random.Random) -> bytes:
    m = _copy(m)
    nodes = list(m.graph.node)
    late = rng.randrange(1, len(nodes))
    early = rng.randrange(0, late)
    nodes[early].input[0] = nodes[late].output[0]
    return m.SerializeToString()


def _unknown_domain(m: onnx.ModelProto, rng: random.Random) -> bytes:
    m = _copy(m)
    node = rng.choice(list(m.graph.node))
    node.domain = "com.fuzz.unknown"
    if rng.random() < 0.5:
        m.opset_import.append(onnx.helper.make_opsetid("com.fuzz.unknown", 1))
    return m.SerializeToString()


def _absurd_dims(m: onnx.ModelProto, rng: random.Random) -> bytes:
    """Spatial input dims of ~10^6 each: the graph claims ~10^15 MACs per sample."""
    m = _copy(m)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    side = rng.choice((2_000_000, 5_000_000, 30_000_000))
    for d in list(dims)[2:]:
        d.Clear()
        d.dim_value = side
    del m.graph.value_info[:]
    for out in m.graph.output:
        out.type.tensor_type.ClearField("shape") if rng.random() < 0.5 else None
    return m.SerializeToString()


def _clean(m: onnx.ModelProto, rng: random.Random) -> bytes:
    return m.SerializeToString()


ONNX_MUTATIONS: dict[str, Callable[[onnx.ModelProto, random.Random], bytes]] = {
    "truncated": _truncated, "byte-flips": _byte_flips, "wrong-dtype": _wrong_dtype,
    "dims-disagree": _dims_disagree, "dangling-input": _dangling_input, "duplicate-names": _duplicate_names,
    "cycle": _cycle, "unknown-domain": _unknown_domain, "absurd-dims": _absurd_dims, "clean": _clean,
}


# ---------------------------------------------------------------- data mutations

def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _good_x(rng: np.random.Generator, n: int = 24) -> np.ndarray:
    return rng.standard_normal((n, 3, 8, 8)).astype(np.float32)


def _png(rng: np.random.Generator, size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _npz_case(kind: str, rng: np.random.Generator) -> dict[str, bytes]:
    x, y = _good_x(rng), rng.integers(0, 10, 24)
    if kind == "npz-wrong-shape":
        x = rng.standard_normal(_pick(rng, [(24, 1, 8, 8), (24, 3, 9, 8), (24, 192), (24,), (3, 8, 8)])).astype(np.float32)
    elif kind == "npz-wrong-dtype":
        x = _pick(rng, [x.astype(np.complex64), x > 0, x.astype(np.float16), (x * 50).astype(np.int8),
                        np.full(x.shape, "a"), x.astype(np.uint64)])
    elif kind == "npz-nan":
        x[rng.integers(0, 24, 5)] = np.nan
    elif kind == "npz-inf":
        x[rng.integers(0, 24, 5), 0] = np.inf if rng.random() < 0.5 else -np.inf
    elif kind == "npz-empty":
        x, y = x[:0], y[:0]
    elif kind == "npz-pickled":
        buf = io.BytesIO()
        np.savez(buf, x=np.array([x[0], "x"], dtype=object), y=y)
        return {"data.npz": buf.getvalue()}
    elif kind == "npz-bad-labels":
        y = _pick(rng, [y[:5], y.astype(np.float32) + 0.5, y + 1000, -y - 1, np.stack([y, y], 1)])
    elif kind == "npz-no-x":
        return {"data.npz": _npz(inputs=x, y=y)}
    elif kind == "npz-truncated":
        data = _npz(x=x, y=y)
        return {"data.npz": data[: int(rng.integers(1, len(data)))]}
    elif kind == "npz-not-zip":
        return {"data.npz": bytes(rng.integers(0, 256, 200, dtype=np.uint8))}
    return {"data.npz": _npz(x=x, y=y)}


def _images_case(kind: str, rng: np.random.Generator) -> dict[str, bytes]:
    files = {f"imgs/{c}/{i}.png": _png(rng) for c in ("cat", "dog") for i in range(4)}
    victim = f"imgs/{_pick(rng, ['cat', 'dog'])}/{int(rng.integers(0, 4))}.png"
    if kind == "images-zero-byte":
        files[victim] = b""
    elif kind == "images-corrupt":
        files[victim] = bytes(rng.integers(0, 256, 300, dtype=np.uint8))
    elif kind == "images-truncated":
        files[victim] = files[victim][: len(files[victim]) // 2]
    elif kind == "images-empty-folder":
        return {"imgs/": b""}
    return files


_PLUGINS = {
    "plugin-raises": "def load():\n    raise RuntimeError('fuzz plugin exploded')\n",
    "plugin-hangs": "import time\n\ndef load():\n    time.sleep(3600)\n",
    "plugin-import-raises": "raise ValueError('fuzz import failed')\n\ndef load():\n    pass\n",
    "plugin-garbage": "def load():\n    return {'x': [[1, 2], [3]]}\n",
    "plugin-exits": "import sys\n\ndef load():\n    sys.exit(3)\n",
}

DATA_MUTATIONS = (
    "npz-ok", "npz-wrong-shape", "npz-wrong-dtype", "npz-nan", "npz-inf", "npz-empty", "npz-pickled",
    "npz-bad-labels", "npz-no-x", "npz-truncated", "npz-not-zip",
    "images-ok", "images-zero-byte", "images-corrupt", "images-truncated", "images-empty-folder",
    *_PLUGINS,
)


def _data_files(kind: str, case_id: str, rng: np.random.Generator) -> tuple[dict[str, bytes], str]:
    """(files, --data spec) for a data mutation."""
    if kind.startswith("npz"):
        return _npz_case(kind, rng), "{root}/data.npz"
    if kind.startswith("images"):
        return _images_case(kind, rng), "{root}/imgs"
    module = "fuzzplug_" + case_id.replace("-", "_")
    return {f"{module}.py": _PLUGINS[kind].encode()}, f"{module}:load"


# ---------------------------------------------------------------- cases

def _model_args(tool: str, out: bool = True) -> tuple[str, ...]:
    if tool == "inspect":
        return ("inspect", "{root}/model.onnx", "--no-groups")
    if tool == "compress":
        return ("compress", "{root}/model.onnx", "--method", "uniform", "--bits", "4", "--out", "{root}/out")
    return ("evaluate", "{root}/model.onnx", "--data", "{root}/data.npz")


def onnx_case(i: int, base: str, mutation: str, tool: str, rng: random.Random,
              models: dict[str, onnx.ModelProto]) -> Case:
    case_id = f"{i:04d}-{tool}-{base}-{mutation}"
    files = {"model.onnx": ONNX_MUTATIONS[mutation](models[base], rng)}
    if tool == "evaluate":
        nrng = np.random.default_rng(rng.randrange(2**32))
        shape = (24, 3, 8, 8) if base == "tiny" else (4, 3, 224, 224)
        files["data.npz"] = _npz(x=nrng.standard_normal(shape).astype(np.float32), y=nrng.integers(0, 10, shape[0]))
    return Case(case_id, tool, f"onnx:{mutation}", files, _model_args(tool))


def opset_case(i: int, opset: int, tool: str) -> Case:
    files = {"model.onnx": tiny_model(opset).SerializeToString()}
    if tool == "evaluate":
        rng = np.random.default_rng(opset)
        files["data.npz"] = _npz(x=_good_x(rng), y=rng.integers(0, 10, 24))
    return Case(f"{i:04d}-{tool}-opset{opset}", tool, "onnx:opset", files, _model_args(tool))


def data_case(i: int, kind: str, tool: str, rng: random.Random) -> Case:
    case_id = f"{i:04d}-{tool}-{kind}"
    nrng = np.random.default_rng(rng.randrange(2**32))
    files, spec = _data_files(kind, case_id, nrng)
    files["model.onnx"] = tiny_model().SerializeToString()
    if tool == "evaluate":
        args = ("evaluate", "{root}/model.onnx", "--data", spec)
    else:  # compress with data: uniform measures accuracy on the held-out split
        args = ("compress", "{root}/model.onnx", "--method", "uniform", "--bits", "4", "--data", spec,
                "--out", "{root}/out")
    return Case(case_id, tool, f"data:{kind}", files, args, hang=kind == "plugin-hangs")


def _opsets() -> list[int]:
    return list(range(7, onnx.defs.onnx_opset_version() + 1))


def generate(n: int, seed: int = 0) -> Iterator[Case]:
    """`n` cases cycling over every mutation, tool and base model, each with its own sub-seed."""
    rng = random.Random(seed)
    models = base_models()
    onnx_kinds = [(b, m, t) for m in ONNX_MUTATIONS for b in models for t in ("inspect", "compress", "evaluate")]
    data_kinds = [(k, t) for k in DATA_MUTATIONS for t in ("evaluate", "compress")]
    opsets = [(o, t) for o in _opsets() for t in ("inspect", "compress", "evaluate")]
    seen = Counter()
    for i in range(n):
        sub = random.Random(rng.randrange(2**32))
        slot = i % 10
        family = "onnx" if slot < 6 else "data" if slot < 9 else "opset"
        k = seen[family]
        seen[family] += 1
        if family == "onnx":
            base, mutation, tool = onnx_kinds[k % len(onnx_kinds)]
            yield onnx_case(i, base, mutation, tool, sub, models)
        elif family == "data":
            kind, tool = data_kinds[k % len(data_kinds)]
            yield data_case(i, kind, tool, sub)
        else:
            opset, tool = opsets[k % len(opsets)]
            yield opset_case(i, opset, tool)


def quick_cases(seed: int = 0) -> list[Case]:
    """The few dozen cases `make test` runs: every mutation once, spread over the tools."""
    rng = random.Random(seed)
    models = base_models()
    cases: list[Case] = []
    tools = ("inspect", "compress", "evaluate")
    for j, mutation in enumerate(ONNX_MUTATIONS):
        cases.append(onnx_case(len(cases), "tiny", mutation, tools[j % 3], random.Random(rng.randrange(2**32)), models))
        cases.append(onnx_case(len(cases), "squeezenet", mutation, tools[(j + 1) % 3],
                               random.Random(rng.randrange(2**32)), models))
    # the absurd dims once through compress: its latency feed must be refused, not allocated
    cases.append(onnx_case(len(cases), "tiny", "absurd-dims", "compress", random.Random(1), models))
    for j, kind in enumerate(DATA_MUTATIONS):
        cases.append(data_case(len(cases), kind, "evaluate", random.Random(rng.randrange(2**32))))
    opsets = _opsets()
    for j, opset in enumerate((opsets[0], 11, 13, opsets[-1])):
        cases.append(opset_case(len(cases), opset, tools[j % 3]))
    return cases
