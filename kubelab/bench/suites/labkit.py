"""A benchmark lab: one netlab lab in which every proxy mode takes its turn.

The lab is brought up with ``proxyMode: none`` (on the host kernel, or
inside one User-Mode Linux kernel with ``kernel: uml``), so the pods,
addresses and kernel stay the same while the bench starts ``kubelab proxy
--proxy-mode M`` on node1 itself, measures, stops it and runs ``kubelab
proxy --cleanup`` before the next mode: modes alternate run by run (ABAB)
in one kernel, which is what makes their ratios fair on a noisy machine.

Topology (two nodes, so service traffic is routed and NATed like in a
cluster): the ``client`` pod on node1, where the proxy under test runs; the
``ref`` pod on node2, a second client whose traffic never passes node1's
rules (the scale suite's reference); the backends on node2, each running a
real server as its pod command:

* ``web``   -- haproxy answering every HTTP request itself (port 8080),
* ``bulk``  -- ``iperf3 -s`` (port 5201),
* ``dns``   -- dnsmasq answering ``bench.test`` (port 53/UDP),
* ``echo``  -- the lab's built-in echo server (port 9000, ``pod=NAME``).

Services ``bench/web`` (80), ``bench/bulk`` (5201), ``bench/dns``
(53/UDP) and ``bench/echo`` (9000) select them.  Clients (curl, wrk,
iperf3, dnsperf and :mod:`kubelab.bench.suites.probe`) run in the client
pod with ``lab.exec``; a direct connection to the pod IP is the baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubelab.netlab.lab import Lab, LabSpec

PROBE = str(Path(__file__).with_name("probe.py"))
NS = "bench"
METRICS = "127.0.0.1:10249"

RESPONDER_CFG = """\
global
  maxconn 4000
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  maxconn 4000
frontend web
  bind 0.0.0.0:8080
  http-request return status 200 content-type text/plain string "hello from the backend"
"""


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and how to look further."""


def service_doc(name: str, port: int, target: int, proto: str = "TCP", app: str | None = None) -> dict:
    """A ClusterIP Service ``bench/NAME`` with one port, selecting ``app: APP`` (default NAME)."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"selector": {"app": app or name},
                     "ports": [{"name": "p", "port": port, "targetPort": target, "protocol": proto}]}}


def pod_doc(name: str, node: str, command: list[str] | None = None, ports: list[dict] | None = None,
            app: str | None = None) -> dict:
    """A pod ``bench/NAME`` on ``node``: a real ``command``, or the lab's built-in servers on ``ports``."""
    container: dict = {"name": "c"}
    if command:
        container["command"] = command
    if ports:
        container["ports"] = ports
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": app or name}},
            "spec": {"nodeName": node, "containers": [container]}}


def echo_pod(name: str, app: str = "echo", node: str = "node2", ip: str = "") -> dict:
    """A pod running the lab's built-in TCP echo on 9000 (answers ``pod=NAME``); ``ip`` pins its address."""
    pod = pod_doc(name, node, ports=[{"name": "echo", "containerPort": 9000}], app=app)
    if ip:
        pod["status"] = {"podIP": ip}
    return pod


def more_echo_pods(replicas: int, node: str = "node2") -> dict:
    """Deployment ``bench/echo-more``: ``replicas`` more echo pods behind every ``app: echo`` Service, deleted at once when scaled down."""
    template = echo_pod("x", node=node)
    template["spec"]["terminationGracePeriodSeconds"] = 0
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo-more", "namespace": NS},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "echo"}},
                     "template": {"metadata": {"labels": {"app": "echo"}}, "spec": template["spec"]}}}


def scale_services(count: int, start: int = 0) -> list[dict]:
    """``count`` extra ClusterIP Services ``bench/s<i>`` over the echo pod (a Service selects pods of its own namespace)."""
    return [service_doc(f"s{i}", 9000, 9000, app="echo") for i in range(start, start + count)]


def probe_service() -> dict:
    """``bench/zz-probe``, the Service the scale suite connects to: it sorts last in the KUBE-SERVICES walk."""
    return service_doc("zz-probe", 9000, 9000, app="echo")


@dataclass
class RunningProxy:
    mode: str
    pid: int
    log: str
    started: float
    args: tuple[str, ...] = ()


