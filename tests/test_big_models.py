"""Big models in bounded memory, checked on small models with the same external-data layout.

What a 100M / 1B parameter model would show by its RSS (bench/memory.py measures that) is asserted
here without timing or memory figures: inspect never opens the weights' file, compress gives the
same model from external data as from an inline file, sessions of big protos go through a scratch
file, the session cache drops big sessions before building the next, and a model past the output
threshold is written as model.onnx + model.onnx.data.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from examples.big_models import random_inputs, transformer_params, write_transformer
from hirelc_onnx.apply import apply_config, apply_pruning
from hirelc_onnx.cli import main
from hirelc_onnx.compress import compress
from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import ModelLoadError
from hirelc_onnx.evaluate import runner as runner_mod
from hirelc_onnx.graph import build_block_graph, import_model, load_model
from hirelc_onnx.graph.external_data import is_shell
from hirelc_onnx.report import outputs as outputs_mod
from hirelc_onnx.report.outputs import EXTERNAL_DATA_FILE, write_model

D, LAYERS = 96, 2  # fc weights 96 x 384: 147 KB each, over the loader's 64 KiB shell threshold
KERNEL_WEIGHTS = [f"layer{i}.fc{j}.weight" for i in range(LAYERS) for j in (1, 2)]


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    model = write_transformer(folder / "model.onnx", d_model=D, layers=LAYERS, seq=4)
    np.savez(folder / "data.npz", x=random_inputs(model, 48))
    return model


def _move_weights(src: Path, dst: Path, location: str) -> Path:
    """A copy of `src`'s header in `dst` whose kernel weights point at `location`; the rest of the
    data file is copied alongside."""
    dst.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        if t.name in KERNEL_WEIGHTS:
            next(e for e in t.external_data if e.key == "location").value = location
    (dst / "model.onnx").write_bytes(model.SerializeToString())
    (dst / "model.data").write_bytes((src.parent / "model.data").read_bytes())
    return dst / "model.onnx"


def _loaded(path: Path) -> bytes:
    """The model at `path` with its external data read back in, serialized as if it had been inline."""
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        t.ClearField("data_location")  # onnx's loader sets it explicitly to DEFAULT
    return model.SerializeToString()


def test_generator_writes_the_stated_model(big):
    model = onnx.load(str(big.path), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert set(KERNEL_WEIGHTS) <= set(external)
    assert big.params == transformer_params(D, LAYERS) == sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    logits = runner_mod.predict(big.path, random_inputs(big, 4))
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


def test_inspect_never_reads_the_kernel_weights(big, tmp_path):
    """The kernel weights moved to an empty file: inspect's tables are unchanged, while anything that
    reads the weights finds no bytes there and fails."""
    moved = _move_weights(big.path, tmp_path / "moved", "empty.bin")
    (moved.parent / "empty.bin").write_bytes(b"")
    runner = CliRunner()
    intact = runner.invoke(main, ["inspect", str(big.path), "--json"])
    blind = runner.invoke(main, ["inspect", str(moved), "--json"])
    assert intact.exit_code == 0 and blind.exit_code == 0, blind.output
    assert json.loads(blind.output) == json.loads(intact.output)
    with pytest.raises(ModelLoadError, match="fc1.weight"):
        load_model(moved)


def test_unread_weights_are_shells_and_sizes_still_count(big):
    model = load_model(big.path, weights=False)
    shells = {t.name for t in model.graph.initializer if is_shell(t)}
    assert shells == set(KERNEL_WEIGHTS)
    assert all(not t.raw_data and not t.external_data for t in model.graph.initializer if t.name in shells)
    full = import_model(big.path)
    light = import_model(big.path, weights=False)
    assert light.weight_bytes == full.weight_bytes == big.weight_bytes
    assert light.total_macs == full.total_macs and light.total_params == full.total_params


def test_hostile_locations_are_still_refused_without_reading_weights(big, tmp_path):
    moved = _move_weights(big.path, tmp_path / "hostile", "../outside.bin")
    result = CliRunner().invoke(main, ["inspect", str(moved), "--json"])
    assert result.exit_code != 0
    assert "outside the model's folder" in result.output and "Traceback" not in result.output


def test_compress_from_external_data_equals_compress_from_inline(big, tmp_path, monkeypatch):
    inline = tmp_path / "inline.onnx"
    inline.write_bytes(_loaded(big.path))  # the same model, every weight in the file
    data = str(big.path.parent / "data.npz")
    kwargs = dict(method="uniform", data=data, bits=4, finetune_epochs=0, latency_runs=2)
    from_inline = compress(inline, **kwargs)
    monkeypatch.setattr(runner_mod, "FILE_SESSION_BYTES", 0)  # every session through a scratch file
    monkeypatch.setattr(outputs_mod, "EXTERNAL_DATA_BYTES", 0)  # model.onnx written with external data
    runner_mod.clear_cache()
    from_external = compress(big.path, out_dir=tmp_path / "out", **kwargs)
    assert from_external.model.SerializeToString() == from_inline.model.SerializeToString()
    assert from_external.report["accuracy"]["compressed"] == from_inline.report["accuracy"]["compressed"]
    assert from_external.report["size"]["original_file_bytes"] == big.path.stat().st_size + big.data_path.stat().st_size
    assert _loaded(tmp_path / "out" / "model.onnx") == from_external.model.SerializeToString()
    assert from_external.report["outputs"][EXTERNAL_DATA_FILE] == str(tmp_path / "out" / EXTERNAL_DATA_FILE)


def test_scratch_file_session_predicts_like_bytes_session(big, monkeypatch):
    bg = import_model(big.path)
    x = random_inputs(big, 8)
    runner_mod.clear_cache()
    from_bytes = runner_mod.OrtRunner(bg.model).predict(x)
    monkeypatch.setattr(runner_mod, "FILE_SESSION_BYTES", 0)
    from_file = runner_mod.OrtRunner(bg.model).predict(x)  # its scratch folder is gone by now
    np.testing.assert_array_equal(from_file, from_bytes)


def test_session_cache_drops_big_sessions_before_building_the_next(big, monkeypatch):
    bg = import_model(big.path)
    emitted = apply_config(bg, CompressionConfig.uniform(bg.kernels, target="storage", bits=4))
    monkeypatch.setattr(runner_mod, "_CACHE_BYTES", big.weight_bytes + 1)  # room for one of them
    runner_mod.clear_cache()
    runner_mod.get_runner(bg.model)
    assert not runner_mod.fit_together([bg.model, emitted])
    runner_mod.get_runner(emitted)
    assert len(runner_mod._cache) == 1
    monkeypatch.setattr(runner_mod, "_CACHE_BYTES", 3 * big.weight_bytes)
    runner_mod.get_runner(bg.model)
    assert len(runner_mod._cache) == 2 and runner_mod.fit_together([bg.model, emitted])
    runner_mod.clear_cache()


def test_unpruned_config_shares_the_weights_and_leaves_them_untouched(big):
    bg = build_block_graph(load_model(big.path), inplace=True)
    before = bg.model.SerializeToString()
    config = CompressionConfig.uniform(bg.kernels, target="storage", bits=4)
    assert apply_pruning(bg, config) is bg.model
    apply_config(bg, config)
    assert bg.model.SerializeToString() == before


def test_model_past_the_threshold_is_written_with_external_data(big, tmp_path):
    model = load_model(big.path)
    out = tmp_path / "out"
    assert write_model(out / "model.onnx", model, external_over=0) is True
    data = out / EXTERNAL_DATA_FILE
    assert data.is_file() and data.stat().st_size >= big.weight_bytes - 4096
    header = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer
               if t.name in KERNEL_WEIGHTS)
    assert _loaded(out / "model.onnx") == model.SerializeToString()
    x = random_inputs(big, 4)
    np.testing.assert_array_equal(runner_mod.predict(out / "model.onnx", x), runner_mod.predict(big.path, x))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert write_model(out / "model.onnx", model) is False  # under the default threshold: inline again
    assert not data.exists()  # and the stale data file is gone
    assert _loaded(out / "model.onnx") == model.SerializeToString()


@pytest.mark.parametrize("bits,granularity", [(4, "per-channel"), (2, "per-channel"), (4, "per-group"), (3, "log2"),
                                              (8, "per-tensor")])
def test_folded_scratch_file_predicts_exactly_like_ort_folding(big, monkeypatch, tmp_path, bits, granularity):
    """The decodes folded here (one weight at a time) give the bytes ORT's own folding gives: the
    session of the scratch file predicts bit for bit what a session of the serialized model does."""
    from hirelc_onnx.evaluate.folding import write_folded

    bg = import_model(big.path)
    config = CompressionConfig.uniform(bg.kernels, target="storage", bits=bits, granularity=granularity)
    emitted = apply_config(bg, config)
    header = onnx.load(str(write_folded(emitted, tmp_path)), load_external_data=False)
    assert not {n.op_type for n in header.graph.node} & {"Cast", "BitwiseAnd", "Gather"}  # every decode folded
    x = random_inputs(big, 8)
    runner_mod.clear_cache()
    from_bytes = runner_mod.OrtRunner(emitted).predict(x)
    monkeypatch.setattr(runner_mod, "FILE_SESSION_BYTES", 0)
    np.testing.assert_array_equal(runner_mod.OrtRunner(emitted).predict(x), from_bytes)


def test_serialized_nbytes_is_bytesize_without_serializing(big):
    from hirelc_onnx.graph.external_data import serialized_nbytes

    loaded = load_model(big.path)
    header = onnx.load(str(big.path), load_external_data=False)
    bg = import_model(big.path)
    emitted = apply_config(bg, CompressionConfig.uniform(bg.kernels, target="storage", bits=2))
    for model in (loaded, header, bg.model, emitted, onnx.ModelProto()):
        assert serialized_nbytes(model) == model.ByteSize() == len(model.SerializeToString())


def test_a_killed_external_data_write_leaves_a_temporary_the_lock_sweeps(tmp_path):
    from hirelc_onnx.io import remove_temporaries, temporary_beside

    tmp = temporary_beside(tmp_path / EXTERNAL_DATA_FILE)  # what write_model fills before its rename
    assert tmp.name.startswith(f".{EXTERNAL_DATA_FILE}.")
    assert remove_temporaries(tmp_path) == [tmp] and not tmp.exists()
