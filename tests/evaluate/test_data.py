"""Data loading: .npz, image folders, built-ins and plugins, and one-line errors for bad data."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hirelc_onnx.errors import DataError
from hirelc_onnx.evaluate.data import Dataset, select_split, split_dataset
from hirelc_onnx.evaluate.loaders import check_fits, load_data

DIGITS_SHAPE = ("N", 1, 8, 8)


def _png(path, color, size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size[1], size[0]), color).save(path)


def _raises(fn, *match):
    """The DataError is one line and says each of `match`."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


# --- .npz ----------------------------------------------------------------------------------------


def test_npz_with_labels_narrows_float64(tmp_path):
    x = np.random.default_rng(0).random((6, 1, 8, 8))
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6))
    ds = load_data(str(tmp_path / "d.npz"), DIGITS_SHAPE)
    assert ds.x.dtype == np.float32 and ds.x.shape == (6, 1, 8, 8)
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    np.testing.assert_array_equal(ds.y, np.arange(6))
    assert ds.y.dtype == np.int64


def test_npz_without_labels(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.zeros((3, 4), np.float32))
    assert load_data(str(tmp_path / "u.npz")).y is None


def test_npz_without_x(tmp_path):
    """Arrays not named x nor after the model's single input: the fit says which it found."""
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 4)), labels=np.zeros(3))
    ds = load_data(str(tmp_path / "bad.npz"))
    _raises(lambda: check_fits(ds, [None, 4]), "has no array 'x'", "images", "labels")


def test_npz_non_numeric(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.array(["a", "b"]))
    _raises(lambda: load_data(str(tmp_path / "s.npz")), "dtype <U1", "must be numeric")
    np.savez(tmp_path / "o.npz", x=np.array([{"a": 1}, None], dtype=object))
    _raises(lambda: load_data(str(tmp_path / "o.npz")), "object arrays", "numeric")


def test_npz_corrupt_and_missing(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    _raises(lambda: load_data(str(tmp_path / "c.npz")), "cannot read", "c.npz", "not a zip")
    _raises(lambda: load_data(str(tmp_path / "nope.npz")), "data not found", "nope.npz")
    (tmp_path / "t.csv").write_text("1,2")
    _raises(lambda: load_data(str(tmp_path / "t.csv")), "t.csv", ".npz")


def test_image_options_refused_for_arrays(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.zeros((3, 4), np.float32))
    _raises(lambda: load_data(str(tmp_path / "u.npz"), resize=8), "resize", "image folders only")


# --- shape / dtype / label checks ----------------------------------------------------------------


def test_wrong_shape_says_expected_and_got(tmp_path):
    np.savez(tmp_path / "flat.npz", x=np.zeros((5, 64), np.float32))
    _raises(lambda: load_data(str(tmp_path / "flat.npz"), DIGITS_SHAPE), "expected input shape (N, 1, 8, 8)", "got (N, 64)")
    ds = Dataset(np.zeros((2, 1, 8, 9), np.float32))
    _raises(lambda: check_fits(ds, [None, 1, 8, 8], np.float32), "(N, 1, 8, 8)", "got (N, 1, 8, 9)")


def test_symbolic_dims_match_anything():
    ds = Dataset(np.zeros((2, 3, 17), np.float32))
    assert check_fits(ds, ["batch", "seq", 17], np.float32) is ds


def test_dtype_conversion_and_refusals():
    f64 = Dataset(np.ones((2, 4)), None, "f64")
    assert check_fits(f64, [None, 4], np.float32).x.dtype == np.float32
    ints = Dataset(np.ones((2, 4), np.uint8), None, "u8")
    assert check_fits(ints, [None, 4], np.float32).x.dtype == np.float32
    _raises(lambda: check_fits(Dataset(np.ones((2, 4), np.float32), None, "f"), [None, 4], np.int64), "float32", "int64")
    _raises(lambda: check_fits(Dataset(np.array([["a"] * 4] * 2), None, "s"), [None, 4], np.float32), "must be numeric")
    _raises(lambda: check_fits(Dataset(np.ones((2, 4), bool), None, "b"), [None, 4], np.float32), "dtype bool")


def test_labels_out_of_range_names_the_outputs():
    ds = Dataset(np.zeros((3, 4), np.float32), np.array([0, 3, 10]), "lab")
    _raises(lambda: check_fits(ds, [None, 4], np.float32, num_classes=10), "labels in [0, 10]", "10 outputs")
    neg = Dataset(np.zeros((2, 4), np.float32), np.array([-1, 0]), "neg")
    _raises(lambda: check_fits(neg, [None, 4], np.float32, num_classes=10), "labels in [-1, 0]")
    frac = Dataset(np.zeros((2, 4), np.float32), np.array([0.5, 1.0]), "frac")
    kept = check_fits(frac, [None, 4], np.float32, num_classes=10)  # regression targets: for a metric only
    assert kept.classes is None and kept.y.dtype == np.float64
    assert check_fits(Dataset(np.zeros((2, 4), np.float32), np.array([0.0, 9.0])), [None, 4], None, 10).y.dtype == np.int64


# --- image folders -------------------------------------------------------------------------------


def test_labelled_image_folder(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "b_red" / "1.png", (255, 0, 0), size=(10, 14))  # resized to 8 then center-cropped
    _png(root / "b_red" / "2.png", (255, 0, 0))
    _png(root / "a_blue" / "1.png", (0, 0, 255))
    ds = load_data(str(root), (None, 3, 8, 8))
    assert ds.x.shape == (3, 3, 8, 8) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.y, [0, 1, 1])  # sorted class names: a_blue=0, b_red=1
    np.testing.assert_allclose(ds.x[0, :, 0, 0], [0, 0, 1])
    np.testing.assert_allclose(ds.x[1], np.broadcast_to(np.array([1.0, 0, 0])[:, None, None], (3, 8, 8)))


