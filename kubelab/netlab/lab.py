"""Labs: Kubernetes-shaped clusters of network namespaces, driven from Python or the CLI.

API contract (stable; other rooms' tests use it)::

    from kubelab.netlab.lab import Lab, LabSpec, LabError, LabSpecError

    spec = LabSpec.from_file("examples/labs/basic.yaml", name="t-mytest", proxyMode="iptables")
    spec = LabSpec.from_dict({"nodes": 2, "proxyMode": "none"}, [service_dict, pod_dict], name="t-x")
    with Lab.up(spec) as lab:                      # torn down on exit, also when up fails half-way
        r = lab.exec("web-1", ["curl", "-s", "http://10.96.0.20/"], timeout=10, check=False)
        r.returncode, r.stdout, r.stderr           # subprocess.CompletedProcess (text)
        lab.exec("external", [...]); lab.exec("node1", [...]) # external client / node namespaces
        lab.address("web-1"); lab.address("external")      # any target's IP
        lab.pod_ip("web-1"); lab.pod_ip("kube-system/kubelab-dns-1")
        lab.service_ip("default/web"); lab.node_ip("node1"); lab.client_ip
        lab.node_port("default/web", port=80)      # allocated nodePort of a service port
        lab.apply("more.yaml") / lab.apply([dict, ...])   # raises LabSpecError, nothing changed
        lab.delete("pod/web-1", grace=5)           # endpoints terminating for 5 s, then gone
        lab.wait_synced(timeout=30)                # every node's proxy has synced the last change
        lab.netns("web-1")                         # namespace name, for `ip netns exec` / scapy
        lab.status()                               # dict: nodes, pods, services, processes
    Lab.attach("basic")                            # a lab some other process brought up
    Lab.down_by_name("basic"); Lab.list()

Exec targets: a pod name (``name`` in namespace default, else the first pod
with that name) or ``namespace/name``; a node name; ``external`` (the
client outside the cluster, on the underlay -- also ``client`` when no pod
is named so); ``underlay``.  hostNetwork pods exec in their node.
``lab.address(target)`` is a target's IP.

Labs with ``kernel: uml`` (and ``auto`` with the ipvs mode on a host without
IPVS) live inside a User-Mode Linux kernel (:mod:`kubelab.netlab.umllab`);
the API is the same, except ``popen`` and traces, which need the host kernel.

Lab files are described in :mod:`kubelab.netlab.spec`, the network in
:mod:`kubelab.netlab.topology`, what pods run in
:mod:`kubelab.netlab.workloads`, the EndpointSlices in
:mod:`kubelab.netlab.endpoints`.  A lab's files live in
``/run/kubelab/labs/NAME/``: ``state.json``, ``manifests/`` (what the
proxies and DNS read), ``logs/`` (daemon, proxy-NODE, pod-NS.NAME).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kubelab.model import Origin
from kubelab.netlab import topology
from kubelab.netlab.spec import Document, LabSpec, LabSpecError, read_manifest_path

__all__ = ["Lab", "LabError", "LabSpec", "LabSpecError", "LABS_DIR"]

LABS_DIR = Path(os.environ.get("KUBELAB_LABS_DIR", "/run/kubelab/labs"))


class LabError(RuntimeError):
    """A lab could not be brought up, found, or asked to do something."""


def lab_dir(name: str) -> Path:
    return LABS_DIR / name


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive; it only waits for its parent to reap it.
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    return True


class Lab:
    """A running lab (see the module docstring for the contract)."""

    def __init__(self, name: str, process: subprocess.Popen | None = None):
        self.name = name
        self.dir = lab_dir(name)
        self._process = process  # the daemon, when this process started it
        self._state: dict | None = None

    # ------------------------------------------------------------------
    # bring up / find / tear down
    # ------------------------------------------------------------------

    @classmethod
    def up(cls, spec: LabSpec | str | Path, *, timeout: float = 300.0) -> Lab:
        """Build the lab and start its daemon; on any failure everything is removed and LabError raised."""
        if not isinstance(spec, LabSpec):
            spec = LabSpec.from_file(spec)
        if os.geteuid() != 0:
            raise LabError("labs need root (network namespaces, veths, bridges): run as root")
        name = spec.name
        d = lab_dir(name)
        if d.exists():
            state = _read_state(d)
            if state and _pid_alive(state.get("daemonPid")):
                raise LabError(f"lab {name!r} is already up; `kubelab lab down {name}` first, or pick another name")
            cls.down_by_name(name)  # leftovers of a crashed lab
        elif topology.prefix(name) and _leftover_namespaces(name):
            cls.down_by_name(name)
        from kubelab.netlab.umllab import host_has_ipvs, resolve_kernel

        kernel = resolve_kernel(spec.settings.kernel, spec.settings.proxy_mode, host_has_ipvs())
        # A lab in UML is run by a host process that boots the kernel and the
        # daemon inside it (kubelab.netlab.umllab); otherwise the daemon runs here.
        module = "kubelab.netlab.umllab" if kernel == "uml" else "kubelab.netlab.daemon"
        (d / "logs").mkdir(parents=True)
        (d / "spec.pickle").write_bytes(pickle.dumps(spec))
        read_fd, write_fd = os.pipe()
        log = open(d / "logs" / "daemon.log", "ab")
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", module, str(d), "--ready-fd", str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_fd,), start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            log.close()
            cls.down_by_name(name)
            raise
        os.close(write_fd)
        log.close()
        lab = cls(name, process)
        try:
            message = _read_ready(read_fd, timeout)
            if not message.get("ok"):
                raise LabError(f"lab {name!r} failed to come up: {message.get('error', 'daemon exited')}\n{lab.log_tail()}")
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def attach(cls, name: str) -> Lab:
        """A lab that is up (maybe brought up by another process)."""
        d = lab_dir(name)
        state = _read_state(d)
        if state is None:
            known = ", ".join(cls.list()) or "none"
            raise LabError(f"no lab named {name!r} (labs up: {known}); bring one up with `kubelab lab up FILE`")
        return cls(name)

    @staticmethod
    def list() -> list[str]:
        try:
            return sorted(p.name for p in LABS_DIR.iterdir() if (p / "state.json").exists() or (p / "spec.pickle").exists())
        except FileNotFoundError:
            return []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def down(self) -> None:
        """Stop the daemon and remove every namespace, link, file and process of this lab."""
        with contextlib.suppress(LabError, OSError):
            self._request({"op": "shutdown"}, timeout=5)
        if self._process is not None:
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self.down_by_name(self.name)

    @classmethod
    def down_by_name(cls, name: str) -> None:
        """Remove lab ``name`` whatever state it is in (also after a crash or a failed up)."""
        d = lab_dir(name)
        state = _read_state(d) or {}
        pid = state.get("daemonPid")
        if pid and _pid_alive(pid) and _is_lab_daemon(pid, d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in (state.get("processes") or {}).values():
            ppid = proc.get("pid")
            if ppid and _pid_alive(ppid) and _is_lab_process(ppid, d):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(ppid, signal.SIGKILL)
        if state.get("uml"):
            from kubelab.netlab.umllab import kill_leftover_uml

            kill_leftover_uml(state["uml"])  # only does something when the host process died first
        topology.teardown(name)  # also the /etc/netns files a lab in UML wrote through hostfs
        shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------

    def state(self, refresh: bool = True) -> dict:
        if refresh or self._state is None:
            state = _read_state(self.dir)
            if state is None:
                raise LabError(f"lab {self.name!r} has no state (is it up? `kubelab lab status {self.name}`)")
            self._state = state
        return self._state

    def status(self) -> dict:
        """Fresh state from the daemon (processes included)."""
        return self._request({"op": "status"})["state"]

    def _pod(self, ref: str) -> tuple[str, dict] | None:
        pods = self.state()["pods"]
        if "/" in ref:
            return (ref, pods[ref]) if ref in pods else None
        if f"default/{ref}" in pods:
            return f"default/{ref}", pods[f"default/{ref}"]
        for key in sorted(pods):
            if key.split("/", 1)[1] == ref:
                return key, pods[key]
        return None

    def _resolve(self, target: str) -> tuple[str, str, str]:
        """(kind, netns, ip) of an exec target: "pod" | "node" | "external" | "underlay".

        Pods come first, so a pod named ``client`` (as in the example lab)
        is that pod; ``external`` always means the client outside the
        cluster, and so does ``client`` when no pod has that name.
        """
        state = self.state()
        if target == "underlay":
            return "underlay", topology.underlay_ns(self.name), state.get("gateway", "")
        found = self._pod(target)
        if found is not None:
            return "pod", found[1]["netns"], found[1]["ip"]
        if target in state["nodes"]:
            return "node", state["nodes"][target]["netns"], state["nodes"][target]["ip"]
        if target in ("external", "client"):
            return "external", state["client"]["netns"], state["client"]["ip"]
        raise LabError(
            f"lab {self.name}: no pod, node, 'external' or 'underlay' named {target!r}; "
            f"nodes: {', '.join(state['nodes'])}; pods: {', '.join(sorted(state['pods'])) or 'none'}"
        )

    def netns(self, target: str) -> str:
        """The network namespace of a pod, node, ``external`` (or ``client``) or ``underlay``."""
        return self._resolve(target)[1]

    def address(self, target: str) -> str:
        """The IP address of a pod, node or the external client."""
        return self._resolve(target)[2]

    def pod_ip(self, ref: str) -> str:
        found = self._pod(ref)
        if found is None:
            raise LabError(f"lab {self.name}: no pod {ref!r}")
        return found[1]["ip"]

    def pods(self, selector: dict[str, str] | None = None) -> list[str]:
        """Pod keys ("ns/name"), optionally those whose labels match ``selector``."""
        pods = self.state()["pods"]
        return sorted(k for k, p in pods.items() if not selector or all(p["labels"].get(a) == b for a, b in selector.items()))

    def service(self, ref: str) -> dict:
        key = ref if "/" in ref else f"default/{ref}"
        services = self.state()["services"]
        if key not in services:
            raise LabError(f"lab {self.name}: no service {key!r}; services: {', '.join(sorted(services)) or 'none'}")
        return services[key]

    def service_ip(self, ref: str) -> str:
        return self.service(ref)["clusterIP"]

    def node_port(self, ref: str, port: int | None = None, protocol: str = "TCP") -> int:
        for p in self.service(ref)["ports"]:
            if (port is None or p["port"] == port) and p["protocol"] == protocol and p["nodePort"]:
                return p["nodePort"]
        raise LabError(f"lab {self.name}: service {ref} has no nodePort for {protocol} port {port}")

    def node_ip(self, node: str) -> str:
        nodes = self.state()["nodes"]
        if node not in nodes:
            raise LabError(f"lab {self.name}: no node {node!r}; nodes: {', '.join(nodes)}")
        return nodes[node]["ip"]

    @property
    def client_ip(self) -> str:
        return self.state()["client"]["ip"]

    @property
    def nodes(self) -> list[str]:
        return list(self.state()["nodes"])

    @property
    def manifests_dir(self) -> Path:
        return self.dir / "manifests"

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    def log_tail(self, lines: int = 20) -> str:
        path = self.logs_dir / "daemon.log"
        try:
            text = path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  | {line}" for line in text[-lines:])

    # ------------------------------------------------------------------
    # acting
    # ------------------------------------------------------------------

    def exec_argv(self, target: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns(target), *argv]

    @property
    def kernel(self) -> str:
        """``host``, or ``uml`` when the lab lives inside a User-Mode Linux kernel."""
        return self.state().get("kernel", "host")

    def exec(
        self, target: str, argv: list[str], *, timeout: float = 30.0, check: bool = False, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in a pod, node or the client; returns the CompletedProcess (text)."""
        full = self.exec_argv(target, list(argv))
        if self.kernel == "uml":
            # Namespaces exist only inside the UML kernel: its host process runs the command there.
            r = self._request({"op": "exec", "argv": full, "timeout": timeout, "input": input}, timeout=timeout + 60)
            result = subprocess.CompletedProcess(full, r["returncode"], r["stdout"], r["stderr"])
            if r.get("timedOut") and check:
                raise LabError(f"lab {self.name}: `{' '.join(argv)}` in {target} timed out after {timeout}s")
            if check and result.returncode != 0:
                raise LabError(
                    f"lab {self.name}: `{' '.join(argv)}` in {target} exited {result.returncode}: {result.stderr.strip()}"
                )
            return result
        try:
            result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input,
                                    stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            if check:
                raise LabError(f"lab {self.name}: `{' '.join(argv)}` in {target} timed out after {timeout}s") from exc
            return subprocess.CompletedProcess(full, 124, _text(exc.stdout), _text(exc.stderr))
        if check and result.returncode != 0:
            raise LabError(
                f"lab {self.name}: `{' '.join(argv)}` in {target} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def popen(self, target: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` in a pod, node or the client without waiting (the caller ends it)."""
        if self.kernel == "uml":
            raise LabError(f"lab {self.name} runs inside UML: use lab.exec() (popen works for host-kernel labs only)")
        return subprocess.Popen(self.exec_argv(target, list(argv)), **kwargs)

    def apply(self, source: str | Path | list | dict) -> dict:
        """Create or update objects from a manifest file/folder or dicts; LabSpecError lists problems."""
        if isinstance(source, (str, Path)):
            docs = read_manifest_path(Path(source))
        else:
            items = [source] if isinstance(source, dict) else list(source)
            docs = [d if isinstance(d, Document) else Document(d, Origin("<apply>", i + 1)) for i, d in enumerate(items)]
        payload = [[d.data, d.origin.source, d.origin.line] for d in docs]
        return self._request({"op": "apply", "documents": payload}, timeout=120)

    def delete(self, ref: str, *, grace: int | None = None) -> dict:
        """Delete ``kind/name`` or ``kind/namespace/name`` (pod, service, deployment, endpointslice)."""
        kind, _, rest = ref.partition("/")
        if not rest:
            raise LabError(f"{ref!r}: say what to delete as KIND/NAME, e.g. pod/web-1 or service/kube-system/kube-dns")
        namespace, _, name = rest.rpartition("/")
        return self._request({"op": "delete", "kind": kind, "namespace": namespace or "default", "name": name, "grace": grace})

    def wait_synced(self, timeout: float = 60.0) -> None:
        """Wait until every node's proxy has programmed the lab's current objects."""
        self._request({"op": "synced", "timeout": timeout}, timeout=timeout + 10)

    # ------------------------------------------------------------------

    def _request(self, request: dict, timeout: float = 60.0) -> dict:
        path = self.dir / "ctl.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            try:
                sock.connect(str(path))
            except OSError as exc:
                raise LabError(f"lab {self.name}: its daemon is not answering ({exc.strerror}); "
                               f"see {self.logs_dir / 'daemon.log'} or `kubelab lab down {self.name}`") from None
            sock.sendall((json.dumps(request) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
        if not data:
            raise LabError(f"lab {self.name}: daemon closed the connection without answering {request.get('op')}")
        response = json.loads(data)
        if not response.get("ok"):
            if response.get("problems"):
                raise LabSpecError(response["problems"])
            raise LabError(f"lab {self.name}: {request.get('op')}: {response.get('error')}")
        self._state = None
        return response


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _read_state(d: Path) -> dict | None:
    try:
        return json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _read_ready(fd: int, timeout: float) -> dict:
    """The daemon's one-line readiness report; an empty pipe means it died first."""
    import selectors

    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel, os.fdopen(fd, "rb", buffering=0) as f:
        sel.register(f, selectors.EVENT_READ)
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise LabError(f"lab did not come up within {timeout:.0f}s")
            if not sel.select(left):
                continue
            chunk = f.read(4096)
            if not chunk:
                break
            data += chunk
    if not data:
        return {"ok": False, "error": "the lab daemon exited before reporting"}
    return json.loads(data)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_lab_daemon(pid: int, d: Path) -> bool:
    # A recorded pid may have been reused by now: only signal our daemon.
    cmd = _cmdline(pid)
    return ("kubelab.netlab.daemon" in cmd or "kubelab.netlab.umllab" in cmd) and str(d) in cmd


def _is_lab_process(pid: int, d: Path) -> bool:
    cmd = _cmdline(pid)
    return "kubelab" in cmd or str(d) in cmd


def _leftover_namespaces(name: str) -> bool:
    from kubelab.netlab import nsutil

    return bool(nsutil.names(topology.prefix(name)))
