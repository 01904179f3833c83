"""Where a batch of real evaluations runs: in this process, on N local processes, or as Ray tasks.

A method hands `SearchContext.measure_batch` the candidates it can judge at once; the context hands
them to one of these executors. Every evaluation is independent of where it runs: the worker holds
a copy of the context (sent once per worker, or put once in Ray's object store), each task carries
the config plus the driver's fine-tuning state (the learning rate the first fine-tune settled on),
and results come back in candidate order, so 1 worker, N workers and Ray give the same answer.

Faults: an evaluation whose worker dies (killed, out of memory, its node lost) is retried up to
`max_attempts` times in all, then recorded as failed with the reason and the search goes on. An
exception raised by the evaluation itself is the same on any worker: it propagates, as in-process.
Ctrl-C (KeyboardInterrupt in the driver) cancels outstanding tasks and stops the local workers.
Each finished evaluation is accounted for (`Placement`): worker, node, wall seconds, seconds
queued before it started, attempts.

Threads: a worker runs ORT and torch on the CPUs its task was given (`_pin_threads`), so N workers
on N cores do not spin N x N threads. ORT's output bytes do not move with its thread count
(measured on every reference model). The bridge fine-tunes a model under 1M weights on one torch
thread wherever it runs; a bigger one's fine-tune takes the task's CPUs, and torch's training sums
do move with the thread count (measured: 1 and 2 threads train other weights), so for such a model
byte-identical answers need the same CPUs per evaluation on each executor.
"""
from __future__ import annotations

import logging
import multiprocessing
from multiprocessing import forkserver
import os
import pickle
import signal
import socket
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from hirelc_onnx.config import CompressionConfig
from hirelc_onnx.errors import UserError
from hirelc_onnx.evaluate.runner import TASK_CPUS_ENV
from hirelc_onnx.kill_points import kill_point

