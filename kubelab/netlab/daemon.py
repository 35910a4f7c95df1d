"""The lab daemon: one process per lab that is its API server, controllers and kubelet.

``Lab.up`` starts it (``python -m kubelab.netlab.daemon LAB_DIR``); it

1. builds the topology (:mod:`kubelab.netlab.topology`) and every pod,
2. serves the pods' built-in workloads from its own event loop and runs the
   pods that have a command (and ``kubelab dns``) as child processes,
3. writes the lab's objects as manifest files into ``LAB_DIR/manifests``
   (nodes, services, pods, and the EndpointSlices the endpoints controller
   derives) which every node's ``kubelab proxy --source`` watches,
4. starts ``kubelab proxy`` in every node namespace (unless proxyMode none),
5. reports readiness (or the error) on the fd ``Lab.up`` waits on, then
   serves requests on ``LAB_DIR/ctl.sock``: one JSON object per line in, one
   out -- ``apply``, ``delete``, ``status``, ``synced``, ``shutdown``.

Deleting a pod marks it terminating (its endpoints turn ready=false,
serving=true, terminating=true) and a timer removes it after its grace
period -- which is why the lab needs a process that outlives the CLI.

State the host side reads without asking (``LAB_DIR/state.json``) is
rewritten after every change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kubelab.model import Origin, Pod
from kubelab.netlab import nsutil, topology
from kubelab.netlab.cluster import Cluster
from kubelab.netlab.spec import Document, LabSpec, LabSpecError
from kubelab.netlab.workloads import Workloads, expand, pod_command, pod_env

log = logging.getLogger("kubelab.netlab.daemon")

PR_SET_PDEATHSIG = 1
PROXY_METRICS_PORT = 10249
# A control request is one JSON line; asyncio's StreamReader refuses lines over
# its limit (64 KiB by default), and one `lab.apply` of a few hundred objects
# is larger than that.  Also used by the UML lab host (kubelab.netlab.umllab).
CTL_LINE_LIMIT = 256 << 20


def _die_with_parent() -> None:
    # Children (proxies, pod commands) must not outlive the daemon: the kernel
    # signals them when it exits, even when it is SIGKILLed.
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class DaemonDeps:
    """What a lab daemon is built from."""

    spec: LabSpec
    lab_dir: Path
    python: str = sys.executable
    ready_fd: int | None = None
    # Inside UML (see kubelab.netlab.umllab) there is no pipe from the host:
    # readiness goes to a file on hostfs, and the control socket lives on the
    # UML kernel's own tmpfs (a socket file on hostfs is not connectable from the host).
    ready_file: Path | None = None
    ctl_path: Path | None = None


@dataclass
class _Proc:
    name: str  # "proxy/node1" or "pod/ns/name"
    argv: list[str]
    log_path: Path
    netns: str
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = False
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    exit_code: int | None = None
    task: asyncio.Task | None = None
    stopping: bool = False


class LabDaemon:
    """One lab's daemon (see module docstring).  The constructor starts nothing; :meth:`run` does."""

    def __init__(self, deps: DaemonDeps):
        self.deps = deps
        self.spec = deps.spec
        self.settings = deps.spec.settings
        self.lab = self.settings.name
        self.dir = deps.lab_dir
        self.manifest_dir = self.dir / "manifests"
        self.log_dir = self.dir / "logs"
        self.cluster: Cluster | None = None
        self.topology: topology.Topology | None = None
        self.workloads = Workloads()
        self.procs: dict[str, _Proc] = {}
        self.timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.written_at = 0.0
        self._written: dict[str, str] = {}
        self._stop = None  # asyncio.Event, made in run()
        # pyroute2's sync API runs its own event loop, so netlink work goes to one
        # worker thread (made in run()); namespace switches are per thread anyway.
        self._net: ThreadPoolExecutor | None = None
        self._server = None

    # ------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------

    async def run(self) -> int:
        self._stop = asyncio.Event()
        self._net = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.build()
        except Exception as exc:
            log.error("lab %s failed to come up: %s\n%s", self.lab, exc, traceback.format_exc())
            self._report({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            await self.shutdown()
            return 1
        self._report({"ok": True})
        log.info("lab %s is up", self.lab)
        await self._stop.wait()
        await self.shutdown()
        return 0

    def _report(self, message: dict) -> None:
        if self.deps.ready_file is not None:
            tmp = self.deps.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(message) + "\n")
            os.replace(tmp, self.deps.ready_file)
        fd = self.deps.ready_fd
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, (json.dumps(message) + "\n").encode())
            os.close(fd)
        self.deps.ready_fd = None

    async def build(self) -> None:
        started = time.monotonic()
        for d in (self.manifest_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.cluster = self.spec.build_cluster()
        self.topology = topology.Topology(self.settings)
        await self._netcall(self.topology.build_underlay)
        for i in range(len(self.settings.nodes)):
            await self._netcall(self.topology.build_node, i)
        log.info("topology: %d nodes in %.2fs", len(self.settings.nodes), time.monotonic() - started)
        for pod in self.cluster.pod_objects():
            await self.start_pod(pod)
        log.info("pods: %d in %.2fs", len(self.cluster.pods), time.monotonic() - started)
        self.write_manifests()
        if self.settings.proxy_mode != "none":
            for node in self.settings.nodes:
                self.start_proxy(node.name)
        ctl = self.deps.ctl_path or self.dir / "ctl.sock"
        ctl.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(ctl), limit=CTL_LINE_LIMIT)
        self.write_state()
        log.info("lab up in %.2fs", time.monotonic() - started)

    async def shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for handle in self.timers.values():
            handle.cancel()
        await self.workloads.stop_all()
        await asyncio.gather(*(self._stop_proc(p) for p in list(self.procs.values())), return_exceptions=True)
        if self.topology is not None:
            await self._netcall(self.topology.close)
        await self._netcall(topology.teardown, self.lab)
        self._net.shutdown(wait=True)
        log.info("lab %s is down", self.lab)

    async def _netcall(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._net, fn, *args)

    # ------------------------------------------------------------------
    # pods
    # ------------------------------------------------------------------

    def pod_netns(self, pod: Pod) -> str:
        if pod.host_network:
            return topology.node_ns(self.lab, pod.node_name)
        return topology.pod_ns(self.lab, pod.namespace, pod.name)

    async def start_pod(self, pod: Pod) -> None:
        resolv = None
        dns_policy = (self.cluster.pods[(pod.namespace, pod.name)].raw.get("spec") or {}).get("dnsPolicy", "ClusterFirst")
        # kubelet: ClusterFirst pods resolve through the cluster DNS; "Default" ones
        # (like the DNS pod itself, which would otherwise ask itself) use the node's.
        if self.settings.dns.enabled and dns_policy == "ClusterFirst" and not pod.host_network:
            resolv = topology.resolv_conf(pod.namespace, self.settings.dns_cluster_ip, self.settings.cluster_domain)
        if not pod.host_network:
            await self._netcall(self.topology.build_pod, pod.namespace, pod.name, pod.node_name, pod.pod_ip, resolv)
        await self.start_workload(pod)

    async def start_workload(self, pod: Pod) -> None:
        netns = self.pod_netns(pod)
        command = pod_command(pod)
        if command:
            env = pod_env(pod, {"KUBELAB_MANIFESTS": str(self.manifest_dir), "KUBELAB_PYTHON": self.deps.python})
            argv = [expand(a, env) for a in command]
            name = f"pod/{pod.namespace}/{pod.name}"
            await self._stop_proc(self.procs.get(name))
            self._start_proc(
                _Proc(name, argv, self.log_dir / f"pod-{pod.namespace}.{pod.name}.log", netns, env, restart=True)
            )
        else:
            bind_ip = pod.pod_ip if pod.host_network else "0.0.0.0"
            await self.workloads.start_pod(pod, netns, bind_ip)

    async def finalize_pod(self, namespace: str, name: str) -> None:
        """The grace period is over: stop the pod, remove its namespace and endpoints."""
        self.timers.pop((namespace, name), None)
        pod = self.cluster.remove_pod(namespace, name)
        if pod is None:
            return
        await self.workloads.stop_pod(namespace, name)
        await self._stop_proc(self.procs.pop(f"pod/{namespace}/{name}", None), kill=True)
        if not pod.host_network:
            await self._netcall(self.topology.remove_pod, namespace, name)
        self.write_manifests()
        self.write_state()
        log.info("pod %s/%s removed", namespace, name)

    async def delete_pod(self, namespace: str, name: str, grace: int | None) -> int:
        period = self.cluster.delete("Pod", namespace, name, grace)
        if (namespace, name) in self.timers:
            if grace is None:
                return period
            self.timers.pop((namespace, name)).cancel()
        proc = self.procs.get(f"pod/{namespace}/{name}")
        if proc is not None and proc.process is not None:
            # kubelet: SIGTERM now, SIGKILL when the grace period ends.
            proc.restart = False
            with contextlib.suppress(ProcessLookupError):
                proc.process.send_signal(signal.SIGTERM)
        self.write_manifests()
        self.write_state()
        loop = asyncio.get_running_loop()
        if period <= 0:
            await self.finalize_pod(namespace, name)
        else:
            self.timers[(namespace, name)] = loop.call_later(
                period, lambda: asyncio.ensure_future(self.finalize_pod(namespace, name))
            )
        return period

    # ------------------------------------------------------------------
    # processes
    # ------------------------------------------------------------------

    def start_proxy(self, node: str) -> None:
        s = self.settings
        argv = [
            self.deps.python, "-m", "kubelab", "proxy",
            "--proxy-mode", s.proxy_mode,
            "--source", str(self.manifest_dir),
            "--hostname-override", node,
            "--cluster-cidr", s.pod_cidr,
            *s.proxy_args,
        ]
        self._start_proc(_Proc(f"proxy/{node}", argv, self.log_dir / f"proxy-{node}.log", topology.node_ns(self.lab, node)))

    def _start_proc(self, proc: _Proc) -> None:
        self.procs[proc.name] = proc
        proc.task = asyncio.ensure_future(self._supervise(proc))

    async def _supervise(self, proc: _Proc) -> None:
        backoff = 1.0
        while not proc.stopping:
            with open(proc.log_path, "ab") as logf:
                env = dict(os.environ)
                env.update(proc.env)
                env["PYTHONUNBUFFERED"] = "1"
                proc.process = await asyncio.create_subprocess_exec(
                    "ip", "netns", "exec", proc.netns, *proc.argv,
                    stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                    env=env, preexec_fn=_die_with_parent,
                )
            log.info("%s started (pid %d): %s", proc.name, proc.process.pid, " ".join(proc.argv))
            code = await proc.process.wait()
            proc.exit_code = code
            if proc.stopping or not proc.restart:
                if not proc.stopping:
                    log.warning("%s exited with code %s; see %s", proc.name, code, proc.log_path)
                return
            proc.restarts += 1
            log.warning("%s exited with code %s, restarting in %.0fs", proc.name, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _stop_proc(self, proc: _Proc | None, kill: bool = False) -> None:
        if proc is None:
            return
        proc.stopping = True
        p = proc.process
        if p is not None and p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                await asyncio.wait_for(p.wait(), 5)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        if proc.task is not None and not proc.task.done():
            proc.task.cancel()

    # ------------------------------------------------------------------
    # files
    # ------------------------------------------------------------------

    def write_manifests(self) -> None:
        """Rewrite the manifest files whose content changed (atomically: write, then rename)."""
        for name, items in self.cluster.manifests().items():
            text = json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=1, sort_keys=True)
            if self._written.get(name) == text:
                continue
            path = self.manifest_dir / f"{name}.json"
            tmp = self.manifest_dir / f".{name}.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, path)
            self._written[name] = text
            self.written_at = time.time()

    def write_state(self) -> None:
        s = self.settings
        state = {
            "name": self.lab,
            "proxyMode": s.proxy_mode,
            "kernel": "host",
            "daemonPid": os.getpid(),
            "podCIDR": s.pod_cidr,
            "serviceCIDR": s.service_cidr,
            "underlayCIDR": s.underlay_cidr,
            "clusterDomain": s.cluster_domain,
            "dns": {"enabled": s.dns.enabled, "clusterIP": s.dns_cluster_ip if s.dns.enabled else ""},
            "client": {"ip": s.client_ip, "netns": topology.client_ns(self.lab)},
            "gateway": s.gateway_ip,
            "manifests": str(self.manifest_dir),
            "logs": str(self.log_dir),
            "processes": {
                name: {
                    "pid": p.process.pid if p.process else None,
                    "running": bool(p.process and p.process.returncode is None),
                    "exitCode": p.exit_code,
                    "restarts": p.restarts,
                    "log": str(p.log_path),
                }
                for name, p in self.procs.items()
            },
            **self.cluster.snapshot(),
        }
        for name, node in state["nodes"].items():
            node["netns"] = topology.node_ns(self.lab, name)
        for key, pod in state["pods"].items():
            ns, _, name = key.partition("/")
            pod["netns"] = (
                topology.node_ns(self.lab, pod["node"]) if pod["hostNetwork"] else topology.pod_ns(self.lab, ns, name)
            )
        tmp = self.dir / ".state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, self.dir / "state.json")

    # ------------------------------------------------------------------
    # control socket
    # ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await reader.readline()
            except ValueError:  # over CTL_LINE_LIMIT (asyncio.LimitOverrunError)
                line = None
            try:
                if line is None:
                    raise ValueError(f"request larger than {CTL_LINE_LIMIT >> 20} MiB; apply the manifests in parts")
                request = json.loads(line)
                response = await self.handle(request)
            except LabSpecError as exc:
                response = {"ok": False, "error": str(exc), "problems": exc.problems}
            except (KeyError, ValueError) as exc:
                response = {"ok": False, "error": str(exc.args[0] if exc.args else exc)}
            except Exception as exc:  # keep serving; say what broke
                log.error("request failed: %s\n%s", exc, traceback.format_exc())
                response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write((json.dumps(response) + "\n").encode())
            await writer.drain()
        finally:
            writer.close()

    async def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "status":
            self.write_state()
            return {"ok": True, "state": json.loads((self.dir / "state.json").read_text())}
        if op == "apply":
            docs = [Document(d, Origin(src, line)) for d, src, line in request["documents"]]
            return await self.apply(docs)
        if op == "delete":
            return await self.delete(request["kind"], request.get("namespace", "default"), request["name"], request.get("grace"))
        if op == "synced":
            return await self.synced(float(request.get("timeout", 30)))
        if op == "shutdown":
            asyncio.get_running_loop().call_soon(self._stop.set)
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def apply(self, docs: list[Document]) -> dict:
        before = {k: e.obj for k, e in self.cluster.pods.items()}
        result = self.cluster.apply_documents(docs)
        for key in result.added_pods:
            await self.start_pod(self.cluster.pods[key].obj)
        for key in result.updated_pods:
            old, new = before[key], self.cluster.pods[key].obj
            if (pod_command(old), old.ports, old.meta.annotations) != (pod_command(new), new.ports, new.meta.annotations):
                await self.start_workload(new)
        for key in result.scaled_down:
            if key in self.cluster.pods:
                await self.delete_pod(key[0], key[1], None)
        self.write_manifests()
        self.write_state()
        return {
            "ok": True,
            "pods": [f"{ns}/{n}" for ns, n in result.added_pods + result.updated_pods],
            "services": [f"{ns}/{n}" for ns, n in result.services],
            "scaledDown": [f"{ns}/{n}" for ns, n in result.scaled_down],
        }

    async def delete(self, kind: str, namespace: str, name: str, grace) -> dict:
        kind = {"pod": "Pod", "service": "Service", "svc": "Service", "endpointslice": "EndpointSlice",
                "deployment": "Deployment", "deploy": "Deployment"}.get(kind.lower(), kind)
        if kind == "Pod":
            if (namespace, name) not in self.cluster.pods:
                raise KeyError(f"pod {namespace}/{name} not found")
            period = await self.delete_pod(namespace, name, None if grace is None else int(grace))
            return {"ok": True, "gracePeriod": period}
        pods = self.cluster.deployment_pods(namespace, name) if kind == "Deployment" else []
        self.cluster.delete(kind, namespace, name)
        for ns, pod_name in pods:
            await self.delete_pod(ns, pod_name, None if grace is None else int(grace))
        self.write_manifests()
        self.write_state()
        return {"ok": True}

    async def synced(self, timeout: float) -> dict:
        """Wait until every node's proxy has synced after the last manifest write."""
        if self.settings.proxy_mode == "none":
            return {"ok": True}
        deadline = time.monotonic() + timeout
        pending = {n.name for n in self.settings.nodes}
        last_error = ""
        while pending and time.monotonic() < deadline:
            for node in sorted(pending):
                proc = self.procs.get(f"proxy/{node}")
                if proc is not None and proc.process is not None and proc.process.returncode is not None:
                    return {"ok": False, "error": f"proxy on {node} exited with code {proc.process.returncode}; see {proc.log_path}"}
                try:
                    metrics = await self._proxy_metrics(node)
                except OSError as exc:
                    last_error = f"proxy on {node}: metrics not reachable ({exc})"
                    continue
                last = metrics.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", 0.0)
                queued = metrics.get("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", 0.0)
                if last > self.written_at and last >= queued:
                    pending.discard(node)
                else:
                    last_error = f"proxy on {node}: last sync {last:.3f} is older than the manifests ({self.written_at:.3f})"
            if pending:
                await asyncio.sleep(0.1)
        if pending:
            return {"ok": False, "error": f"not synced within {timeout:.0f}s: {last_error}"}
        return {"ok": True}

    async def _proxy_metrics(self, node: str) -> dict[str, float]:
        with nsutil.entered(topology.node_ns(self.lab, node)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(sock=_connected(sock, ("127.0.0.1", PROXY_METRICS_PORT))), 2
            )
        except BaseException:
            sock.close()
            raise
        try:
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            body = (await asyncio.wait_for(reader.read(), 5)).decode(errors="replace")
        finally:
            writer.close()
        out = {}
        for line in body.splitlines():
            if line.startswith("kubeproxy_sync_proxy_rules_last"):
                name, _, value = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out


def _connected(sock: socket.socket, addr) -> socket.socket:
    sock.setblocking(True)
    sock.settimeout(2)
    sock.connect(addr)
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubelab.netlab.daemon", description=__doc__.splitlines()[0])
    parser.add_argument("lab_dir", type=Path)
    parser.add_argument("--ready-fd", type=int, default=None, help="write the one-line readiness report to this fd")
    parser.add_argument("--ready-file", type=Path, default=None, help="... or to this file")
    parser.add_argument("--ctl", type=Path, default=None, help="control socket (default LAB_DIR/ctl.sock)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = pickle.loads((args.lab_dir / "spec.pickle").read_bytes())
    daemon = LabDaemon(
        DaemonDeps(spec=spec, lab_dir=args.lab_dir, ready_fd=args.ready_fd, ready_file=args.ready_file, ctl_path=args.ctl)
    )
    return asyncio.run(daemon.run())


if __name__ == "__main__":
    sys.exit(main())
