"""Executors of a batch of real evaluations (search/executors.py): same answer in-process and on local
workers, a dead worker's evaluation retried then recorded, Ctrl-C stopping the workers, --ray's errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.data import load_digits, split_dataset
from hirelc_onnx.graph import build_block_graph, load_model
from hirelc_onnx.kill_points import ENV_VAR
from hirelc_onnx.search.baselines import random_config
from hirelc_onnx.search.budget import repair
from hirelc_onnx.search.context import SearchContext
from hirelc_onnx.search.executors import RAY_MISSING, LocalProcesses, make_executor

REPO = Path(__file__).resolve().parents[2]
# random search's candidates are one batch; with fine-tuning the first runs alone (it settles the
# learning rate), the other two side by side
SEARCH = ("--method", "random", "--data", "digits", "--budget", "6x", "--evaluations", "3", "--finetune-epochs", "1",
          "--seed", "3")


def _run(model: Path, out: Path, search: tuple, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    # the CLI with HiReLC's agents shrunk (tests/quick_cli.py); random search runs as under hirelc_onnx
    return subprocess.run([sys.executable, "-m", "tests.quick_cli", "compress", str(model), *search, "--out", str(out),
                           "--json", *extra], capture_output=True, text=True, env=env, timeout=900)


def _compress(model: Path, out: Path, *extra: str, env: dict | None = None) -> dict:
    res = _run(model, out, SEARCH, *extra, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.mark.slow
def test_a_killed_driver_resumes_on_workers_to_the_in_process_model(reference_models, tmp_path):
    model = reference_models("vgg")
    search = ("--budget", "6x", "--data", "digits", "--finetune-epochs", "1", "--evaluations", "2", "--seed", "5")
    assert _run(model, tmp_path / "whole", search).returncode == 0
    killed = _run(model, tmp_path / "killed", search, "--workers", "2", env={ENV_VAR: "rl#2"})  # in round 2's RL
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "model.onnx").exists()
    resumed = _run(model, tmp_path / "killed", search, "--workers", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["search"]["resumed_from"] == 1
    assert (tmp_path / "killed" / "model.onnx").read_bytes() == (tmp_path / "whole" / "model.onnx").read_bytes()


@pytest.mark.slow
def test_two_workers_emit_the_in_process_model_even_when_workers_die(reference_models, tmp_path):
    model = reference_models("resnet20")
    alone = _compress(model, tmp_path / "one")
    # every worker process SIGKILLs itself in its second fine-tune: the evaluation it held is retried
    # on a fresh worker and the search ends with the same model
    two = _compress(model, tmp_path / "two", "--workers", "2", env={ENV_VAR: "finetune#2"})
    assert (tmp_path / "two" / "model.onnx").read_bytes() == (tmp_path / "one" / "model.onnx").read_bytes()
    assert [h["score"] for h in two["history"]] == [h["score"] for h in alone["history"]]
    assert alone["search"]["executor"]["kind"] == "in-process"
    assert two["search"]["executor"] == {"kind": "local-processes", "max_attempts": 3, "workers": 2,
                                         "cpus_per_worker": max(1, (os.cpu_count() or 1) // 2)}
    runs = two["search"]["evaluations"]
    assert len(runs) == 3 and all(r["wall_seconds"] > 0 and r["queue_seconds"] >= 0 for r in runs)
    assert {r["status"] for r in runs} >= {"retried"}, runs
    assert all(r["worker"].startswith("local-") for r in runs)
    assert all(h["worker"] == r["worker"] for h, r in zip(two["history"], runs))


@pytest.fixture(scope="module")
def batch(reference_models):
    bg = build_block_graph(load_model(reference_models("resnet20")))
    ctx = SearchContext(bg, split_dataset(load_digits(), 0), finetune_epochs=0)
    rng = np.random.default_rng(0)
    return ctx, [repair(bg, random_config(bg, "storage", rng), 6.0, fill=True) for _ in range(3)]


@pytest.mark.slow
def test_a_worker_dying_every_attempt_leaves_a_failed_record(batch, monkeypatch):
    ctx, configs = batch
    monkeypatch.setenv(ENV_VAR, "measure-task")  # read by the spawned workers only
    ctx.executor = LocalProcesses(2, max_attempts=2)
    log_before = len(ctx.evaluation_log)
    try:
        out = ctx.measure_batch(configs[:1])
    finally:
        ctx.executor.close()
    assert out == [None]
    (record,) = ctx.evaluation_log[log_before:]
    assert record["status"] == "failed" and record["attempts"] == 2 and "died" in record["reason"]


def test_ctrl_c_stops_the_local_workers(batch):
    ctx, configs = batch
    ctx.executor = executor = LocalProcesses(2)

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ctx.measure_batch(configs, interrupt)
    assert executor._slots == {}  # every worker killed and joined, the outstanding task with it
    executor.close()


def test_in_process_batch_equals_one_by_one(batch):
    ctx, configs = batch
    ctx.executor = make_executor(1)
    batched = ctx.measure_batch(configs)
    single = [ctx.measure(c) for c in configs]
    assert [m.score for m in batched] == [m.score for m in single]
    assert [m.model.SerializeToString() for m in batched] == [m.model.SerializeToString() for m in single]
    assert all(m.placement.attempts == 1 for m in batched)


def test_ray_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    with pytest.raises(UserError, match=r"pip install hirelc-onnx\[ray\]"):
        make_executor(ray="auto")
    assert "pip install hirelc-onnx[ray]" in RAY_MISSING


def test_ray_and_workers_together_are_refused():
    with pytest.raises(UserError, match="--ray and --workers"):
        make_executor(workers=2, ray="auto")


def _random_feed(session) -> dict:
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (16 if k == 0 else 8) for k, d in enumerate(i.shape)]
        feed[i.name] = (rng.integers(0, 100, shape) if "int" in i.type else rng.standard_normal(shape)).astype(
            np.int64 if "int" in i.type else np.float32)
    return feed


def test_a_worker_pins_ort_threads_and_the_bytes_do_not_move(reference_models, batch, monkeypatch):
    """Workers run ORT on their task's CPUs (evaluate/runner.py: default_session_config); every
    reference model, and a search's quantized candidates (calibrated through ORT), give the same
    output bytes on 1, 2 and 4 intra-op threads, and a candidate measured pinned to 1 thread is the
    in-process one byte for byte."""
    import onnxruntime as ort

    from hirelc_onnx.evaluate.runner import TASK_CPUS_ENV, default_session_config, get_runner

    monkeypatch.delenv(TASK_CPUS_ENV, raising=False)
    assert default_session_config().intra_op_threads == 0  # in-process: ORT's own choice
    ctx, configs = batch
    ctx.executor = make_executor(1)
    quantized = CompressionConfig(dict(configs[0].kernels), target="ort-cpu")
    qctx = SearchContext(ctx.bg, split_dataset(load_digits(), 0), target="ort-cpu", finetune_epochs=0)
    free = qctx.measure(quantized)
    monkeypatch.setenv(TASK_CPUS_ENV, "1")  # as `_pin_threads` sets it in a worker
    assert default_session_config().intra_op_threads == 1
    pinned = qctx.measure(quantized)
    assert get_runner(pinned.model).config.intra_op_threads == 1
    assert pinned.model.SerializeToString() == free.model.SerializeToString() and pinned.score == free.score

    # the recognizer: its small build, the same graph as the benchmark's (tests/conftest.py)
    names = ("resnet20", "vgg", "mobilenetv2", "vit", "text_recognizer_small", "efficientnet_lite0", "minilm_l6")
    models = [load_model(reference_models(n)).SerializeToString() for n in names] + [free.model.SerializeToString()]
    for model in models:
        outputs = []
        for threads in (1, 2, 4):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.log_severity_level = threads, 3
            session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            outputs.append([o.tobytes() for o in session.run(None, _random_feed(session))])
        assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.slow
def test_two_stage_candidates_on_two_workers_are_the_in_process_ones(reference_models):
    """Two-stage's stage-1 probes and stage-2 candidates are batches on the executor (measure_jobs):
    two local workers emit the in-process model and the same figures."""
    from hirelc_onnx.search.two_stage import TwoStageSettings, run_two_stage

    settings = TwoStageSettings(density=0.25, episodes_per_evaluation=2, real_candidates=1, probe_epochs=1,
                                mask_epochs=1, finetune_epochs=1)
    runs = []
    for executor in (make_executor(1), LocalProcesses(2)):
        bg = build_block_graph(load_model(reference_models("vgg")))
        ctx = SearchContext(bg, split_dataset(load_digits(), 0))
        ctx.executor = executor
        try:
            result = run_two_stage(bg, ctx, "storage", budget=20.0, evaluations=2, seed=1, settings=settings)
        finally:
            executor.close()
        runs.append((result, ctx))
    (alone, alone_ctx), (two, two_ctx) = runs
    assert two.model.SerializeToString() == alone.model.SerializeToString()
    figures = [[(h["kind"], h["stage"], h.get("source"), h.get("score")) for h in r.history if h["kind"] != "proxy"]
               for r in (alone, two)]
    # 3 probes per probe batch (1-epoch probes are not trusted: trained on, one more batch each time),
    # 3 stage-2 candidates, 2 stages
    probes = sum(f[0] == "probe" for f in figures[0])
    assert figures[0] == figures[1] and probes % 3 == 0 and len(figures[0]) == probes + 3 + 2
    assert alone.extra["source"] == two.extra["source"]
    batches = [3] * (probes // 3) + [3]
    assert [b["size"] for b in two_ctx.batch_log] == [b["size"] for b in alone_ctx.batch_log] == batches
    assert two_ctx.evaluations == alone_ctx.evaluations == probes + 2  # the probes and the two stages' fine-tunes
    assert {r["worker"].split(".")[0] for r in two_ctx.evaluation_log} == {"local-0", "local-1"}
    assert all(r["status"] == "ok" and r["wall_seconds"] > 0 for r in two_ctx.evaluation_log)