def test_image_normalisation_channel_order_and_layout(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "c" / "x.png", (255, 128, 0), size=(12, 12))
    ds = load_data(str(root), (None, 3, 4, 4), mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    np.testing.assert_allclose(ds.x[0, :, 0, 0], [(1 - 0.5) / 0.5, (128 / 255 - 0.5) / 0.25, (0 - 0.5) / 0.5], atol=1e-6)
    bgr = load_data(str(root), (None, 3, 4, 4), channel_order="bgr", scale=1 / 128, offset=-127 / 128)
    np.testing.assert_allclose(bgr.x[0, :, 0, 0], [(0 - 127) / 128, (128 - 127) / 128, (255 - 127) / 128], rtol=1e-6)
    nhwc = load_data(str(root), (None, 4, 4, 3))
    assert nhwc.x.shape == (1, 4, 4, 3)
    gray = load_data(str(root), (None, 1, 6, 6))
    assert gray.x.shape == (1, 1, 6, 6)
    exact = load_data(str(root), resize=(5, 7))
    assert exact.x.shape == (1, 3, 5, 7)


def test_unlabelled_image_folder(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", (i, i, i))
    ds = load_data(str(tmp_path), (None, 3, 8, 8))
    assert ds.y is None and len(ds) == 3


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    _raises(lambda: load_data(str(tmp_path / "empty")), "no images in", "empty")


def test_unreadable_image_names_the_file(tmp_path):
    _png(tmp_path / "d" / "ok.png", (1, 2, 3))
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG definitely not an image")
    _raises(lambda: load_data(str(tmp_path / "d"), (None, 3, 8, 8)), "cannot read image", "broken.png")


def test_images_of_different_sizes_need_resizing(tmp_path):
    _png(tmp_path / "a.png", (0, 0, 0), size=(8, 8))
    _png(tmp_path / "b.png", (0, 0, 0), size=(9, 8))
    _raises(lambda: load_data(str(tmp_path)), "differ in size", "a.png is 8x8", "b.png is 9x8")


def test_image_folder_refuses_non_image_model(tmp_path):
    _png(tmp_path / "a.png", (0, 0, 0))
    _raises(lambda: load_data(str(tmp_path), (None, 64)), "4-D input", "(N, 64)")
    _raises(lambda: load_data(str(tmp_path), (None, 4, 8, 8)), "4-channel")


# --- built-ins, plugins, splits ------------------------------------------------------------------


def test_builtin_digits():
    ds = load_data("digits", DIGITS_SHAPE)
    assert ds.x.shape == (1797, 1, 8, 8) and ds.y.max() == 9


PLUGIN = '''
import numpy as np
from hirelc_onnx.evaluate.data import Dataset

X = np.arange(4 * 2, dtype=np.float64).reshape(4, 2)
Y = np.array([0, 1, 0, 1])

def as_dataset():
    return Dataset(X.astype(np.float32), Y, "mine")

def as_tuple():
    return X, Y

def as_array():
    return X

def as_batches():
    for i in range(0, 4, 3):
        yield X[i:i + 3], Y[i:i + 3]

def mixed_batches():
    yield X[:2], Y[:2]
    yield X[2:]

def as_dict():
    return {"input_ids": np.arange(8).reshape(4, 2), "attention_mask": np.ones((4, 2), np.int64),
            "y": np.array(["a", "b", "a", "b"])}

def dict_batches():
    for i in range(0, 4, 3):
        yield {"input_ids": np.arange(8).reshape(4, 2)[i:i + 3], "attention_mask": np.ones((4, 2), np.int32)[i:i + 3]}

def broken():
    raise RuntimeError("database offline")

def wrong():
    return 42
'''


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    (tmp_path / "my_data_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_data_plugin"


@pytest.mark.parametrize("func, labelled", [("as_dataset", True), ("as_tuple", True), ("as_array", False), ("as_batches", True)])
def test_plugin_forms(plugin, func, labelled):
    ds = load_data(f"{plugin}:{func}", (None, 2))
    np.testing.assert_array_equal(ds.x, np.arange(8, dtype=np.float32).reshape(4, 2))
    assert ds.x.dtype == np.float32
    if labelled:
        np.testing.assert_array_equal(ds.y, [0, 1, 0, 1])
    else:
        assert ds.y is None


@pytest.mark.parametrize("func", ["as_dict", "dict_batches"])
def test_plugin_returns_one_array_per_input(plugin, func):
    """A dict of input arrays (labels under y, of any dtype); ids stay integers through the fit."""
    from hirelc_onnx.evaluate.loaders import InputSpec

    ds = load_data(f"{plugin}:{func}")
    specs = [InputSpec("input_ids", ("N", 2), np.dtype(np.int64)), InputSpec("attention_mask", ("N", 2), np.dtype(np.int64))]
    fitted = check_fits(ds, specs)
    assert list(fitted.inputs) == ["input_ids", "attention_mask"] and len(fitted) == 4
    assert fitted.inputs["input_ids"].dtype == np.int64 and fitted.inputs["attention_mask"].dtype == np.int64
    np.testing.assert_array_equal(fitted.inputs["input_ids"], np.arange(8).reshape(4, 2))
    if func == "as_dict":
        assert fitted.y.dtype.kind == "U" and fitted.classes is None


def test_plugin_errors(plugin):
    _raises(lambda: load_data(f"{plugin}:broken"), "failed", "RuntimeError: database offline")
    _raises(lambda: load_data(f"{plugin}:wrong"), "is of type int")
    _raises(lambda: load_data(f"{plugin}:missing"), "no attribute 'missing'")
    _raises(lambda: load_data(f"{plugin}:mixed_batches"), "batch 1 lacks labels")
    _raises(lambda: load_data("no_such_module_xyz:load"), "cannot import", "no_such_module_xyz")


def test_select_split_matches_split_dataset():
    ds = Dataset(np.arange(100, dtype=np.float32)[:, None], np.arange(100) % 3)
    test = select_split(ds, "test", seed=3)
    np.testing.assert_array_equal(test.x, split_dataset(ds, 3).test.x)
    assert len(test) == 25 and len(select_split(ds, "val", 3)) == 15
    assert select_split(ds, "all") is ds
    with pytest.raises(ValueError):
        select_split(ds, "train")
