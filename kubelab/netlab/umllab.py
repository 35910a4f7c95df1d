"""Labs inside a User-Mode Linux kernel: the host side.

The host kernel has no IPVS, so a lab with ``kernel: uml`` (or ``auto`` and
the ipvs proxy mode on such a host, see :func:`resolve_kernel`) runs whole
inside one UML kernel (:class:`kubelab.netlab.uml.UMLKernel`, which boots
Debian's ``linux`` with the IPVS, netfilter and link modules loaded).

``Lab.up`` starts this module as the lab's host process
(``python -m kubelab.netlab.umllab LAB_DIR --ready-fd N``) instead of the
lab daemon.  It

1. boots the UML kernel and keeps it running while the lab is up;
2. starts the ordinary lab daemon (:mod:`kubelab.netlab.daemon`) *inside*
   it, in a folder on hostfs both kernels see (``WORKDIR/lab``, under the
   UML kernel's private work folder in /tmp); the daemon builds the same
   namespaces, pods and proxies there as on the host;
3. serves the lab's control socket ``LAB_DIR/ctl.sock`` on the host,
   forwarding ``apply``/``delete``/``status``/``synced`` to the daemon's
   socket inside (``socat`` run inside UML), and running ``exec`` requests
   inside with :meth:`UMLKernel.run`, so ``kubelab lab exec/apply/delete/
   status/down`` and the :class:`~kubelab.netlab.lab.Lab` API work the same
   from the host;
4. mirrors the daemon's ``state.json`` into ``LAB_DIR/state.json`` with
   ``kernel: uml`` and the UML process recorded (``uml.pid``, ``uml.workdir``,
   ``uml.umid``) so ``lab down`` can always remove it; process ids inside UML
   are kept as ``umlPid`` (they mean nothing on the host);
5. on ``shutdown`` or SIGTERM: stops the daemon inside, powers UML off.

``LAB_DIR/logs/uml`` links to the inner daemon's logs (daemon, proxies,
pods); ``LAB_DIR/logs/uml-host.log`` is this process's own log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from kubelab.netlab.daemon import CTL_LINE_LIMIT

log = logging.getLogger("kubelab.netlab.umllab")

INNER_CTL = "/run/kubelab/ctl.sock"  # on the UML kernel's private /run (tmpfs)
# UML's memory is a sparse file on /dev/shm, touched only as the guest uses it, so a
# generous size costs nothing up front; 1 GiB was too little for a proxy holding
# 10,000 Services (~430 MB RSS measured by kubelab bench) beside the lab itself.
UML_MEM = "3072M"


def host_has_ipvs() -> bool:
    """Does the host kernel have IPVS (loaded or built in)?"""
    return os.path.exists("/proc/net/ip_vs")


def resolve_kernel(kernel: str, proxy_mode: str, has_ipvs: bool) -> str:
    """``host`` or ``uml`` for a lab's ``kernel`` setting: ``auto`` picks UML only for IPVS on a host without it."""
    if kernel in ("host", "uml"):
        return kernel
    return "uml" if proxy_mode == "ipvs" and not has_ipvs else "host"


@dataclass
class UMLLabDeps:
    """What the host process of a UML lab is built from."""

    lab_dir: Path
    ready_fd: int | None = None
    mem: str = UML_MEM
    python: str = sys.executable
    boot_timeout: float = 180.0
    up_timeout: float = 300.0


