"""A two-node Ray cluster that talks only over loopback, for the scale-out test and `make bench-scale`.

Ray picks the machine's interface address as its node IP even when told 127.0.0.1; inside a fresh
network namespace only `lo` exists, so every socket is on 127.0.0.1. `run_in_namespace` starts
`python -m bench.loopback_ray SPEC` under `unshare -rnp --fork --mount-proc` (user, network and
pid namespaces, unprivileged): this module then brings `lo` up, starts a head and a second node
(`ray start`, small CPU counts, a private temp dir), runs the spec's commands as drivers, optionally
SIGKILLs the second node's processes once a task runs there, samples every inet socket of the
namespace throughout, and writes what it saw as JSON. It is the pid namespace's init: when it
exits, the kernel kills every process left in the namespace (the cluster included), so tear-down
touches nothing outside what it started.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["namespaces_available", "run_in_namespace"]

PORT = 6390
TASK_TITLE = "_ray_evaluate"  # the Ray task's function name (search/executors.py), in its worker's title


def namespaces_available() -> str | None:
    """None when an unprivileged user+net+pid namespace with `ip` works here, else why not."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip missing"
    res = subprocess.run(["unshare", "-rnp", "--fork", "--mount-proc", "ip", "link", "set", "lo", "up"],
                         capture_output=True, text=True, timeout=30)
    return None if res.returncode == 0 else f"unshare -rnp failed: {res.stderr.strip()}"


def run_in_namespace(spec: dict, timeout: float) -> dict:
    """Run `spec` (see `_main`) in a fresh namespace; its JSON result."""
    with tempfile.TemporaryDirectory(prefix="hr", dir="/tmp") as tmp:  # short: Ray's socket paths
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "tmp": tmp, "result": str(result_path)}))
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p),
               "RAY_USAGE_STATS_ENABLED": "0"}
        argv = ["unshare", "-rnp", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m",
                "bench.loopback_ray", str(spec_path)]
        proc = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        if not result_path.exists():
            raise RuntimeError(f"the namespace run wrote no result (rc {proc.returncode}): {proc.stderr[-3000:]}")
        return json.loads(result_path.read_text())


def _ray(*args: str, env: dict) -> None:
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, *args], check=True, env=env, capture_output=True, timeout=300)


def _sockets(into: set) -> None:
    """Every inet socket's local and remote address in this namespace."""
    import psutil

    for c in psutil.net_connections(kind="inet"):
        for addr in (c.laddr, c.raddr):
            if addr:
                into.add(addr.ip)


def _loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, an IPv4-mapped IPv6 address by the IPv4 address it maps."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _node2_task_running(node2: set[int]) -> bool:
    import psutil

    for pid in list(node2):
        try:
            for child in psutil.Process(pid).children(recursive=True):
                if TASK_TITLE in " ".join(child.cmdline()):
                    return True
        except psutil.Error:
            continue
    return False


def _task_pids() -> set[int]:
    """Processes of the namespace running an evaluation task now."""
    import psutil

    pids = set()
    for p in psutil.process_iter():
        try:
            if TASK_TITLE in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.Error:
            continue
    return pids


def _interrupted(argv: list[str], env: dict, after: float, timeout: float) -> dict:
    """Run a driver, SIGINT it `after` seconds into its first running task (Ctrl-C), and follow the
    task processes running then: which ended while the driver still ran (cancelled by it, not
    reaped with its job), which are left once it exited."""
    import psutil

    start = time.perf_counter()
    from hirelc_onnx.kill_points import default_sigint

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    tasks: set[int] = set()
    while proc.poll() is None and time.perf_counter() - start < timeout:
        tasks = _task_pids()
        if tasks:
            break
        time.sleep(0.2)
    if tasks:
        time.sleep(after)
        tasks = _task_pids() or tasks
    proc.send_signal(signal.SIGINT)
    signalled = time.perf_counter()
    gone_before_exit: set[int] = set()
    while proc.poll() is None and time.perf_counter() - signalled < 60:
        gone_before_exit |= {pid for pid in tasks if not psutil.pid_exists(pid)}
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate()
    return {"argv": argv, "rc": proc.returncode, "seconds": time.perf_counter() - start,
            "exit_seconds": time.perf_counter() - signalled, "task_pids": sorted(tasks),
            "ended_before_driver_exit": sorted(gone_before_exit),
            "tasks_left": sorted(_task_pids()), "stdout": stdout[-200_000:], "stderr": stderr[-5000:]}


def _kill_tree(pids: set[int]) -> int:
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    return len(procs)


def _main(spec_path: str) -> None:
    """Inside the namespace: spec = {commands: [[argv...] or {argv, kill_node2, interrupt}, ...],
    cpus: [head, node2], kill_node2: bool (the default of each command), tmp, result}. Each command
    gets ADDRESS replaced by the head's address; `interrupt` (seconds into its first task) runs it
    as `_interrupted` does."""
    import psutil

    spec = json.loads(Path(spec_path).read_text())
    out: dict = {"commands": [], "sockets": [], "killed": 0}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    env = dict(os.environ)
    address = f"127.0.0.1:{PORT}"
    head_cpus, node2_cpus = spec.get("cpus", [1, 1])
    t0 = time.perf_counter()
    _ray("start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(PORT), "--num-cpus", str(head_cpus),
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(Path(spec["tmp"]) / "ray"), env=env)
    before = {p.pid for p in psutil.process_iter()}
    _ray("start", "--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(node2_cpus),
         "--disable-usage-stats", env=env)
    node2 = {p.pid for p in psutil.process_iter()} - before - {os.getpid()}
    out["cluster_start_seconds"] = time.perf_counter() - t0
    seen: set[str] = set()
    stop = threading.Event()
    kill = [False]  # the running command's: kill node 2 once a task runs there (once per run)

    def watch() -> None:
        while not stop.is_set():
            _sockets(seen)
            if kill[0] and not out["killed"] and _node2_task_running(node2):
                time.sleep(spec.get("kill_after", 2.0))  # mid-task
                out["killed"] = _kill_tree(node2)
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for entry in spec["commands"]:
        entry = entry if isinstance(entry, dict) else {"argv": entry}
        argv = [a.replace("ADDRESS", address) for a in entry["argv"]]
        kill[0] = entry.get("kill_node2", spec.get("kill_node2", False))
        if "interrupt" in entry:
            out["commands"].append(_interrupted(argv, env, entry["interrupt"], spec.get("command_timeout", 900)))
            continue
        start = time.perf_counter()
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=spec.get("command_timeout", 900))
        out["commands"].append({"argv": argv, "rc": res.returncode, "seconds": time.perf_counter() - start,
                                "stdout": res.stdout[-200_000:], "stderr": res.stderr[-5000:]})
    stop.set()
    watcher.join(timeout=10)
    _sockets(seen)
    out["sockets"] = sorted(seen)
    out["outside_loopback"] = sorted(ip for ip in seen if not _loopback(ip))
    Path(spec["result"]).write_text(json.dumps(out))


if __name__ == "__main__":
    _main(sys.argv[1])
