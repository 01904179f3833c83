"""Turn a user's data spec (.npz, image folder, built-in name, plugin) into a Dataset that fits the model."""
from __future__ import annotations

import importlib
import logging
import os
import re
import threading
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from hirelc_onnx.errors import DataError
from hirelc_onnx.evaluate.data import SINGLE_INPUT, Dataset, is_class_labels, load_digits

__all__ = [
    "IMAGE_SUFFIXES",
    "BUILTIN_DATASETS",
    "ImageOptions",
    "load_data",
    "load_npz",
    "load_image_folder",
    "check_fits",
    "dataset_from_python",
    "InputSpec",
    "graph_inputs",
    "import_plugin",
    "call_plugin",
    "plugin_timeout",
    "PLUGIN_TIMEOUT_ENV",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
BUILTIN_DATASETS = {"digits": load_digits}
_PLUGIN_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SPEC_HELP = "expected a .npz file, an image folder, 'digits' or package.module:func"
PLUGIN_TIMEOUT_ENV = "HIRELC_PLUGIN_TIMEOUT"
_DEFAULT_PLUGIN_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ImageOptions:
    """How image files become model input; the defaults follow the model's input shape.

    Pixels (0-255) become `pixel * scale + offset`, then `(x - mean) / std` per channel when
    mean/std are given. So ImageNet torchvision style is scale=1/255 with mean/std, and
    EfficientNet-lite's (x - 127) / 128 is scale=1/128, offset=-127/128.

    resize: an int resizes the shorter side (keeping aspect), an (H, W) pair resizes exactly.
        Default: the shorter side to the model's input size, then a center crop to it.
    center_crop: crop the middle (H, W) (an int means square) after resizing.
    channels: 1 (grayscale) or 3; default from the model input, else 3.
    channel_order: "rgb" or "bgr" (OpenCV-trained models).
    layout: "nchw" or "nhwc"; default from the model input (channels of 1 or 3 last means nhwc).
    """

    resize: int | tuple[int, int] | None = None
    center_crop: int | tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1.0 / 255.0
    offset: float = 0.0
    channels: int | None = None
    channel_order: str = "rgb"
    layout: str | None = None

    @classmethod
    def from_opts(cls, opts: dict[str, Any]) -> "ImageOptions":
        """Build from keyword options, refusing unknown names so typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise DataError(f"unknown data option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        o = cls(**opts)
        if o.channel_order not in ("rgb", "bgr"):
            raise DataError(f"channel_order must be 'rgb' or 'bgr', got {o.channel_order!r}")
        if o.layout not in (None, "nchw", "nhwc"):
            raise DataError(f"layout must be 'nchw' or 'nhwc', got {o.layout!r}")
        if o.channels not in (None, 1, 3):
            raise DataError(f"channels must be 1 or 3, got {o.channels!r}")
        if o.std is not None and any(s == 0 for s in o.std):
            raise DataError("std must not contain 0")
        return o


def load_data(spec: str, input_shape: tuple | None = None, **opts: Any) -> Dataset:
    """Load `spec` as a Dataset; with `input_shape` (a single-input model's) images are sized to it and the shape is checked.

    spec: a .npz file (one array per model input named after it, or `x` for a single-input model;
    optional labels `y`), a folder of class sub-folders (labels from the sorted folder names), a
    folder of unlabelled images, a built-in name ('digits'), or a plugin `package.module:func`
    returning a Dataset, x, (x, y), a dict of input arrays (labels under 'y'), or batches of these.
    opts: ImageOptions fields; they apply to image folders only. The dataset records them
    (`preprocessing`) for the report.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    set_opts = {k: v for k, v in opts.items() if v is not None}
    if path.is_dir():
        options = ImageOptions.from_opts(set_opts)
        ds = load_image_folder(path, input_shape, options)
    else:
        if set_opts:
            raise DataError(f"option(s) {', '.join(sorted(set_opts))} apply to image folders only, not {spec!r}")
        if path.is_file():
            if path.suffix.lower() != ".npz":
                raise DataError(f"cannot read {spec}: {_SPEC_HELP}")
            ds = load_npz(path)
        elif spec in BUILTIN_DATASETS:
            ds = BUILTIN_DATASETS[spec]()
        elif _PLUGIN_RE.match(spec):
            ds = _load_plugin(spec)
        else:
            raise DataError(f"data not found: {spec} ({_SPEC_HELP})")
    if len(ds) == 0:
        raise DataError(f"data {spec!r} is empty")
    if input_shape is not None and len(ds.inputs) == 1:
        _check_shape(ds.name, ds.x.shape, input_shape)
    shapes = ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in ds.inputs.items())
    log.info("loaded %s: %s, %s", ds.name, shapes, _label_kind(ds.y))
    return ds


def _label_kind(y: np.ndarray | None) -> str:
    if y is None:
        return "unlabelled"
    if is_class_labels(y):
        return "class labels"
    return f"labels {y.dtype} {y.shape[1:] or ''} for a metric only".replace("  ", " ")


def load_npz(path: str | Path) -> Dataset:
    """One array per model input (named after it; `x` for a single-input model) and optional labels `y` (no pickles)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise DataError(f"cannot read {path} as .npz: not a zip archive (save it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path} holds pickled object arrays, which are refused (a pickle can run code); "
                            "save inputs and y as numeric (or fixed-width string) arrays") from exc
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    y = arrays.pop("y", None)
    if not arrays:
        raise DataError(f"{path} has no input arrays (only y); save one array per model input, named after it, "
                        "or x= for a single-input model")
    return _make_dataset(arrays, y, path.stem)


def load_image_folder(path: str | Path, input_shape: tuple | None = None, options: ImageOptions | None = None) -> Dataset:
    """Images in class sub-folders (label = index in sorted folder names) or directly in `path`."""
    path = Path(path)
    options = options or ImageOptions()
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_files = {d.name: _image_files(d) for d in subdirs}
    if any(class_files.values()):
        classes = sorted(class_files)
        for name in classes:
            if not class_files[name]:
                log.warning("class folder %s has no images; its label index %d stays reserved", name, classes.index(name))
        if _image_files(path):
            log.warning("%s: images next to the class folders are ignored", path)
        files = [(f, i) for i, name in enumerate(classes) for f in class_files[name]]
        log.info("%s: %d classes %s", path, len(classes), classes)
    else:
        files = [(f, None) for f in _image_files(path)]
    if not files:
        raise DataError(f"no images in {path} (looked for {', '.join(IMAGE_SUFFIXES)} directly and in sub-folders)")

    channels, layout, size = _image_target(input_shape, options)
    arrays = [_read_image(f, channels, size, options) for f, _ in files]
    odd = next((j for j, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
    if odd is not None:
        raise DataError(
            f"images differ in size ({files[0][0].name} is {_hw(arrays[0])}, {files[odd][0].name} is {_hw(arrays[odd])}); "
            "give resize / center_crop"
        )
    x = np.stack(arrays).astype(np.float32) * np.float32(options.scale) + np.float32(options.offset)
    if options.mean is not None:
        x = x - np.asarray(options.mean, dtype=np.float32)
    if options.std is not None:
        x = x / np.asarray(options.std, dtype=np.float32)
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    labels = [lbl for _, lbl in files]
    y = None if labels[0] is None else np.asarray(labels, dtype=np.int64)
    preprocessing = {"kind": "image folder", "layout": layout, "channels": channels,
                     "resize": list(size) if options.resize is None and options.center_crop is None and size
                     else options.resize, "center_crop": options.center_crop, "scale": options.scale,
                     "offset": options.offset, "mean": options.mean, "std": options.std,
                     "channel_order": options.channel_order}
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), y, path.name, preprocessing)


def _hw(a: np.ndarray) -> str:
    return f"{a.shape[0]}x{a.shape[1]}"


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_target(input_shape: tuple | None, o: ImageOptions) -> tuple[int, str, tuple[int, int] | None]:
    """(channels, layout, (H, W) or None) from explicit options, else the model's input shape."""
    channels, layout, size = o.channels, o.layout, None
    if input_shape is not None and len(input_shape) == 4:
        dims = list(input_shape)
        if layout is None:
            layout = "nhwc" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "nchw"
        c, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
        if channels is None and isinstance(c, int) and c > 0:
            if c not in (1, 3):
                raise DataError(f"the model takes {c}-channel input; images give 1 or 3 channels")
            channels = c
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            size = (h, w)
    elif input_shape is not None:
        raise DataError(f"image folders feed 4-D input (N, C, H, W); the model takes {_fmt_shape(input_shape)}")
    return channels or 3, layout or "nchw", size


def _read_image(f: Path, channels: int, size: tuple[int, int] | None, o: ImageOptions) -> np.ndarray:
    """One image as (H, W, C) float32 pixels 0-255, resized and cropped."""
    from PIL import Image

    try:
        with Image.open(f) as im:
            im.load()
            im = im.convert("L" if channels == 1 else "RGB")
    except Exception as exc:  # PIL raises several types for broken files
        raise DataError(f"cannot read image {f}: {exc}") from exc
    resize, crop = o.resize, o.center_crop
    if resize is None and crop is None and size is not None:
        resize, crop = min(size), size
    if resize is not None:
        if isinstance(resize, int):
            w, h = im.size
            s = resize / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        else:
            im = im.resize((int(resize[1]), int(resize[0])), Image.BILINEAR)
    if crop is not None:
        ch, cw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
        w, h = im.size
        if ch > h or cw > w:
            raise DataError(f"image {f} is {h}x{w} after resizing, smaller than the crop {ch}x{cw}")
        left, top = (w - cw) // 2, (h - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
    a = np.asarray(im, dtype=np.float32)
    a = a[:, :, None] if a.ndim == 2 else a
    return a[:, :, ::-1] if o.channel_order == "bgr" and a.shape[2] == 3 else a


def import_plugin(spec: str, what: str, error: type[Exception] = DataError) -> Any:
    """Import `package.module:attr` (the user's sys.path applies), raising `error` in one line."""
    if not _PLUGIN_RE.match(spec):
        raise error(f"{what} plugin must look like package.module:func, got {spec!r}")
    modname, attr = spec.split(":")
    try:
        obj = call_plugin(importlib.import_module, (modname,), spec, f"importing {what} plugin", error)
    except error:
        raise
    except ImportError as exc:
        raise error(f"cannot import {what} plugin module {modname!r}: {exc}") from exc
    except Exception as exc:  # the user's module failed while importing
        log.debug("importing %s raised", modname, exc_info=True)
        raise error(f"{what} plugin module {modname!r} failed on import: {type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{what} plugin {spec!r}: {modname} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def plugin_timeout() -> float:
    """Seconds a plugin may take to import or return: $HIRELC_PLUGIN_TIMEOUT, else 600."""
    raw = os.environ.get(PLUGIN_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return _DEFAULT_PLUGIN_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise DataError(f"{PLUGIN_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise DataError(f"{PLUGIN_TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


def call_plugin(fn: Any, args: tuple, spec: str, what: str, error: type[Exception] = DataError) -> Any:
    """`fn(*args)` for a user's plugin, bounded by plugin_timeout(): a plugin that hangs is an error.

    The call runs in a daemon thread, so a hung plugin cannot keep the process alive after the
    error; its exception (if any) is raised here, for the caller to word.
    """
    timeout = plugin_timeout()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the calling thread
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"plugin {spec}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise error(f"{what} {spec!r} did not return within {timeout:g} s; "
                    f"set {PLUGIN_TIMEOUT_ENV} to allow longer")
    exc = box.get("error")
    if isinstance(exc, SystemExit):
        raise error(f"{what} {spec!r} called sys.exit({exc.code!r})")
    if exc is not None:
        raise exc
    return box.get("value")


def _load_plugin(spec: str) -> Dataset:
    fn = import_plugin(spec, "data")
    if not callable(fn):
        raise DataError(f"data plugin {spec!r} is not callable")
    try:
        out = call_plugin(fn, (), spec, "data plugin")
    except DataError:
        raise
    except Exception as exc:  # the user's code: one line, traceback under -v
        log.debug("data plugin %s raised", spec, exc_info=True)
        raise DataError(f"data plugin {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    return _from_plugin_output(out, spec)


def _from_plugin_output(out: Any, spec: str) -> Dataset:
    return dataset_from_python(out, f"the output of data plugin {spec!r}", spec.split(":")[1])


def dataset_from_python(out: Any, what: str = "data", name: str = "data") -> Dataset:
    """A Dataset from Python objects: a Dataset, x, (x, y), a dict of input arrays (labels under 'y'),
    (dict, y), or an iterable of batches of these (concatenated).

    what: how errors name the source (a plugin, or `data=` of the Python API); name: the dataset's name.
    """
    if isinstance(out, Dataset):
        return _make_dataset(out.inputs, out.y, out.name)
    if isinstance(out, np.ndarray):
        return _make_dataset(out, None, name)
    if isinstance(out, dict):
        inputs = {k: v for k, v in out.items() if k != "y"}
        if not inputs:
            raise DataError(f"{what} is a dict without input arrays (keys: {', '.join(map(str, out))})")
        return _make_dataset(inputs, out.get("y"), name)
    if isinstance(out, tuple) and 1 <= len(out) <= 2 and (
            isinstance(out[0], dict) or isinstance(out[0], np.ndarray) and out[0].ndim >= 1):
        if len(out) == 1 or out[1] is None or isinstance(out[1], (np.ndarray, list)):
            return _make_dataset(out[0], out[1] if len(out) == 2 else None, name)
    if isinstance(out, Iterable) and not isinstance(out, (str, bytes)):
        xs: list[dict[str, np.ndarray]] = []
        ys: list[np.ndarray | None] = []
        for i, batch in enumerate(out):
            if isinstance(batch, Dataset):
                bx, by = batch.inputs, batch.y
            elif isinstance(batch, dict):
                bx, by = {k: v for k, v in batch.items() if k != "y"}, batch.get("y")
            elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                bx, by = batch
            else:
                bx, by = batch, None
            bx = dict(bx) if isinstance(bx, dict) else {SINGLE_INPUT: bx}
            if ys and (by is None) != (ys[-1] is None):
                raise DataError(f"{what}: batch {i} {'lacks' if by is None else 'has'} labels unlike batch 0")
            if xs and set(bx) != set(xs[0]):
                raise DataError(f"{what}: batch {i} has inputs {', '.join(bx)} unlike batch 0 ({', '.join(xs[0])})")
            try:
                xs.append({k: np.asarray(v) for k, v in bx.items()})
                ys.append(None if by is None else np.asarray(by))
            except ValueError as exc:  # a ragged batch
                raise DataError(f"{what}: batch {i} is not a rectangular array ({exc})") from exc
        if not xs:
            raise DataError(f"{what} yielded no batches")
        try:
            inputs = {k: np.concatenate([b[k] for b in xs]) for k in xs[0]}
            y = None if ys[0] is None else np.concatenate(ys)
        except ValueError as exc:
            raise DataError(f"{what}: batches differ in shape ({exc})") from exc
        return _make_dataset(inputs, y, name)
    raise DataError(f"{what} is of type {type(out).__name__}; expected a Dataset, x, (x, y), "
                    "a dict of input arrays or batches of these")


def _make_dataset(inputs: Any, y: Any, name: str) -> Dataset:
    """Validate raw arrays: numeric inputs with one batch axis of one length, float64 narrowed; labels checked."""
    if not isinstance(inputs, dict):
        inputs = {SINGLE_INPUT: inputs}
    arrays = {}
    for key, value in inputs.items():
        what = "x" if key == SINGLE_INPUT else f"input {key!r}"
        a = _numeric(value, what, name, allow_bool=True)
        if a.ndim == 0:
            raise DataError(f"{name}: {what} is a scalar; it needs a leading batch axis")
        arrays[str(key)] = a.astype(np.float32) if a.dtype == np.float64 else a
    lengths = {k: len(a) for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"{name}: input arrays differ in length ({', '.join(f'{k} {n}' for k, n in lengths.items())}); "
                        "every input needs one row per sample")
    n = next(iter(lengths.values()))
    if y is not None:
        y = _labels(y, n, name)
    return Dataset(arrays, y, name)


def _numeric(a: Any, what: str, name: str, allow_bool: bool = False) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except ValueError as exc:  # ragged nested lists
        raise DataError(f"{name}: {what} is not a rectangular array ({exc})") from exc
    if arr.dtype == np.bool_ and allow_bool:
        return arr
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(f"{name}: {what} has dtype {arr.dtype}; it must be numeric (integers or floats)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # no calibration, training or score survives them
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise DataError(f"{name}: {what} holds {bad} NaN or infinite value(s) of {arr.size}; clean the data first")
    return arr


def _labels(y: Any, n: int, name: str) -> np.ndarray:
    """Labels of any dtype numpy saves without pickle, one row per sample.

    Integer (and integer-valued float) 1-D labels are class indices, as int64; anything else
    (fractional floats, strings, boxes) is kept as it is, for a metric only."""
    try:
        y = np.asarray(y)
    except ValueError as exc:
        raise DataError(f"{name}: labels y are not a rectangular array ({exc})") from exc
    if y.dtype == object or y.dtype.kind == "V":
        raise DataError(f"{name}: labels y have dtype {y.dtype}; give numbers or fixed-width strings")
    if y.ndim == 0:
        raise DataError(f"{name}: labels y are a scalar; they need one row per sample")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if len(y) != n:
        raise DataError(f"{name}: {n} inputs but {len(y)} labels")
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    return y


def _fmt_shape(shape: Sequence) -> str:
    dims = [str(d) if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else "?") for d in shape]
    if dims and not (isinstance(shape[0], int) and shape[0] > 0):
        dims[0] = "N"
    return "(" + ", ".join(dims) + ")"


def _fits_shape(got: Sequence[int], want: Sequence) -> bool:
    """Equal rank and every fixed non-batch model dim equal; symbolic dims (str/None/<=0) match anything."""
    return len(want) == len(got) and all(
        not (isinstance(w, int) and w > 0) or w == g for w, g in zip(list(want)[1:], list(got)[1:])
    )


def _check_shape(name: str, got: Sequence[int], want: Sequence) -> None:
    if not _fits_shape(got, want):
        raise DataError(
            f"data {name!r} does not fit the model: expected input shape {_fmt_shape(want)}, "
            f"got {_fmt_shape((None,) + tuple(got[1:]))}"
        )


@dataclass(frozen=True)
class InputSpec:
    """One graph input as data must feed it: name, dims (ints fixed; str/None/<=0 symbolic) and numpy dtype."""

    name: str
    shape: tuple
    dtype: np.dtype


_ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
                  onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT8: np.int8,
                  onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT16: np.int16,
                  onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.INT32: np.int32,
                  onnx.TensorProto.UINT32: np.uint32, onnx.TensorProto.INT64: np.int64,
                  onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_}


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller feeds (graph inputs that are not initializers), in graph order."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(i.name, dims, np.dtype(_ONNX_TO_NUMPY.get(tt.elem_type, np.float32))))
    return specs


def _match_inputs(ds: Dataset, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The dataset's arrays keyed by the graph's input names, in graph order (a single input may go by `x`)."""
    have = ds.inputs
    if len(specs) == 1:
        want = specs[0].name
        if want in have:
            key = want
        elif SINGLE_INPUT in have:
            key = SINGLE_INPUT
        else:
            raise DataError(f"data {ds.name!r} has no array 'x' (or {want!r}, the model's input name) "
                            f"(found: {', '.join(have)}); save the inputs as x= and labels as y=")
        ignored = sorted(set(have) - {key})
        if ignored:
            log.warning("%s: array(s) %s are no model input; ignored", ds.name, ", ".join(ignored))
        return {want: have[key]}
    missing = [s.name for s in specs if s.name not in have]
    if missing:
        raise DataError(f"data {ds.name!r} has no array {missing[0]!r} for the model input of that name "
                        f"(found: {', '.join(have)}; the model takes {', '.join(s.name for s in specs)}); "
                        "save one array per input, named after it")
    ignored = sorted(set(have) - {s.name for s in specs})
    if ignored:
        log.warning("%s: array(s) %s are no model input; ignored", ds.name, ", ".join(ignored))
    return {s.name: have[s.name] for s in specs}


def _cast_input(a: np.ndarray, spec: InputSpec, name: str, what: str) -> np.ndarray:
    """`a` as the input's dtype: floats narrow, integers widen or narrow when their values fit; floats into
    integers (token ids, masks) are refused, never rounded."""
    want = spec.dtype
    if a.dtype == want:
        return a
    if want.kind == "f":
        if a.dtype.kind not in "fiub":
            raise DataError(f"data {name!r}: {what} is {a.dtype} but the model takes {want}")
        if a.dtype.kind != "f":
            log.info("casting %s %s from %s to %s", name, what, a.dtype, want)
        return a.astype(want)
    if want.kind in "iub" and a.dtype.kind in "iub":
        if a.size and want.kind != "b":
            info = np.iinfo(want)
            lo, hi = int(a.min()), int(a.max())
            if lo < info.min or hi > info.max:
                raise DataError(f"data {name!r}: {what} holds values in [{lo}, {hi}], outside the model's {want}")
        elif a.size and want.kind == "b" and not np.isin(a, (0, 1)).all():
            raise DataError(f"data {name!r}: {what} is {a.dtype} with values other than 0/1 but the model takes bool")
        return a.astype(want)
    kind = "integer" if want.kind in "iu" else "boolean"
    raise DataError(f"data {name!r}: {what} is {a.dtype} but the model takes {want}; give {kind} data")


def check_fits(
    ds: Dataset, model_inputs: Sequence, model_input_dtype: Any = None, num_classes: int | None = None
) -> Dataset:
    """Raise DataError unless `ds` fits the model; return it keyed by the model's input names, cast to their dtypes.

    model_inputs: the model's InputSpecs (graph_inputs / OrtRunner.input_specs), or, for a
        single-input model, its dims (ints fixed, str/None/<=0 symbolic) with `model_input_dtype`
        (None: float32). The batch axis is free (a fixed batch is handled by the runner).
        float64 narrows to float32, integers go into float inputs; floats into an integer input
        are refused.
    num_classes: when given, class labels must lie in [0, num_classes).
    """
    if model_inputs and all(isinstance(s, InputSpec) for s in model_inputs):
        specs = list(model_inputs)
    else:
        specs = [InputSpec(next(iter(ds.inputs)) if len(ds.inputs) == 1 else SINGLE_INPUT, tuple(model_inputs),
                           np.dtype(np.float32 if model_input_dtype is None else model_input_dtype))]
    matched = _match_inputs(ds, specs)
    arrays = {}
    for spec in specs:
        what = "x" if len(specs) == 1 else f"input {spec.name!r}"
        a = _numeric(matched[spec.name], what, ds.name, allow_bool=spec.dtype.kind == "b")
        if len(specs) == 1:
            _check_shape(ds.name, a.shape, spec.shape)
        elif not _fits_shape(a.shape, spec.shape):
            raise DataError(f"data {ds.name!r} does not fit the model: input {spec.name!r} expects shape "
                            f"{_fmt_shape(spec.shape)}, got {_fmt_shape((None,) + tuple(a.shape[1:]))}")
        arrays[spec.name] = _cast_input(a, spec, ds.name, what)
    lengths = {k: len(a) for k, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise DataError(f"data {ds.name!r}: input arrays differ in length "
                        f"({', '.join(f'{k} {n}' for k, n in lengths.items())})")
    y = ds.y
    if y is not None:
        y = _labels(y, len(next(iter(arrays.values()))), ds.name)
        if num_classes is not None and len(y) and is_class_labels(y):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise DataError(
                    f"data {ds.name!r} has labels in [{lo}, {hi}] but the model has {num_classes} outputs (0..{num_classes - 1})"
                )
    same = list(arrays) == list(ds.inputs) and all(arrays[k] is ds.inputs[k] for k in arrays)
    if same and y is ds.y:
        return ds
    return Dataset(arrays, y, ds.name, ds.preprocessing)