class UMLLabHost:
    """The host process of a lab that lives in UML (see module docstring).  The constructor starts nothing."""

    def __init__(self, deps: UMLLabDeps):
        self.deps = deps
        self.dir = deps.lab_dir
        self.spec = pickle.loads((self.dir / "spec.pickle").read_bytes())
        self.name = self.spec.name
        self.uml = None
        self.inner_dir: Path | None = None
        self.daemon = None  # UMLProcess of the inner lab daemon
        self._stop: asyncio.Event | None = None
        self._server = None

    # ------------------------------------------------------------------

    async def run(self) -> int:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await asyncio.to_thread(self.build)
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.dir / "ctl.sock"), limit=CTL_LINE_LIMIT
            )
            self.mirror_state()
        except Exception as exc:
            log.error("lab %s failed to come up in UML: %s\n%s", self.name, exc, traceback.format_exc())
            self._report({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            await asyncio.to_thread(self.shutdown)
            return 1
        self._report({"ok": True})
        log.info("lab %s is up inside UML %s", self.name, self.uml.info.get("kernel"))
        mirror = asyncio.ensure_future(self._mirror_loop())
        await self._stop.wait()
        mirror.cancel()
        if self._server is not None:
            self._server.close()
        await asyncio.to_thread(self.shutdown)
        return 0

    def _report(self, message: dict) -> None:
        fd = self.deps.ready_fd
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, (json.dumps(message) + "\n").encode())
            os.close(fd)
        self.deps.ready_fd = None

    def build(self) -> None:
        from kubelab.netlab.uml import UMLKernel

        started = time.monotonic()
        self.uml = UMLKernel(mem=self.deps.mem, python=self.deps.python, boot_timeout=self.deps.boot_timeout,
                             env={"PYTHONUNBUFFERED": "1"})
        self.uml.boot()
        # Recorded before anything else can fail: `lab down` finds and kills it from here.
        self.write_state({"name": self.name, "kernel": "uml", "daemonPid": os.getpid(), "uml": self._uml_record(),
                          "nodes": {}, "pods": {}, "services": {}, "client": {"ip": "", "netns": ""}})
        log.info("UML %s booted in %.1fs: %s", self.uml.info.get("kernel"), time.monotonic() - started, self.uml.info)
        inner = self.uml.workdir / "lab"
        (inner / "logs").mkdir(parents=True)
        (inner / "spec.pickle").write_bytes((self.dir / "spec.pickle").read_bytes())
        self.inner_dir = inner
        for link, target in ((self.dir / "logs" / "uml", inner / "logs"), (self.dir / "manifests", inner / "manifests")):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(target)
        ready = inner / "ready.json"
        log_path = inner / "logs" / "daemon.log"
        self.daemon = self.uml.popen(
            ["sh", "-c", 'exec "$0" -m kubelab.netlab.daemon "$1" --ready-file "$2" --ctl "$3" >>"$4" 2>&1',
             self.deps.python, str(inner), str(ready), INNER_CTL, str(log_path)],
        )
        deadline = time.monotonic() + self.deps.up_timeout
        while not ready.exists():
            if self.daemon.poll() is not None:
                raise RuntimeError(f"the lab daemon inside UML exited with code {self.daemon.returncode}\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the lab daemon inside UML was not up within {self.deps.up_timeout:.0f}s\n{_tail(log_path)}")
            time.sleep(0.1)
        message = json.loads(ready.read_text())
        if not message.get("ok"):
            raise RuntimeError(f"{message.get('error')}\n{_tail(log_path)}")
        log.info("lab %s up inside UML in %.1fs", self.name, time.monotonic() - started)

    def shutdown(self) -> None:
        if self.uml is None:
            return
        try:
            if self.daemon is not None and self.daemon.poll() is None and self.uml.running:
                with contextlib.suppress(Exception):
                    self.forward({"op": "shutdown"}, timeout=10)
                try:
                    self.daemon.wait(timeout=30)
                except Exception:  # noqa: BLE001 - powering off ends it anyway
                    log.warning("the lab daemon inside UML did not stop within 30s; powering off")
        finally:
            self.uml.close()
            for link in (self.dir / "logs" / "uml", self.dir / "manifests"):
                with contextlib.suppress(OSError):
                    link.unlink()
            log.info("lab %s: UML powered off", self.name)

    # ------------------------------------------------------------------

    def _uml_record(self) -> dict:
        return {"pid": self.uml._proc.pid if self.uml._proc else None, "workdir": str(self.uml.workdir),
                "umid": self.uml._umid, "kernel": self.uml.info.get("kernel", "")}

    def write_state(self, state: dict) -> None:
        tmp = self.dir / ".state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, self.dir / "state.json")

    def mirror_state(self) -> None:
        """LAB_DIR/state.json from the inner daemon's, marked as living in UML."""
        if self.inner_dir is None:
            return
        try:
            state = json.loads((self.inner_dir / "state.json").read_text())
        except (OSError, ValueError):
            return
        self.write_state(self.to_host_state(state))

    def to_host_state(self, state: dict) -> dict:
        state = dict(state)
        state["kernel"] = "uml"
        state["daemonPid"] = os.getpid()
        state["uml"] = self._uml_record()
        state["innerDir"] = str(self.inner_dir)
        state["logs"] = str(self.dir / "logs" / "uml")
        state["manifests"] = str(self.dir / "manifests")
        procs = {}
        for name, p in (state.get("processes") or {}).items():
            p = dict(p)
            p["umlPid"], p["pid"] = p.get("pid"), None  # a pid inside UML is nobody on the host
            procs[name] = p
        state["processes"] = procs
        return state

    async def _mirror_loop(self) -> None:
        # Pods finishing their grace period change state without a request.
        while True:
            await asyncio.sleep(1.0)
            self.mirror_state()
            if self.daemon is not None and await asyncio.to_thread(self.daemon.poll) is not None:
                log.error("the lab daemon inside UML exited with code %s", self.daemon.returncode)

    # ------------------------------------------------------------------

    def forward(self, request: dict, timeout: float = 120.0) -> dict:
        """One request to the daemon's control socket inside UML; its one-line answer."""
        r = self.uml.run(
            ["socat", "-t", str(int(timeout) + 5), "-T", str(int(timeout) + 5), "-", f"UNIX-CONNECT:{INNER_CTL}"],
            input=json.dumps(request) + "\n", timeout=timeout + 15,
        )
        if r.returncode != 0 or not r.stdout.strip():
            return {"ok": False, "error": f"the lab daemon inside UML did not answer ({r.stderr.strip() or r.returncode})"}
        return json.loads(r.stdout.strip().splitlines()[-1])

    def exec(self, request: dict) -> dict:
        argv = [str(a) for a in request["argv"]]
        timeout = float(request.get("timeout") or 30.0)
        try:
            r = self.uml.run(argv, timeout=timeout, input=request.get("input"))
        except Exception as exc:  # subprocess.TimeoutExpired and UML errors
            if type(exc).__name__ == "TimeoutExpired":
                return {"ok": True, "returncode": 124, "stdout": _text(exc.output), "stderr": _text(exc.stderr), "timedOut": True}
            raise
        return {"ok": True, "returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}

    async def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "ping":
            return {"ok": True}
        if op == "exec":
            return await asyncio.to_thread(self.exec, request)
        if op == "shutdown":
            asyncio.get_running_loop().call_soon(self._stop.set)
            return {"ok": True}
        if op in ("apply", "delete", "status", "synced"):
            timeout = float(request.get("timeout", 30)) + 30 if op == "synced" else 120.0
            response = await asyncio.to_thread(self.forward, request, timeout)
            if op == "status" and response.get("ok"):
                response["state"] = self.to_host_state(response["state"])
            self.mirror_state()
            return response
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                response = await self.handle(json.loads(line))
            except Exception as exc:  # keep serving; say what broke
                log.error("request failed: %s\n%s", exc, traceback.format_exc())
                response = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write((json.dumps(response) + "\n").encode())
            await writer.drain()
        finally:
            writer.close()


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(f"  | {line}" for line in text[-lines:])


def kill_leftover_uml(record: dict) -> None:
    """Kill a UML kernel a crashed host process left behind, and remove its files (``lab down``)."""
    import shutil

    pid = record.get("pid")
    umid = record.get("umid") or ""
    if pid and umid:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            cmd = ""
        if f"umid={umid}" in cmd:  # the recorded pid may belong to someone else by now
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    if umid:
        shutil.rmtree(Path.home() / ".uml" / umid, ignore_errors=True)
    workdir = record.get("workdir") or ""
    if workdir.startswith("/tmp/kubelab-uml-"):
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubelab.netlab.umllab", description=__doc__.splitlines()[0])
    parser.add_argument("lab_dir", type=Path)
    parser.add_argument("--ready-fd", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host = UMLLabHost(UMLLabDeps(lab_dir=args.lab_dir, ready_fd=args.ready_fd))
    return asyncio.run(host.run())


if __name__ == "__main__":
    sys.exit(main())
