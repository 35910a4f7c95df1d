"""Run commands and Python inside a User-Mode Linux kernel (for IPVS and other kernel features the host lacks).

:class:`UMLKernel` boots Debian's ``user-mode-linux`` (a Linux 6.1 kernel
that runs as an ordinary process) once, with the host's whole filesystem as
its root through hostfs, so the same checkout and interpreter run inside.
An agent (:mod:`kubelab.netlab.uml_agent`) serves requests from the host
until the context exits, which always powers the kernel off and kills the
process group::

    with UMLKernel(modules=IPVS_MODULES) as uml:
        uml.run(["ipvsadm", "-Ln"]).stdout
        uml.python("import pyroute2; pyroute2.IPVS().service('dump')")  # persistent namespace
        proc = uml.popen(["socat", "TCP-LISTEN:80,fork", "SYSTEM:echo hi"])
        ...
        proc.terminate()

Inside: proc, sysfs, a tmpfs on ``/run`` (so ``/run/netns`` and
``/run/xtables.lock`` are private to the kernel, never the host's) and on
``/dev/shm``; ``/run/mroot/lib/modules`` links to ``/usr/lib/uml/modules``
and modules load with ``modprobe -d /run/mroot`` (the kernel's own
autoloading finds nothing, so every module a test needs is loaded at boot);
``lo`` is up.  Everything
else (``/tmp``, ``/work``, ...) *is* the host's filesystem: write files on
the host and the kernel sees them.  Use ``iptables-legacy`` inside (the UML
kernel has no nft NAT modules).

How requests travel: payloads go through files in a private work folder
(``/tmp/kubelab-uml-*``), doorbells through a UML serial line wired to a
pair of pipes (raw tty, short lines only -- UML's line driver stalls once a
long line fills its input buffer).  Measured on the 2-core CI machine
(6.1.176 UML, pyenv Python 3.11.7, ``python3 -m kubelab.netlab.uml
--measure``): boot to ready with :data:`DEFAULT_MODULES` loaded 2.6 s;
per-request overhead 6 ms for :meth:`UMLKernel.python` (``uml.python("1")``
round trip: hostfs file I/O plus a thread inside; the tty doorbell alone is
0.1 ms); :meth:`UMLKernel.run` adds the UML kernel's fork+exec, 32 ms for
``uml.run(["true"])``.  A fresh Python inside costs 0.4 s and importing
pyroute2 another 1.0 s, which is why
:meth:`UMLKernel.python` runs in the agent's long-lived process.
``python3 -m kubelab.netlab.uml --measure`` prints these figures again.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kubelab.netlab import uml_xstate

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The host's ``vm.max_map_count`` a UML kernel needs.  UML backs each guest
#: process's memory with host mmap()s of its physical-memory file, in runs of
#: pages: a guest process with a few hundred MB resident (kubelab proxy
#: holding 10,000 Services: ~420 MB) needs more than the 65,530 mappings of
#: the kernel's default, and the guest then dies with "UML ran out of memory
#: on the host side" (the UML iptables and ipvs points at 10,000 Services in
#: ``kubelab bench``).  1,048,576 is the default of Ubuntu 24.04 and Fedora 39.
MAX_MAP_COUNT = 1_048_576
MAX_MAP_COUNT_PATH = "/proc/sys/vm/max_map_count"


def ensure_max_map_count(minimum: int = MAX_MAP_COUNT, path: str = MAX_MAP_COUNT_PATH) -> tuple[bool, str]:
    """Raise the host's ``vm.max_map_count`` to ``minimum`` when it is lower: (raised, what to log or "").

    Only ever raised, never lowered (other software may want more).  Without
    the right to write it (not root) the kernel still boots and small guests
    work; the returned text says how to fix it.
    """
    try:
        current = int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False, f"could not read {path}: UML guests may be limited to 65,530 host mappings"
    if current >= minimum:
        return False, ""
    try:
        Path(path).write_text(f"{minimum}\n")
    except OSError as e:
        return False, (f"vm.max_map_count is {current:,} and could not be raised ({e.strerror}): guest processes above "
                f"~250 MB resident will die; run `sysctl -w vm.max_map_count={minimum}` as root")
    return True, f"raised vm.max_map_count from {current:,} to {minimum:,} (UML maps guest memory page runs one mmap each)"

#: Modules for kube-proxy's IPVS mode: every scheduler the kernel ships,
#: conntrack/NAT for the iptables part, ipset types kube-proxy uses, and the
#: links a lab builds (veth, dummy, bridge).
IPVS_MODULES: tuple[str, ...] = (
    "ip_vs",
    "ip_vs_rr",
    "ip_vs_wrr",
    "ip_vs_lc",
    "ip_vs_wlc",
    "ip_vs_lblc",
    "ip_vs_lblcr",
    "ip_vs_dh",
    "ip_vs_sh",
    "ip_vs_sed",
    "ip_vs_nq",
    "ip_vs_fo",
    "ip_vs_ovf",
    "ip_vs_mh",
)
NETFILTER_MODULES: tuple[str, ...] = (
    # Linux 6.1 asks for "bpfilter" (request_module) on every iptables
    # get/setsockopt until it is loaded; the kernel's modprobe cannot find
    # modules here, so each iptables-legacy-restore paid for several failing
    # modprobe processes: 2-3.6 s instead of 0.1-0.7 s for kube-proxy's
    # 52-line ruleset.  (Autoloading everything instead is worse: nf_tables
    # would load and make iptables-nft look usable without its NAT chains.)
    "bpfilter",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "iptable_filter",
    "iptable_nat",
    "iptable_mangle",
    "iptable_raw",
    "xt_addrtype",
    "xt_comment",
    "xt_conntrack",
    "xt_mark",
    "xt_MASQUERADE",
    "xt_multiport",
    "xt_nat",
    "xt_set",
    "xt_statistic",
    "xt_physdev",
    "xt_tcpudp",
    "xt_recent",
    "xt_REDIRECT",
    "xt_ipvs",
    "ipt_REJECT",
    "ip_set",
    "ip_set_hash_ip",
    "ip_set_hash_ipport",
    "ip_set_hash_ipportip",
    "ip_set_hash_ipportnet",
    "ip_set_hash_net",
    "ip_set_bitmap_port",
)
LINK_MODULES: tuple[str, ...] = ("veth", "dummy", "bridge", "br_netfilter")
#: The default: enough for IPVS mode and for labs built of namespaces.
DEFAULT_MODULES: tuple[str, ...] = IPVS_MODULES + NETFILTER_MODULES + LINK_MODULES

DEFAULT_SYSCTLS: Mapping[str, str] = {"net.ipv4.ip_forward": "1"}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class UMLError(RuntimeError):
    """UML could not be booted or stopped talking; the message ends with the console tail."""


class UMLRemoteError(RuntimeError):
    """A request failed inside the UML kernel; carries the remote traceback."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message if not remote_traceback else f"{message}\n--- inside UML ---\n{remote_traceback}")
        self.remote_traceback = remote_traceback


