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

from hirelc_onnx.errors import DataError
from hirelc_onnx.evaluate.data import Dataset, load_digits

__all__ = [
    "IMAGE_SUFFIXES",
    "BUILTIN_DATASETS",
    "ImageOptions",
    "load_data",
    "load_npz",
    "load_image_folder",
    "check_fits",
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
    """Load `spec` as a Dataset; with `input_shape` images are sized to it and the shape is checked.

    spec: a .npz file (arrays `x`, optional `y`), a folder of class sub-folders (labels from the
    sorted folder names), a folder of unlabelled images, a built-in name ('digits'), or a plugin
    `package.module:func` returning a Dataset, x, (x, y), or an iterable of batches.
    opts: ImageOptions fields; they apply to image folders only.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    set_opts = {k: v for k, v in opts.items() if v is not None}
    if path.is_dir():
        ds = load_image_folder(path, input_shape, ImageOptions.from_opts(set_opts))
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
    if input_shape is not None:
        _check_shape(ds.name, ds.x.shape, input_shape)
    log.info("loaded %s: x %s %s, %s", ds.name, ds.x.shape, ds.x.dtype, "labelled" if ds.y is not None else "unlabelled")
    return ds


def load_npz(path: str | Path) -> Dataset:
    """Arrays `x` and optional `y` from a .npz file (no pickles)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise DataError(f"cannot read {path} as .npz: not a zip archive (save it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if "x" not in names:
                found = ", ".join(names) if names else "no arrays"
                raise DataError(f"{path} has no array 'x' (found: {found}); save inputs as x= and labels as y=")
            x = z["x"]
            y = z["y"] if "y" in names else None
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path} holds pickled object arrays, which are refused (a pickle can run code); "
                            "save x and y as numeric arrays") from exc
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    return _make_dataset(x, y, path.stem)


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
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), y, path.name)


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
    """Accept a Dataset, x, (x, y), a dict with x/y, or an iterable of such batches."""
    name = spec.split(":")[1]
    if isinstance(out, Dataset):
        return _make_dataset(out.x, out.y, out.name)
    if isinstance(out, np.ndarray):
        return _make_dataset(out, None, name)
    if isinstance(out, dict):
        if "x" not in out:
            raise DataError(f"data plugin {spec!r} returned a dict without 'x'")
        return _make_dataset(out["x"], out.get("y"), name)
    if isinstance(out, tuple) and 1 <= len(out) <= 2 and isinstance(out[0], np.ndarray) and out[0].ndim >= 1:
        if len(out) == 1 or out[1] is None or isinstance(out[1], (np.ndarray, list)):
            return _make_dataset(out[0], out[1] if len(out) == 2 else None, name)
    if isinstance(out, Iterable) and not isinstance(out, (str, bytes)):
        xs, ys = [], []
        for i, batch in enumerate(out):
            if isinstance(batch, Dataset):
                bx, by = batch.x, batch.y
            elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                bx, by = batch
            else:
                bx, by = batch, None
            if ys and (by is None) != (ys[-1] is None):
                raise DataError(f"data plugin {spec!r}: batch {i} {'lacks' if by is None else 'has'} labels unlike batch 0")
            xs.append(np.asarray(bx))
            ys.append(None if by is None else np.asarray(by).reshape(-1))
        if not xs:
            raise DataError(f"data plugin {spec!r} yielded no batches")
        try:
            x = np.concatenate(xs)
        except ValueError as exc:
            raise DataError(f"data plugin {spec!r}: batches differ in shape ({exc})") from exc
        return _make_dataset(x, None if ys[0] is None else np.concatenate(ys), name)
    raise DataError(f"data plugin {spec!r} returned {type(out).__name__}; expected a Dataset, x, (x, y) or batches")


def _make_dataset(x: Any, y: Any, name: str) -> Dataset:
    """Validate raw arrays: numeric x with a batch axis, float64 narrowed, labels as int64."""
    x = _numeric(x, "x", name)
    if x.ndim == 0:
        raise DataError(f"{name}: x is a scalar; it needs a leading batch axis")
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    if y is not None:
        y = _labels(y, len(x), name)
    return Dataset(x, y, name)


def _numeric(a: Any, what: str, name: str) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except ValueError as exc:  # ragged nested lists
        raise DataError(f"{name}: {what} is not a rectangular array ({exc})") from exc
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(f"{name}: {what} has dtype {arr.dtype}; it must be numeric (integers or floats)")
    return arr


def _labels(y: Any, n: int, name: str) -> np.ndarray:
    y = _numeric(y, "y", name)
    if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise DataError(f"{name}: labels y must be 1-D class indices, got shape {y.shape}")
    y = y.reshape(-1)
    if len(y) != n:
        raise DataError(f"{name}: {n} inputs but {len(y)} labels")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{name}: labels y must be integer class indices, got non-integer values")
    return y.astype(np.int64)


def _fmt_shape(shape: Sequence) -> str:
    dims = [str(d) if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else "?") for d in shape]
    if dims and not (isinstance(shape[0], int) and shape[0] > 0):
        dims[0] = "N"
    return "(" + ", ".join(dims) + ")"


def _check_shape(name: str, got: Sequence[int], want: Sequence) -> None:
    """Equal rank and every fixed non-batch model dim equal; symbolic dims (str/None/<=0) match anything."""
    fits = len(want) == len(got) and all(
        not (isinstance(w, int) and w > 0) or w == g for w, g in zip(list(want)[1:], list(got)[1:])
    )
    if not fits:
        raise DataError(
            f"data {name!r} does not fit the model: expected input shape {_fmt_shape(want)}, "
            f"got {_fmt_shape((None,) + tuple(got[1:]))}"
        )


def check_fits(
    ds: Dataset, model_input_shape: Sequence, model_input_dtype: Any = None, num_classes: int | None = None
) -> Dataset:
    """Raise DataError unless `ds` fits the model; return it with x cast to the model's dtype.

    model_input_shape: the model's input dims; ints are fixed, str/None/<=0 are symbolic. The
        batch axis is free (a fixed batch is handled by the runner).
    model_input_dtype: numpy dtype-like (None means float32). float64 narrows to float32 and
        integers widen silently; floats into an integer input are refused.
    num_classes: when given, labels must lie in [0, num_classes).
    """
    x = _numeric(ds.x, "x", ds.name)
    _check_shape(ds.name, x.shape, model_input_shape)
    want = np.dtype(np.float32 if model_input_dtype is None else model_input_dtype)
    if x.dtype != want:
        if np.issubdtype(want, np.integer) and not np.issubdtype(x.dtype, np.integer):
            raise DataError(f"data {ds.name!r} is {x.dtype} but the model takes {want}; give integer data")
        if np.issubdtype(x.dtype, np.integer) and np.issubdtype(want, np.floating):
            log.info("casting %s input %s to %s", ds.name, x.dtype, want)
        x = x.astype(want)
    y = ds.y
    if y is not None:
        y = _labels(y, len(x), ds.name)
        if num_classes is not None and len(y):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise DataError(
                    f"data {ds.name!r} has labels in [{lo}, {hi}] but the model has {num_classes} outputs (0..{num_classes - 1})"
                )
    if x is ds.x and y is ds.y:
        return ds
    return Dataset(x, y, ds.name)
