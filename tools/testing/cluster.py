"""A whole cluster on this machine: one hub process and N node processes.

Used by `linguamq demo`, `linguamq bench pipeline` and the integration tests. Every
process is started here and ended here, by its pid; every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from linguamq import topics
from linguamq.schemas.cluster import NodeStatus, Plan
from linguamq.tools.args import PASSWORD_ENV
from linguamq.topics.client import BrokerUrl, MqttClient, MqttTimeout


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    name: str
    slowdown: float = 1.0
    threads: int = 1
    mem_budget_mb: float = 0.0
    args: tuple[str, ...] = ()  # more `linguamq node` options (--max-sessions, --kv-max-mb)
    password: str | None = None  # a secured cluster: log in as user `name` (given in the environment)


def linguamq_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "linguamq.tools.cli", *args]


class LocalCluster:
    def __init__(self, *, artifacts: Path, nodes: list[NodeSpec], workdir: Path, cluster: str = "home",
                 broker_url: str | None = None, log_level: str = "warning", settle_s: float = 0.5,
                 objective: str = "latency", hub_args: tuple[str, ...] = ()) -> None:
        self.artifacts, self.nodes, self.workdir, self.cluster = Path(artifacts), nodes, Path(workdir), cluster
        self.objective = objective
        self.hub_args = tuple(hub_args)  # more `linguamq hub` options (--plan-sessions, --drift-ratio)
        self._broker_arg, self._log_level, self._settle = broker_url, log_level, settle_s
        self.url = broker_url or ""
        self.http: str | None = None
        self.hub: subprocess.Popen | None = None
        self.node_procs: dict[str, subprocess.Popen] = {}
        self.plan: Plan | None = None

    # --- processes -----------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_hub(timeout=timeout)
        for spec in self.nodes:
            self.start_node(spec)
        return self

    def start_hub(self, *, port: int = 0, timeout: float = 60.0) -> float:
        """Start the hub (its embedded broker on ``port``; 0: any free); returns the wall-clock
        time (time.time()) at which it reported ready."""
        broker = ["--broker", self._broker_arg] if self._broker_arg else ["--port", str(port)]
        self.hub = self._spawn("hub", ["hub", "--artifacts", str(self.artifacts), *broker, "--cluster", self.cluster,
                                       "--min-nodes", str(len(self.nodes)), "--settle", str(self._settle), "--json",
                                       "--objective", self.objective, *self.hub_args],
                               stdout=subprocess.PIPE)
        ready = self._read_ready_line(self.hub, timeout)
        self.url = ready["broker"]
        self.http = ready.get("http")  # the OpenAI API and dashboard (hub --http), else None
        return time.time()

    def kill_hub(self, sig: int = signal.SIGKILL) -> None:
        """End the hub (broker, planner, head) with ``sig``; its broker and HTTP gateway children
        stop when the hub's end closes their stdin. Returns once their ports accept no connection."""
        hub, self.hub = self.hub, None
        assert hub is not None, "no hub running"
        os.kill(hub.pid, sig)
        hub.wait(timeout=15)
        if hub.stdout:
            hub.stdout.close()
        url = BrokerUrl.parse(self.url)
        _wait_closed(url.host, url.port, "the hub's broker")
        if self.http:  # the HTTP gateway's child stops the same way
            host, _, port = self.http.removeprefix("http://").rpartition(":")
            _wait_closed(host, int(port), "the hub's HTTP gateway")

    def restart_hub(self, sig: int = signal.SIGKILL, timeout: float = 60.0) -> float:
        """Kill the hub and start a new one on the same broker port (nodes reconnect to it);
        returns the time (time.time()) the new hub reported ready."""
        port = BrokerUrl.parse(self.url).port
        self.kill_hub(sig)
        return self.start_hub(port=port, timeout=timeout)

    def start_node(self, spec: NodeSpec) -> subprocess.Popen:
        args = ["node", "--broker", self.url, "--cluster", self.cluster, "--name", spec.name,
                "--cache", str(self.workdir / f"cache-{spec.name}"), "--threads", str(spec.threads),
                "--slowdown", str(spec.slowdown), "--mem-budget", str(spec.mem_budget_mb), "--no-spin", *spec.args]
        env = None
        if spec.password is not None:
            args += ["--username", spec.name]
            env = {**os.environ, PASSWORD_ENV: spec.password}
        proc = self._spawn(spec.name, args, env=env)
        self.node_procs[spec.name] = proc
        return proc

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a node (SIGSTOP/SIGCONT freeze and thaw it; SIGKILL/SIGTERM are waited for)."""
        proc = self.node_procs[name]
        os.kill(proc.pid, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=15)

    def stop(self) -> None:
        procs = [*self.node_procs.values(), *([self.hub] if self.hub else [])]
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a frozen node cannot act on SIGTERM
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if self.hub is not None and self.hub.stdout:
            self.hub.stdout.close()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str], stdout: int = subprocess.DEVNULL,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        with (self.workdir / f"{name}.log").open("ab") as log:
            return subprocess.Popen(linguamq_argv("--log-level", self._log_level, *args), stdout=stdout,
                                    stderr=log, stdin=subprocess.DEVNULL, env=env)

    def _read_ready_line(self, proc: subprocess.Popen, timeout: float) -> dict:
        box: list[bytes] = []
        stdout = proc.stdout
        assert stdout is not None, "spawned with stdout=PIPE"
        reader = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise MqttTimeout(f"hub did not report ready within {timeout:.0f} s; see {self.workdir / 'hub.log'}:\n"
                              + self.log_tail("hub"))
        return json.loads(box[0])

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # --- cluster state ---------------------------------------------------------------

    def wait_ready(self, client: MqttClient, *, nodes: int | None = None, timeout: float = 60.0,
                   after_epoch: int = 0) -> Plan:
        """Wait for a plan newer than ``after_epoch`` whose stages all report ready; with
        ``nodes``, a plan of exactly that many stages (None: as many as the planner chose)."""
        latest: dict[str, Plan] = {}  # "plan": the last plan seen
        statuses: dict[str, NodeStatus] = {}
        done = threading.Event()
        lock = threading.Lock()

        def check() -> None:
            plan = latest.get("plan")
            if plan is not None and plan.epoch > after_epoch and nodes in (None, len(plan.stages)) and all(
                    (s := statuses.get(st.node)) and s.state == "ready" and s.epoch == plan.epoch
                    for st in plan.stages):
                done.set()

        def on_plan(_t: str, plan: Plan, _r: bool) -> None:
            with lock:
                latest["plan"] = plan
                check()

        def on_status(_t: str, status: NodeStatus, _r: bool) -> None:
            with lock:
                statuses[status.node] = status
                check()

        plan_filter, status_filter = topics.PLAN.build(self.cluster), topics.NODE_STATUS.filter(self.cluster)
        client.subscribe(topics.PLAN, plan_filter, on_plan)
        client.subscribe(topics.NODE_STATUS, status_filter, on_status)
        try:
            if not done.wait(timeout):
                raise MqttTimeout(f"cluster not ready within {timeout:.0f} s: plan {latest.get('plan')}, "
                                  f"status {statuses}\nhub log:\n{self.log_tail('hub')}")
        finally:
            client.unsubscribe(plan_filter)
            client.unsubscribe(status_filter)
        self.plan = plan = latest["plan"]  # done: there is one
        return plan


def _wait_closed(host: str, port: int, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.05)
    raise MqttTimeout(f"{what} still accepts connections on {port} {timeout:.0f} s after the hub ended")