class UMLProcess:
    """A long-lived process inside UML (see :meth:`UMLKernel.popen`); output goes to files on hostfs."""

    def __init__(self, kernel: UMLKernel, pid: int, argv: Sequence[str], stdout_path: Path, stderr_path: Path) -> None:
        self.kernel = kernel
        self.pid = pid
        self.args = list(argv)
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.kernel._call("wait", pid=self.pid, timeout=0)["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; raise :class:`subprocess.TimeoutExpired` after ``timeout`` seconds."""
        if self.returncode is None:
            res = self.kernel._call("wait", pid=self.pid, timeout=timeout, _timeout=None if timeout is None else timeout + 30)
            if res["returncode"] is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = res["returncode"]
        return self.returncode

    def send_signal(self, signum: int, group: bool = True) -> None:
        """Signal the process (its whole process group by default)."""
        if self.returncode is None and self.kernel.running:
            self.kernel._call("signal", pid=self.pid, signum=int(signum), group=group)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status (None if UML is gone)."""
        if not self.kernel.running:
            return self.returncode
        self.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            return self.wait(timeout)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @property
    def stdout(self) -> str:
        """What the process wrote to stdout so far."""
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def __repr__(self) -> str:
        return f"UMLProcess(pid={self.pid}, args={self.args!r}, returncode={self.returncode})"


class UMLKernel:
    """One booted User-Mode Linux kernel that runs commands and Python for the host.

    Construct, then enter (or call :meth:`boot`); exiting powers off and kills
    the process even after failures.  Constructing starts nothing.

    :param modules: kernel modules to load at boot (``modprobe -d /run/mroot``).
    :param sysctls: ``{"net.ipv4.ip_forward": "1"}``-style settings applied at boot.
    :param mem: UML memory size (``mem=``).
    :param python: interpreter for the agent (default: this one; hostfs shares it).
    :param cwd: working folder of commands inside (default: the checkout).
    :param env: extra environment for everything run inside.
    :param boot_timeout: seconds to wait for the agent to say READY.
    :param linux: the UML binary (Debian's ``user-mode-linux`` installs ``linux``).
    """

    def __init__(
        self,
        *,
        modules: Sequence[str] = DEFAULT_MODULES,
        sysctls: Mapping[str, str] = DEFAULT_SYSCTLS,
        mem: str = "512M",
        python: str = sys.executable,
        cwd: str | os.PathLike[str] = REPO_ROOT,
        env: Mapping[str, str] | None = None,
        boot_timeout: float = 120.0,
        linux: str = "linux",
        keep_workdir: bool = False,
    ) -> None:
        self.modules = tuple(modules)
        self.sysctls = dict(sysctls)
        self.mem = mem
        self.python_exe = python
        self.cwd = str(cwd)
        self.env = dict(env or {})
        self.boot_timeout = boot_timeout
        self.linux = linux
        self.keep_workdir = keep_workdir
        self.workdir: Path | None = None
        self.info: dict[str, Any] = {}
        self._proc: subprocess.Popen | None = None
        self._bell_w = -1
        self._bell_r = -1
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._waiters: dict[str, threading.Event] = {}
        self._ready = threading.Event()
        self._dead = threading.Event()
        self._ids = itertools.count(1)
        self._umid = ""

    # -- lifecycle -------------------------------------------------------

    def __enter__(self) -> UMLKernel:
        self.boot()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._dead.is_set()

    def boot(self) -> None:
        """Start the kernel and wait until the agent is ready; raise :class:`UMLError` on failure."""
        if self._proc is not None:
            raise UMLError("this UMLKernel was already booted; make a new one")
        binary = shutil.which(self.linux)
        if binary is None:
            raise UMLError(
                f"the User-Mode Linux binary {self.linux!r} is not on PATH: "
                "install Debian's user-mode-linux package (apt-get install user-mode-linux)"
            )
        if not Path("/usr/lib/uml/modules").is_dir():
            raise UMLError("/usr/lib/uml/modules is missing: reinstall the user-mode-linux package")
        self.workdir = Path(tempfile.mkdtemp(prefix="kubelab-uml-"))
        (self.workdir / "req").mkdir()
        (self.workdir / "resp").mkdir()
        (self.workdir / "proc").mkdir()
        (self.workdir / "boot.json").write_text(json.dumps({"modules": list(self.modules), "sysctls": self.sysctls}))
        init = self.workdir / "init.sh"
        init.write_text(self._init_script())
        init.chmod(0o755)
        self._umid = f"kubelab-{os.getpid()}-{self.workdir.name.rsplit('-', 1)[-1]}"

        raised, said = ensure_max_map_count()
        if said:
            log.log(logging.INFO if raised else logging.WARNING, "%s", said)
        # Debian's UML 6.1 cannot save the FPU state of its processes on hosts
        # whose XSAVE area is larger than it was built for (AMX): see uml_xstate.
        try:
            env = dict(os.environ, LD_PRELOAD=str(uml_xstate.shim_path()))
        except uml_xstate.ShimError as e:
            raise UMLError(str(e)) from e
        to_uml_r, to_uml_w = os.pipe()
        from_uml_r, from_uml_w = os.pipe()
        console = open(self.workdir / "console.log", "wb")  # noqa: SIM115 - handed to the child
        argv = [
            binary,
            f"mem={self.mem}",
            f"umid={self._umid}",
            "rootfstype=hostfs",
            "rootflags=/",
            "rw",
            f"init={init}",
            "con=null",
            "con0=fd:0,fd:1",
            f"ssl0=fd:{to_uml_r},fd:{from_uml_w}",
        ]
        try:
            self._proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                pass_fds=(to_uml_r, from_uml_w),
                start_new_session=True,  # our own process group: close() kills every UML helper
            )
        finally:
            console.close()
            os.close(to_uml_r)
            os.close(from_uml_w)
        self._bell_w, self._bell_r = to_uml_w, from_uml_r
        self._reader = threading.Thread(target=self._read_doorbells, name=f"uml-{self._umid}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.boot_timeout
        while not self._ready.wait(0.05):
            if self._dead.is_set() or self._proc.poll() is not None:
                self._kill()
                raise UMLError(
                    f"UML exited during boot (status {self._proc.returncode})" + self._boot_hint() + self._console_suffix()
                )
            if time.monotonic() > deadline:
                self._kill()
                raise UMLError(f"UML did not become ready within {self.boot_timeout:.0f}s" + self._console_suffix())
        self.info = json.loads((self.workdir / "ready.json").read_text())
        problems = []
        if self.info.get("failed_modules"):
            problems += [f"module {m}: {e}" for m, e in self.info["failed_modules"].items()]
        if self.info.get("failed_sysctls"):
            problems += [f"sysctl {k}: {e}" for k, e in self.info["failed_sysctls"].items()]
        if problems:
            self.close()
            raise UMLError(
                "UML booted but could not set up what was asked: "
                + "; ".join(problems)
                + " (module names are those under /usr/lib/uml/modules/*/kernel)"
            )
        log.debug("UML %s ready: %s", self._umid, self.info)

    def close(self, timeout: float = 20.0) -> None:
        """Power off (``poweroff -f`` via the agent), then kill whatever is left; idempotent."""
        if self._proc is None:
            return
        try:
            if self.running:
                try:
                    self._call("poweroff", _timeout=timeout)
                except (UMLError, UMLRemoteError) as exc:
                    log.debug("UML poweroff request failed: %s", exc)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("UML %s did not power off within %ss; killing it", self._umid, timeout)
        finally:
            self._kill()
            for fd in (self._bell_w, self._bell_r):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._bell_w = self._bell_r = -1
            if self._umid:
                shutil.rmtree(Path.home() / ".uml" / self._umid, ignore_errors=True)
            if self.workdir is not None and not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            log.error("UML process %s survived SIGKILL", proc.pid)
        self._dead.set()
        for event in list(self._waiters.values()):
            event.set()

    def _init_script(self) -> str:
        env = {
            # The agent's interpreter first, so `python3` inside is the host's (same site-packages).
            "PATH": f"{Path(self.python_exe).parent}:{DEFAULT_PATH}",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO_ROOT),
            "KUBELAB_IN_UML": "1",
            **self.env,
        }
        exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
        wd = shlex.quote(str(self.workdir))
        return f"""#!/bin/sh
# kubelab UML init: written by kubelab.netlab.uml.UMLKernel; runs as PID 1 inside UML.
{exports}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
mkdir -p /run/mroot/lib /run/netns /run/lock
ln -s /usr/lib/uml/modules /run/mroot/lib/modules
ip link set lo up
cd {shlex.quote(self.cwd)} || cd /
{shlex.quote(self.python_exe)} -m kubelab.netlab.uml_agent --workdir {wd} --tty /dev/ttyS0
echo "kubelab-uml: agent exited with status $?"
poweroff -f
"""

    # -- transport -------------------------------------------------------

    def _read_doorbells(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._bell_r, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                if line == "READY":
                    self._ready.set()
                elif line.startswith("D "):
                    event = self._waiters.get(line[2:].strip())
                    if event is not None:
                        event.set()
        self._dead.set()
        for event in list(self._waiters.values()):
            event.set()

    def _call(self, op: str, _timeout: float | None = 600.0, **params: Any) -> Any:
        """Send one request and wait for its answer (``_timeout`` None waits forever)."""
        if not self._ready.is_set() or self.workdir is None:
            raise UMLError("UML is not booted: use `with UMLKernel() as uml:` or call boot() first")
        if not self.running:
            raise UMLError("UML is not running any more" + self._console_suffix())
        req_id = f"{next(self._ids)}"
        event = threading.Event()
        self._waiters[req_id] = event
        resp_path = self.workdir / "resp" / f"{req_id}.json"
        try:
            (self.workdir / "req" / f"{req_id}.json").write_text(json.dumps({"op": op, **params}))
            with self._lock:
                os.write(self._bell_w, f"R {req_id}\n".encode())
            if not event.wait(_timeout):
                raise UMLError(f"UML did not answer {op} request {req_id} within {_timeout}s" + self._console_suffix())
            if not resp_path.exists():
                raise UMLError(f"UML stopped while handling {op} request {req_id}" + self._console_suffix())
            response = json.loads(resp_path.read_text())
        finally:
            self._waiters.pop(req_id, None)
            for path in (self.workdir / "req" / f"{req_id}.json", resp_path):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
        if not response["ok"]:
            raise UMLRemoteError(f"{op} failed inside UML: {response['error']}", response.get("traceback", ""))
        return response["result"]

    def console_tail(self, lines: int = 40) -> str:
        """The last lines the UML kernel printed on its console (boot log, init errors)."""
        if self.workdir is None:
            return ""
        path = self.workdir / "console.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _boot_hint(self) -> str:
        """Why a known boot failure happened and what to do, from the console log ("" when unknown)."""
        try:
            console = (self.workdir / "console.log").read_text(errors="replace") if self.workdir else ""
        except OSError:
            return ""
        if "ptrace set fp regs failed" in console:
            # uml_xstate's LD_PRELOAD shim pads UML 6.1's XSAVE buffer to the host's
            # size; seeing this means it was not applied (or the host changed the rule).
            return (
                ": the host CPU's XSAVE area (PKU/AVX-512/AMX) is larger than this UML kernel "
                "(Debian bookworm's user-mode-linux 6.1) saves, and the kubelab.netlab.uml_xstate "
                "LD_PRELOAD shim did not make up for it (console: 'ptrace set fp regs failed, "
                "errno = 14'); check that the shim builds (gcc) and that LD_PRELOAD reaches `linux`"
            )
        return ""

    def _console_suffix(self) -> str:
        tail = self.console_tail()
        return f"\n--- UML console (last lines) ---\n{tail}" if tail else ""

    # -- public API ------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = 120.0,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
        check: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside UML to completion, like :func:`subprocess.run` with text output captured.

        On timeout the process group is killed inside and
        :class:`subprocess.TimeoutExpired` is raised; ``check=True`` raises
        :class:`subprocess.CalledProcessError` on a non-zero status.
        """
        argv = [str(a) for a in argv]
        res = self._call(
            "run",
            argv=argv,
            timeout=timeout,
            input=input,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            _timeout=None if timeout is None else timeout + 60,
        )
        if res["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout or 0, output=res["stdout"], stderr=res["stderr"])
        done = subprocess.CompletedProcess(argv, res["returncode"], res["stdout"], res["stderr"])
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a shell script (``sh -ec``) inside UML; same keywords as :meth:`run`."""
        return self.run(["sh", "-ec", script], **kwargs)

    def python(self, code: str, *, timeout: float | None = 600.0) -> Any:
        """Execute ``code`` in the agent's persistent namespace and return its last expression.

        Names defined stay defined for later calls (import pyroute2 once).
        The value must be JSON-serialisable (otherwise its ``repr`` comes
        back).  An exception inside raises :class:`UMLRemoteError` with the
        remote traceback.  Calls run one at a time.
        """
        return self._call("python", code=code, _timeout=timeout)["value"]

    def call(self, target: str, *args: Any, timeout: float | None = 600.0, **kwargs: Any) -> Any:
        """Call a function inside UML with pickled arguments and get its pickled result back.

        ``target`` is ``"module:function"`` (imported inside) or an expression
        naming a callable in the :meth:`python` namespace (``"driver.sync"``).
        Both sides run the same interpreter and checkout, so any picklable
        kubelab object crosses over.  Calls run one at a time, like :meth:`python`.
        """
        import pickle

        assert self.workdir is not None
        n = next(self._ids)
        args_path = self.workdir / "proc" / f"call-{n}.args"
        result_path = self.workdir / "proc" / f"call-{n}.result"
        args_path.write_bytes(pickle.dumps((args, kwargs)))
        try:
            self._call("call", target=target, args_path=str(args_path), result_path=str(result_path), _timeout=timeout)
            return pickle.loads(result_path.read_bytes())
        finally:
            for path in (args_path, result_path):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> UMLProcess:
        """Start a long-lived process inside UML (its own session); stdout/stderr go to files on hostfs."""
        assert self.workdir is not None
        n = next(self._ids)
        out = self.workdir / "proc" / f"{n}.out"
        err = self.workdir / "proc" / f"{n}.err"
        argv = [str(a) for a in argv]
        res = self._call(
            "spawn", argv=argv, stdout=str(out), stderr=str(err), env=dict(env) if env is not None else None, cwd=cwd
        )
        return UMLProcess(self, res["pid"], argv, out, err)

    def run_pytest(self, args: Sequence[str], *, timeout: float | None = 1800.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m pytest ARGS`` inside UML with this checkout (``-p no:cacheprovider``)."""
        return self.run([self.python_exe, "-m", "pytest", "-p", "no:cacheprovider", *args], timeout=timeout)


def measure(rounds: int = 50) -> dict[str, float]:
    """Boot once and time the per-request overheads quoted in the module docstring (milliseconds)."""
    t0 = time.perf_counter()
    with UMLKernel() as uml:
        boot = time.perf_counter() - t0
        uml.python("1")
        t = time.perf_counter()
        for _ in range(rounds):
            uml.python("1")
        py = (time.perf_counter() - t) / rounds
        t = time.perf_counter()
        for _ in range(rounds):
            uml.run(["true"])
        run = (time.perf_counter() - t) / rounds
        t = time.perf_counter()
        uml.python("import pyroute2")
        imp = time.perf_counter() - t
    return {"boot_ms": boot * 1000, "python_ms": py * 1000, "run_true_ms": run * 1000, "import_pyroute2_ms": imp * 1000}


if __name__ == "__main__":
    if "--measure" in sys.argv[1:]:
        for key, value in measure().items():
            print(f"{key:20} {value:8.1f}")
    else:
        print(__doc__)