__all__ = ["MAX_ATTEMPTS", "EvaluationTask", "Executor", "FailedEvaluation", "InProcess", "LocalProcesses",
           "Placement", "RayCluster", "TaskOutcome", "executor_closed", "make_executor", "run_task"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Tries per evaluation (the first plus two retries) before it is recorded as failed."""



def _pin_threads(cpus: int) -> None:
    """A worker's task runs on the `cpus` it was given: ORT sessions (evaluate/runner.py) and the
    bridge's fine-tunes of big models size their threads by TASK_CPUS_ENV, torch's own pool by
    OMP_NUM_THREADS (read when torch starts) or set_num_threads (once it has)."""
    os.environ[TASK_CPUS_ENV] = os.environ["OMP_NUM_THREADS"] = str(cpus)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(cpus)


@dataclass(frozen=True)
class EvaluationTask:
    """One evaluation as a worker receives it: the config and the driver's fine-tuning state."""

    config: CompressionConfig | None
    finetune_lr: float | None
    bridge_error: str | None
    finetune_seconds: float | None = None
    keep: Any = None
    """Which channels each pruned group keeps (graph-rl's per-channel choice; None: by L1 rank)."""
    job: Callable[[Any], Any] | None = None
    """A method's own evaluation (SearchContext.measure_jobs), called with the context instead of
    `measure(config)`: picklable (a module-level class or function), it returns a Measurement."""


@dataclass
class TaskOutcome:
    """What a worker sends back for one evaluation."""

    measurement: Any  # search.context.Measurement
    finetune_lr: float | None
    bridge_error: str | None
    worker: str
    node: str
    started: float  # time.time() when the evaluation began on the worker
    seconds: float


@dataclass(frozen=True)
class Placement:
    """Where and how one evaluation ran, for the report."""

    worker: str
    node: str
    wall_seconds: float
    queue_seconds: float
    attempts: int

    @property
    def retried(self) -> bool:
        return self.attempts > 1


@dataclass(frozen=True)
class FailedEvaluation:
    """An evaluation whose worker died `attempts` times: the search goes on without it."""

    config: CompressionConfig | None  # None: a method's own job (EvaluationTask.job)
    reason: str
    attempts: int


def run_task(ctx: Any, task: EvaluationTask, worker: str, node: str) -> TaskOutcome:
    """Measure one candidate on `ctx` (a worker's copy of the context) as the driver would."""
    started = time.time()
    ctx.finetune_lr, ctx.bridge_error = task.finetune_lr, task.bridge_error
    if task.job is not None:
        m = task.job(ctx)
    else:
        m = ctx.measure(task.config, keep=task.keep, finetune_seconds=task.finetune_seconds)
    return TaskOutcome(m, ctx.finetune_lr, ctx.bridge_error, worker, node, started, time.time() - started)


Done = Callable[[int], None]
"""Called with the batch index of each evaluation as it finishes (progress across workers)."""


class Executor(ABC):
    """Runs a batch of evaluation tasks; results in task order (a TaskOutcome with its Placement, or a failure)."""

    name = "executor"

    def __init__(self, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.max_attempts = max(1, max_attempts)

    @abstractmethod
    def run(self, ctx: Any, tasks: list[EvaluationTask],
            done: Done | None = None) -> list[tuple[TaskOutcome, Placement] | FailedEvaluation]:
        """Evaluate every task on `ctx`'s model and data."""

    def describe(self) -> dict:
        """What the report says about the executor."""
        return {"kind": self.name, "max_attempts": self.max_attempts}

    def close(self) -> None:
        """Release workers / the cluster connection."""


class InProcess(Executor):
    """The default: evaluations one after another in this process (no copies, no pickling)."""

    name = "in-process"

    def run(self, ctx, tasks, done=None):
        out = []
        for i, task in enumerate(tasks):
            submitted = time.time()
            outcome = run_task(ctx, task, f"pid {os.getpid()}", socket.gethostname())
            out.append((outcome, Placement(outcome.worker, outcome.node, outcome.seconds,
                                           outcome.started - submitted, 1)))
            if done:
                done(i)
        return out


def _context_payload(ctx: Any) -> bytes:
    """The context as the workers get it: pickled once per run (SearchContext drops its executor)."""
    return pickle.dumps(ctx, protocol=pickle.HIGHEST_PROTOCOL)


# --- local processes ---------------------------------------------------------------------------

_PRELOAD = ["hirelc_onnx.search.context", "hirelc_onnx.bridge.finetune"]
"""What the fork server imports once (numpy, ORT, torch, the bridge): a worker forked from it starts
in well under a second instead of importing them itself (seconds per worker, on the batch's clock)."""


def _worker_main(conn: Any, name: str, cpus: int, env: dict[str, str]) -> None:
    """A local worker: receive the context once, then evaluate tasks until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's: it stops us
    os.environ.clear()  # the driver's environment now, not the fork server's from when it started
    os.environ.update(env)
    _pin_threads(cpus)
    ctx = None
    node = socket.gethostname()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "context":
            ctx = pickle.loads(msg[1])
            continue
        _, index, task = msg
        kill_point("measure-task")  # tests: a worker dying as it takes a task
        try:
            reply = ("done", index, run_task(ctx, task, name, node))
        except BaseException as exc:  # noqa: BLE001 - the evaluation's own error goes back to the driver
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an unpicklable error travels as its text
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            reply = ("error", index, exc)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):  # the driver is gone (killed): so is this worker
            return


class LocalProcesses(Executor):
    """`--workers N`: N spawned processes on this machine, kept for the whole run."""

    name = "local-processes"

    def __init__(self, workers: int, max_attempts: int = MAX_ATTEMPTS) -> None:
        super().__init__(max_attempts)
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        self.workers = workers
        self.cpus = max(1, (os.cpu_count() or 1) // workers)
        # workers come from a fork server that imported the heavy modules once and never ran a thread
        # pool (a plain fork of the driver would copy torch's and ORT's running pools); it starts now,
        # importing while the driver loads the model and data. Spawn where there is no fork server.
        if "forkserver" in multiprocessing.get_all_start_methods():
            self._mp = multiprocessing.get_context("forkserver")
            self._mp.set_forkserver_preload(_PRELOAD)
            forkserver.ensure_running()
        else:
            self._mp = multiprocessing.get_context("spawn")
        self._slots: dict[int, tuple[Any, Any]] = {}
        self._payload: bytes | None = None
        self._payload_of: int | None = None
        self._started = 0

    def describe(self) -> dict:
        return {**super().describe(), "workers": self.workers, "cpus_per_worker": self.cpus}

    def _start(self, *slots: int) -> None:
        """Spawn the workers of `slots`, then send each the context: they import side by side (a
        send blocks until its worker reads, so sending as each starts would start them one by one)."""
        for slot in slots:
            parent, child = self._mp.Pipe()
            self._started += 1
            proc = self._mp.Process(target=_worker_main, daemon=True, name=f"hirelc-worker-{slot}",
                                    args=(child, f"local-{slot}.{self._started}", self.cpus, dict(os.environ)))
            proc.start()
            child.close()
            self._slots[slot] = (proc, parent)
        for slot in slots:
            self._slots[slot][1].send(("context", self._payload))

    def _stop(self, slot: int) -> None:
        proc, conn = self._slots.pop(slot)
        conn.close()
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=10)

    def run(self, ctx, tasks, done=None):
        if self._payload_of != id(ctx):  # one context per run: sent once to each worker
            for slot in list(self._slots):
                self._stop(slot)
            self._payload, self._payload_of = _context_payload(ctx), id(ctx)
        self._start(*(slot for slot in range(self.workers) if slot not in self._slots))
        results: list[Any] = [None] * len(tasks)
        attempts = [0] * len(tasks)
        submitted = [time.time()] * len(tasks)
        reasons: list[str] = [""] * len(tasks)
        pending = deque(range(len(tasks)))
        busy: dict[int, int] = {}  # slot -> task index
        try:
            while pending or busy:
                for slot in range(self.workers):
                    if slot not in busy and pending:
                        i = pending.popleft()
                        attempts[i] += 1
                        self._slots[slot][1].send(("task", i, tasks[i]))
                        busy[slot] = i
                waits = {}
                for slot in busy:
                    proc, conn = self._slots[slot]
                    waits[conn] = waits[proc.sentinel] = slot
                for ready in wait(list(waits)):
                    slot = waits[ready]
                    if slot not in busy:
                        continue  # its pipe and its sentinel were both ready
                    i = busy[slot]
                    proc, conn = self._slots[slot]
                    msg = None
                    try:
                        if conn.poll():
                            msg = conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None and proc.is_alive():
                        continue
                    del busy[slot]
                    if msg is None:  # the worker died mid-task: a fresh one takes its place
                        proc.join(timeout=5)
                        reasons[i] = f"worker {slot} died (exit code {proc.exitcode})"
                        self._stop(slot)
                        self._start(slot)
                        if attempts[i] < self.max_attempts:
                            pending.appendleft(i)
                            submitted[i] = time.time()
                        else:
                            results[i] = FailedEvaluation(tasks[i].config, reasons[i], attempts[i])
                            if done:
                                done(i)
                        continue
                    kind, index, payload = msg
                    if kind == "error":
                        raise payload
                    results[index] = (payload, Placement(payload.worker, payload.node, payload.seconds,
                                                         max(0.0, payload.started - submitted[index]),
                                                         attempts[index]))
                    if done:
                        done(index)
        except BaseException:  # Ctrl-C or an evaluation's error: outstanding tasks die with their workers
            for slot in list(self._slots):
                self._stop(slot)
            raise
        return results

    def close(self) -> None:
        for slot in list(self._slots):
            self._stop(slot)


# --- Ray -----------------------------------------------------------------------------------------

_RAY_CONTEXTS: dict[str, Any] = {}  # per Ray worker process: the run's context, unpickled once


def _ray_evaluate(token: str, payload_ref: list, task: EvaluationTask) -> TaskOutcome:
    """The Ray task: the context comes from the object store once per worker process, then is cached."""
    import ray

    _pin_threads(int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1)
    if token not in _RAY_CONTEXTS:
        _RAY_CONTEXTS.clear()
        _RAY_CONTEXTS[token] = pickle.loads(ray.get(payload_ref[0]))
    rt = ray.get_runtime_context()
    node = f"{ray.util.get_node_ip_address()}/{rt.get_node_id()[:8]}"
    return run_task(_RAY_CONTEXTS[token], task, f"ray-worker {rt.get_worker_id()[:8]} pid {os.getpid()}", node)


def _cancelled(ray: Any, refs: list, timeout: float = 10.0) -> int:
    """How many of the `refs` just force-cancelled the cluster reports ended by it (waiting at most
    `timeout`): a task not started yet as cancelled, a running one as its worker killed."""
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
    n = 0
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except (ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError):
            n += 1
        except ray.exceptions.RayError:
            pass
    return n


RAY_MISSING = "--ray needs Ray, an optional extra: pip install hirelc-onnx[ray]"


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT that nothing answers on is one error line now (ray.init would retry for minutes)."""
    if address == "auto":
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray takes auto or HOST:PORT (the head's GCS address), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"--ray {address}: cannot connect to a Ray cluster ({exc.strerror or exc})") from None


class RayCluster(Executor):
    """`--ray auto|HOST:PORT`: each evaluation a Ray task on an existing cluster.

    The context (model and data) is put in the object store once per run; each task takes
    `cpus_per_task` CPUs and sizes torch's threads by them. Ray's own retries are off: a task
    lost with its worker or node is resubmitted here, so the report can say it was retried.
    Every node needs hirelc-onnx installed (the workers import it).
    """

    name = "ray"

    def __init__(self, address: str, max_attempts: int = MAX_ATTEMPTS, cpus_per_task: int = 1) -> None:
        super().__init__(max_attempts)
        try:
            import ray
        except ImportError:
            raise UserError(RAY_MISSING) from None
        self._ray = ray
        self.address = address
        self.cpus_per_task = cpus_per_task
        _check_reachable(address)
        try:
            # a cluster on loopback is on this machine: the driver is 127.0.0.1 too (Ray would otherwise
            # probe an outside address to find the machine's interface)
            local = {"_node_ip_address": "127.0.0.1"} if address.startswith(("127.", "localhost:")) else {}
            ray.init(address=address, log_to_driver=False, logging_level="error", configure_logging=False, **local)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--ray {address}: cannot connect to a Ray cluster ({exc})") from None
        # SPREAD: a batch's tasks go to different nodes first (evaluations are CPU-bound)
        self._remote = ray.remote(num_cpus=cpus_per_task, max_retries=0, scheduling_strategy="SPREAD")(_ray_evaluate)
        self._payload_of: int | None = None
        self._payload_ref: Any = None
        self._token = ""

    def describe(self) -> dict:
        nodes = [n for n in self._ray.nodes() if n.get("Alive")]
        return {**super().describe(), "address": self.address, "nodes": len(nodes),
                "cpus": int(sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)),
                "cpus_per_task": self.cpus_per_task}

    def run(self, ctx, tasks, done=None):
        ray = self._ray
        if self._payload_of != id(ctx):
            self._payload_ref = ray.put(_context_payload(ctx))
            self._payload_of, self._token = id(ctx), uuid.uuid4().hex
        results: list[Any] = [None] * len(tasks)
        attempts = [0] * len(tasks)
        submitted = [0.0] * len(tasks)
        refs: dict[Any, int] = {}

        def submit(i: int) -> None:
            attempts[i] += 1
            submitted[i] = time.time()
            # the ref inside a list: resolved by the task only when its worker lacks the context
            refs[self._remote.remote(self._token, [self._payload_ref], tasks[i])] = i

        for i in range(len(tasks)):
            submit(i)
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    i = refs.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # the evaluation's own error
                        raise exc.as_instanceof_cause() from None
                    except ray.exceptions.RayError as exc:  # its worker or node was lost
                        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        if attempts[i] < self.max_attempts:
                            submit(i)
                        else:
                            results[i] = FailedEvaluation(tasks[i].config, reason, attempts[i])
                            if done:
                                done(i)
                        continue
                    results[i] = (outcome, Placement(outcome.worker, outcome.node, outcome.seconds,
                                                     max(0.0, outcome.started - submitted[i]), attempts[i]))
                    if done:
                        done(i)
        except BaseException:  # Ctrl-C: outstanding tasks are cancelled on the cluster
            for ref in refs:
                ray.cancel(ref, force=True)
            log.warning("interrupted: %d of %d outstanding evaluation(s) cancelled on the cluster",
                        _cancelled(ray, list(refs)), len(refs))
            raise
        return results

    def close(self) -> None:
        self._ray.shutdown()


@contextmanager
def executor_closed(executor: Executor) -> Iterator[Executor]:
    """Hold `executor` for a run and release its workers / cluster connection however the run ends."""
    try:
        yield executor
    finally:
        executor.close()


def make_executor(workers: int = 1, ray: str | None = None) -> Executor:
    """The executor `--workers` / `--ray` ask for (one worker, no Ray: in-process)."""
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if ray is not None:
        if workers != 1:
            raise UserError("--ray and --workers pick different executors: give one of them")
        return RayCluster(ray)
    return InProcess() if workers == 1 else LocalProcesses(workers)
