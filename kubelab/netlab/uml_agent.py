"""The agent that runs inside a User-Mode Linux kernel for :mod:`kubelab.netlab.uml`.

The UML init script starts it as ``python3 -m kubelab.netlab.uml_agent``.
It loads the requested kernel modules, sets sysctls, then serves requests
from the host until told to power off.

Protocol (see :mod:`kubelab.netlab.uml` for the host side): the host writes
a request as JSON to ``WORKDIR/req/ID.json`` (hostfs makes the host's files
visible here) and rings a doorbell -- the short line ``R ID`` on the serial
line ``/dev/ttyS0``, which UML wires to a pipe on the host.  The agent
answers in ``WORKDIR/resp/ID.json`` (written to a temporary name, then
renamed, so the host never reads half a file) and rings back ``D ID``.
Payloads never cross the tty: UML's line driver stalls for good once its
input buffer fills (seen with a 5,000-byte line), so only doorbells do.

Operations: ``run`` (argv to completion, output captured), ``spawn`` /
``wait`` / ``signal`` (long-lived processes), ``python`` (code executed in
this process's persistent namespace, so heavy imports such as pyroute2 are
paid once) and ``poweroff``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

MODULE_ROOT = "/run/mroot"


class Agent:
    """Serves the host's requests over the doorbell tty and the hostfs mailbox."""

    def __init__(self, workdir: Path, tty: str) -> None:
        self.workdir = workdir
        self.tty_path = tty
        self.fd = -1
        self.write_lock = threading.Lock()
        self.python_lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen] = {}
        self.namespace: dict[str, Any] = {"__name__": "__uml__"}
        self.stopping = threading.Event()

    # -- doorbell --------------------------------------------------------

    def open_tty(self) -> None:
        import tty as ttymod

        self.fd = os.open(self.tty_path, os.O_RDWR | os.O_NOCTTY)
        # Raw: no echo, no line editing, no CR/LF translation either way.
        ttymod.setraw(self.fd)

    def ring(self, line: str) -> None:
        data = (line + "\n").encode()
        with self.write_lock:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]

    # -- startup ---------------------------------------------------------

    def prepare(self, modules: list[str], sysctls: dict[str, str]) -> dict[str, Any]:
        """Load modules and set sysctls; report what failed instead of dying."""
        failed: dict[str, str] = {}
        if modules:
            cmd = ["modprobe", "-d", MODULE_ROOT, "-a", *modules]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                # Find out which ones: one call per module only on the slow path.
                for mod in modules:
                    one = subprocess.run(["modprobe", "-d", MODULE_ROOT, mod], capture_output=True, text=True)
                    if one.returncode != 0:
                        failed[mod] = (one.stderr or one.stdout).strip()
        bad_sysctls: dict[str, str] = {}
        for key, value in sysctls.items():
            path = Path("/proc/sys") / key.replace(".", "/")
            try:
                path.write_text(str(value))
            except OSError as exc:
                bad_sysctls[key] = str(exc)
        return {
            "failed_modules": failed,
            "failed_sysctls": bad_sysctls,
            "kernel": os.uname().release,
            "python": sys.version.split()[0],
        }

    # -- main loop -------------------------------------------------------

    def serve_until_poweroff(self) -> None:
        reader = threading.Thread(target=self.serve, daemon=True)
        reader.start()
        self.stopping.wait()
        # Let the last doorbell ("D" of the poweroff request) leave before the kernel stops.
        time.sleep(0.05)

    def serve(self) -> None:
        buf = b""
        while not self.stopping.is_set():
            chunk = os.read(self.fd, 4096)
            if not chunk:
                time.sleep(0.01)
                continue
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                if line.startswith("R "):
                    req_id = line[2:].strip()
                    threading.Thread(target=self.handle, args=(req_id,), daemon=True).start()

    def handle(self, req_id: str) -> None:
        req_path = self.workdir / "req" / f"{req_id}.json"
        op = ""
        try:
            request = json.loads(req_path.read_text())
            op = request.pop("op")
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise ValueError(f"unknown operation {op!r}")
            response = {"ok": True, "result": handler(**request)}
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the host
            response = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        self.respond(req_id, response)
        if op == "poweroff":
            self.stopping.set()

    def respond(self, req_id: str, response: dict[str, Any]) -> None:
        resp_dir = self.workdir / "resp"
        tmp = resp_dir / f".{req_id}.tmp"
        try:
            text = json.dumps(response)
        except (TypeError, ValueError) as exc:
            text = json.dumps({"ok": False, "error": f"response is not JSON-serialisable: {exc}", "traceback": ""})
        tmp.write_text(text)
        os.replace(tmp, resp_dir / f"{req_id}.json")
        self.ring(f"D {req_id}")

    # -- operations ------------------------------------------------------

    def op_run(
        self,
        argv: list[str],
        timeout: float | None = None,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> dict[str, Any]:
        full_env = None if env is None else {**os.environ, **env}
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        timed_out = False
        try:
            out, err = proc.communicate(input.encode() if input is not None else None, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return {
            "returncode": proc.returncode,
            "stdout": out.decode(errors="replace"),
            "stderr": err.decode(errors="replace"),
            "timed_out": timed_out,
        }

    def op_spawn(
        self,
        argv: list[str],
        stdout: str,
        stderr: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> dict[str, Any]:
        full_env = None if env is None else {**os.environ, **env}
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=full_env, cwd=cwd, start_new_session=True
            )
        self.procs[proc.pid] = proc
        return {"pid": proc.pid}

    def op_wait(self, pid: int, timeout: float | None = None) -> dict[str, Any]:
        proc = self.procs[pid]
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"returncode": None}
        return {"returncode": rc}

    def op_signal(self, pid: int, signum: int, group: bool = True) -> dict[str, Any]:
        proc = self.procs[pid]
        if proc.poll() is None:
            if group:
                _kill_group(pid, signum)
            else:
                proc.send_signal(signum)
        return {"returncode": proc.poll()}

    def op_python(self, code: str) -> dict[str, Any]:
        """Run ``code`` in the persistent namespace; the last expression is the value."""
        tree = ast.parse(code, "<uml.python>", "exec")
        last_expr = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last_expr = ast.Expression(tree.body.pop().value)
        printed = io.StringIO()
        with self.python_lock, contextlib.redirect_stdout(printed):
            try:
                exec(compile(tree, "<uml.python>", "exec"), self.namespace)  # noqa: S102 - that is the point
                value = eval(compile(last_expr, "<uml.python>", "eval"), self.namespace) if last_expr else None  # noqa: S307
            except BaseException as exc:
                raise RuntimeError(f"{type(exc).__name__}: {exc}\n--- printed ---\n{printed.getvalue()}") from exc
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = repr(value)
        return {"value": value, "stdout": printed.getvalue()}

    def op_call(self, target: str, args_path: str, result_path: str) -> dict[str, Any]:
        """Call ``target`` (an expression in the persistent namespace, or "module:attr") with pickled args."""
        import importlib
        import pickle

        with open(args_path, "rb") as f:
            args, kwargs = pickle.load(f)
        with self.python_lock:
            if ":" in target:
                module, _, attr = target.partition(":")
                fn: Any = importlib.import_module(module)
                for part in attr.split("."):
                    fn = getattr(fn, part)
            else:
                fn = eval(target, self.namespace)  # noqa: S307
            value = fn(*args, **kwargs)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump(value, f)
        os.replace(result_path + ".tmp", result_path)
        return {}

    def op_poweroff(self) -> dict[str, Any]:
        for pid, proc in list(self.procs.items()):
            if proc.poll() is None:
                _kill_group(pid, signal.SIGKILL)
        return {}


def _kill_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--tty", default="/dev/ttyS0")
    args = parser.parse_args(argv)
    boot = json.loads((args.workdir / "boot.json").read_text())
    agent = Agent(args.workdir, args.tty)
    agent.open_tty()
    info = agent.prepare(boot.get("modules", []), boot.get("sysctls", {}))
    (args.workdir / "ready.json").write_text(json.dumps(info))
    agent.ring("READY")
    try:
        agent.serve_until_poweroff()
    finally:
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