@dataclass
class BenchLab:
    """A lab for the bench (see module docstring); ``with BenchLab(...) as bl``."""

    name: str
    kernel: str = "host"  # host | uml
    extra: list[dict] = field(default_factory=list)
    python: str = sys.executable
    workdir: Path | None = None
    lab: Lab | None = None
    proxy: RunningProxy | None = None
    warnings: list[str] = field(default_factory=list)  # for the results' notes
    _started_pids: list[int] = field(default_factory=list)

    # -- lifecycle -------------------------------------------------------

    def __enter__(self) -> BenchLab:
        self.workdir = Path(tempfile.mkdtemp(prefix="kl-bench-"))
        (self.workdir / "responder.cfg").write_text(RESPONDER_CFG)
        docs = [
            service_doc("web", 80, 8080), service_doc("bulk", 5201, 5201), service_doc("dns", 53, 53, "UDP"), service_doc("echo", 9000, 9000),
            pod_doc("client", "node1"),
            # The data path's direct baseline runs from its own pod: IPVS keeps a
            # connection entry for 2 minutes after a proxied connection closes,
            # and a direct connection from the same client IP:port to the same
            # backend then has its SYN-ACK rewritten to the ClusterIP (the reply
            # matches that entry), so the client drops it and retries after 1 s.
            pod_doc("client-direct", "node1"),
            pod_doc("ref", "node2"),
            pod_doc("web", "node2", ["haproxy", "-db", "-f", str(self.workdir / "responder.cfg")]),
            pod_doc("bulk", "node2", ["iperf3", "-s", "-p", "5201"]),
            pod_doc("dns", "node2", ["dnsmasq", "-k", "-C", "/dev/null", "-p", "53", "--no-resolv", "--no-hosts",
                                  "--address=/bench.test/10.1.2.3", "--cache-size=0", "--log-facility=/dev/null",
                                  "--pid-file=", "--user=root", "--dns-forward-max=10000"]),
            echo_pod("echo"),
            *self.extra,
        ]
        spec = LabSpec.from_dict({"nodes": ["node1", "node2"], "proxyMode": "none", "kernel": self.kernel}, docs,
                                 name=self.name, source="<kubelab bench>")
        self.lab = Lab.up(spec)
        try:
            if self.lab.kernel == "uml":
                # The UML kernel has no nft NAT: tell the iptables backend
                # detection to use legacy, the way kubelet does on a node
                # (its KUBE-IPTABLES-HINT chain in mangle, which kube-proxy's
                # iptables-wrapper follows).
                self.must("node1", ["iptables-legacy", "-w", "-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
            self.wait_backends()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.proxy is not None:
                with contextlib.suppress(Exception):
                    self.stop_proxy()
        finally:
            # Host-kernel proxies were started by us, not by the lab daemon:
            # make sure none outlives the lab (UML ones die with the kernel).
            if self.kernel == "host":
                for pid in self._started_pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if self.lab is not None:
                self.lab.down()
                self.lab = None
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- addresses -------------------------------------------------------

    def service_ip(self, name: str, namespace: str = NS) -> str:
        return self.lab.service_ip(f"{namespace}/{name}")

    def pod_ip(self, name: str) -> str:
        return self.lab.pod_ip(f"{NS}/{name}")

    def target(self, what: str, via: str) -> str:
        """Address of backend ``what``: the pod IP (``via='direct'``) or its ClusterIP."""
        return self.pod_ip(what) if via == "direct" else self.service_ip(what)

    # -- running things --------------------------------------------------

    def exec(self, where: str, argv: list[str], timeout: float = 60.0):
        r = self.lab.exec(where if "/" in where or where.startswith("node") else f"{NS}/{where}", argv, timeout=timeout)
        return r

    def must(self, where: str, argv: list[str], timeout: float = 60.0) -> str:
        r = self.exec(where, argv, timeout)
        if r.returncode != 0:
            raise BenchError(f"`{shlex.join(argv)}` in {where} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")
        return r.stdout

    def probe(self, cmd: str, host: str, port: int, *args: str | int, timeout: float = 120.0, pod: str = "client") -> dict:
        """Run :mod:`~kubelab.bench.suites.probe` ``CMD HOST PORT ARGS`` in ``pod`` (default the client pod); its JSON."""
        out = self.must(pod, [self.python, PROBE, cmd, host, str(port), *map(str, args)], timeout)
        return json.loads(out.strip().splitlines()[-1])

    def clock_offset(self) -> float:
        """Lab wall clock minus this process's (0 on the host kernel; UML keeps its own clock).

        Bracketed reads (``date`` run in the lab between two local reads);
        the median of five, error within half the round trip.
        """
        if self.lab.kernel != "uml":
            return 0.0
        offsets = []
        for _ in range(5):
            t0 = time.time()
            out = self.must("node1", ["date", "+%s.%N"], timeout=20)
            t1 = time.time()
            offsets.append(float(out.strip()) - (t0 + t1) / 2)
        offsets.sort()
        return offsets[2]

    def wait_backends(self, timeout: float = 60.0) -> None:
        """Every backend answers directly from the client pod (servers started, addresses up)."""
        deadline = time.monotonic() + timeout
        checks = [("web", 8080, "rtt"), ("echo", 9000, "syn"), ("bulk", 5201, "syn"), ("dns", 53, "udp")]
        for name, port, kind in checks:
            while True:
                try:
                    r = self.probe(kind, self.pod_ip(name), port, 1, timeout=30)
                    if r["us"]:
                        break
                except BenchError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"backend {name} ({self.pod_ip(name)}:{port}) does not answer within {timeout:.0f}s; "
                                     f"see the pod log under {self.lab.logs_dir}")
                time.sleep(0.3)

    # -- the proxy under test -------------------------------------------

    def start_proxy(self, mode: str, extra_args: tuple[str, ...] = (), fresh: bool = False) -> RunningProxy:
        """Have ``kubelab proxy --proxy-mode MODE`` running on node1, synced.

        A proxy of another mode is stopped and cleaned up first; one of the
        same mode (and arguments) keeps running unless ``fresh`` asks for a
        new process (to measure its first full sync).  Suites leave their
        proxy running, so consecutive suites on one mode skip a restart.
        """
        p = self.proxy
        if p is not None and not fresh and p.mode == mode and p.args == tuple(extra_args) and self.proxy_alive():
            self.wait_synced()
            return p
        if p is not None:
            self.stop_proxy()
        log = str(self.workdir / f"proxy-{mode}-{time.monotonic_ns()}.log")
        argv = [self.python, "-m", "kubelab", "proxy", "--proxy-mode", mode, "--source", str(self._manifests()),
                "--hostname-override", "node1", "--cluster-cidr", "10.244.0.0/16", "--metrics-bind-address", METRICS,
                *extra_args]
        script = f"{shlex.join(argv)} >{shlex.quote(log)} 2>&1 </dev/null & echo $!"
        out = self.must("node1", ["sh", "-c", script], timeout=30)
        pid = int(out.strip().splitlines()[-1])
        self._started_pids.append(pid)
        self.proxy = RunningProxy(mode, pid, log, time.time(), tuple(extra_args))
        self.wait_synced()
        return self.proxy

    def _manifests(self) -> Path:
        state = self.lab.state()
        if self.lab.kernel == "uml":
            return Path(state["innerDir"]) / "manifests"
        return self.lab.manifests_dir

    def metrics(self) -> dict[str, float]:
        """The running proxy's Prometheus samples (name{labels} -> value)."""
        r = self.exec("node1", ["curl", "-s", "--max-time", "5", f"http://{METRICS}/metrics"], timeout=20)
        out: dict[str, float] = {}
        if r.returncode != 0:
            return out
        for line in r.stdout.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
        return out

    def proxy_alive(self) -> bool:
        """False only when the proxy is known to be gone.

        A check that fails or times out says nothing about the proxy: inside UML a
        proxy loading 10,000 Services can starve the exec long enough (both UML
        10,000-Service points of a full run were lost as "exited" with a healthy log).
        """
        if self.proxy is None:
            return False
        r = self.exec("node1", ["sh", "-c", f"kill -0 {self.proxy.pid} 2>/dev/null && echo alive || echo gone"], timeout=60)
        return r.stdout.strip() != "gone"

    def wait_synced(self, after: float = 0.0, timeout: float = 300.0) -> dict[str, float]:
        """Wait until the proxy's last successful sync is later than ``after`` (wall clock), and return its metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            last = m.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", 0.0)
            if last > 0 and last > after:
                return m
            failures = self._log_text().count("sync failed")
            if failures >= 3:
                raise BenchError(f"kubelab proxy --proxy-mode {self.proxy.mode} failed {failures} syncs in a row; "
                                 f"its log:\n{self.proxy_log(6)}")
            if not self.proxy_alive():
                raise BenchError(f"kubelab proxy --proxy-mode {self.proxy.mode} exited; its log:\n{self.proxy_log()}"
                                 + self._kernel_says())
            if time.monotonic() > deadline:
                raise BenchError(f"kubelab proxy --proxy-mode {self.proxy.mode} did not sync within {timeout:.0f}s; "
                                 f"its log:\n{self.proxy_log()}")
            time.sleep(0.2)

    def _kernel_says(self) -> str:
        """The UML kernel's last messages (a proxy killed without a word in its log was often killed by the kernel)."""
        if self.lab.kernel != "uml":
            return ""
        r = self.exec("node1", ["dmesg"], timeout=30)
        lines = [x for x in r.stdout.splitlines() if "cbr0" not in x and "ADDRCONF" not in x and "promiscuous" not in x]
        return "\nthe UML kernel's last messages:\n" + "\n".join("  | " + x[:300] for x in lines[-5:]) if lines else ""

    def _log_text(self) -> str:
        try:
            return Path(self.proxy.log).read_text(errors="replace") if self.proxy else ""
        except OSError:
            return ""

    def proxy_log(self, lines: int = 15) -> str:
        text = self._log_text().splitlines()
        return "\n".join("  | " + x[:300] for x in text[-lines:]) if text else "  | (empty)"

    def kube_leftovers(self) -> list[str] | None:
        """KUBE- chains and rules, and IPVS services, still programmed on node1; None when no iptables-save works.

        The bench's own ``KUBE-IPTABLES-HINT`` (the backend hint of a UML
        lab) is not a leftover.
        """
        left: list[str] = []
        saved = False
        for save in ("iptables-legacy-save", "iptables-nft-save"):
            r = self.exec("node1", [save], timeout=60)
            if r.returncode != 0:
                continue  # that backend is not in this kernel
            saved = True
            left += [line for line in r.stdout.splitlines()
                     if "KUBE-" in line and "KUBE-IPTABLES-HINT" not in line and not line.startswith("#")]
        r = self.exec("node1", ["ipvsadm", "-Sn"], timeout=30)
        if r.returncode == 0:
            left += [line for line in r.stdout.splitlines() if line.startswith("-A ")]
        return left if saved else None

    def rss_bytes(self) -> int:
        """Resident memory of the running proxy process."""
        out = self.must("node1", ["cat", f"/proc/{self.proxy.pid}/status"], timeout=10)
        m = re.search(r"VmRSS:\s+(\d+) kB", out)
        if not m:
            raise BenchError(f"no VmRSS for the proxy (pid {self.proxy.pid})")
        return int(m.group(1)) * 1024

    def stop_proxy(self) -> None:
        """Stop the proxy (SIGTERM, then SIGKILL) and remove what its mode programmed (``--cleanup``)."""
        p = self.proxy
        if p is None:
            return
        self.proxy = None
        self.exec("node1", ["kill", "-TERM", str(p.pid)], timeout=10)
        deadline = time.monotonic() + 20
        while self.exec("node1", ["kill", "-0", str(p.pid)], timeout=10).returncode == 0:
            if time.monotonic() > deadline:
                self.exec("node1", ["kill", "-KILL", str(p.pid)], timeout=10)
                break
            time.sleep(0.1)
        r = self.exec("node1", [self.python, "-m", "kubelab", "proxy", "--proxy-mode", p.mode, "--cleanup",
                                "--hostname-override", "node1"], timeout=120)
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip()[-500:]
            left = self.kube_leftovers()
            if left is None or left:
                raise BenchError(f"kubelab proxy --proxy-mode {p.mode} --cleanup failed: {why}"
                                 + (f"; still programmed: {', '.join(left[:5])}" if left else ""))
            # --cleanup reported an error (e.g. inside UML it also sweeps the
            # nf_tables backend, which that kernel does not have) but what
            # the next mode cares about is verified gone: go on, say so.
            self.warnings.append(f"kubelab proxy --proxy-mode {p.mode} --cleanup exited {r.returncode} in the "
                                 f"{self.kernel} lab, yet no KUBE- rule or IPVS service was left: {why.splitlines()[-1][:300]}")
        if self.exec("node1", ["conntrack", "-F"], timeout=20).returncode != 0:
            pass  # conntrack flush is hygiene only (no stale NAT entries between modes)

    # -- clients ---------------------------------------------------------

    def wrk(self, host: str, port: int, seconds: float, connections: int = 16, pod: str = "client") -> float:
        """Short connections/s: wrk with ``Connection: close`` (every request a new TCP connection)."""
        out = self.must(pod, ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-H", "Connection: close",
                                   f"http://{host}:{port}/"], timeout=seconds + 60)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m:
            raise BenchError(f"wrk printed no rate:\n{out}")
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        if non2xx:
            raise BenchError(f"wrk got {non2xx.group(1)} bad answers from {host}:{port}")
        return float(m.group(1))

    def iperf3(self, host: str, port: int, seconds: float, pod: str = "client") -> float:
        """Bulk TCP throughput, MB/s, from iperf3's receiver side."""
        out = self.must(pod, ["iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J"], timeout=seconds + 60)
        data = json.loads(out)
        if "error" in data:
            raise BenchError(f"iperf3 to {host}:{port}: {data['error']}")
        end = data["end"]["sum_received"]
        return end["bytes"] / end["seconds"] / 1e6

    def dnsperf(self, host: str, port: int, seconds: float, inflight: int = 10, pod: str = "client") -> float:
        """UDP round trips/s: dnsperf (``inflight`` queries outstanding) to dnsmasq."""
        qfile = self.workdir / "queries.txt"
        if not qfile.exists():
            qfile.write_text("bench.test A\n")
        out = self.must(pod, ["dnsperf", "-s", host, "-p", str(port), "-d", str(qfile), "-l", f"{seconds:g}",
                                   "-q", str(inflight), "-c", "1", "-t", "2"], timeout=seconds + 60)
        m = re.search(r"Queries per second:\s+([\d.]+)", out)
        if not m:
            raise BenchError(f"dnsperf printed no rate:\n{out}")
        return float(m.group(1))
