"""Named network namespaces, the way ``ip netns`` keeps them, without a process per call.

A named namespace is a bind mount of a namespace file on ``/run/netns/NAME``.
``ip netns add`` forks and execs; pyroute2's ``netns.create`` forks a child
process.  Creating hundreds of pods that way costs seconds, so this module
does it in-process with ``unshare(2)``/``setns(2)``, which act on the calling
*thread* only: the thread unshares a fresh namespace, bind-mounts
``/proc/thread-self/ns/net`` and switches back.

:func:`entered` switches the calling thread into a namespace for a ``with``
block; sockets (including pyroute2's netlink sockets) opened inside stay in
that namespace after the block ends -- that is how the lab configures pods
and how one workload process serves every pod.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
from collections.abc import Iterator

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str, name: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {name}: {os.strerror(err)}")


def path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def ensure_run_dir() -> None:
    """Make /run/netns exist and be a shared mount, as ``ip netns add`` does.

    Shared propagation lets namespace mounts made later be seen by mount
    namespaces created earlier (``ip netns exec`` makes one per command).
    Done once by running ``ip netns add`` for a throwaway name when the
    directory is not a mount point yet.
    """
    if is_mount_point(NETNS_RUN_DIR):
        return
    probe = f"kl-probe-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True)
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)


def is_mount_point(path: str) -> bool:
    """Is ``path`` a mount point of this mount namespace?

    ``os.path.ismount`` cannot tell: ``ip netns add`` bind-mounts /run/netns
    onto itself, so it is on the same device as /run, and ismount said no --
    which made every namespace created here fork ``ip netns add`` and
    ``ip netns del`` again (a fifth of the time of creating a pod).
    """
    needle = f" {path} "
    with open("/proc/self/mountinfo") as f:
        # Field 5 is the mount point: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ...".
        return any(line.split(" ", 5)[4] == path for line in f if needle in line)


def add(name: str) -> None:
    """Create the named namespace; FileExistsError if it exists."""
    ensure_run_dir()
    p = path(name)
    fd = os.open(p, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
    os.close(fd)
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET) for", name)
            _check(_libc.mount(b"/proc/thread-self/ns/net", p.encode(), b"none", MS_BIND, None), "bind-mount", p)
        finally:
            _check(_libc.setns(orig, CLONE_NEWNET), "setns back from", name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(p)
        raise
    finally:
        os.close(orig)


def remove(name: str) -> bool:
    """Delete the named namespace (its interfaces go with it); False if it did not exist."""
    p = path(name)
    if not os.path.exists(p):
        return False
    _libc.umount2(p.encode(), MNT_DETACH)
    try:
        os.unlink(p)
    except FileNotFoundError:
        return False
    return True


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def names(prefix: str = "") -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with the calling thread in namespace ``name``."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        fd = os.open(path(name), os.O_RDONLY)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), "setns into", name)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _check(_libc.setns(orig, CLONE_NEWNET), "setns back from", name)
    finally:
        os.close(orig)


def open_fd(name: str) -> int:
    """An fd of the namespace, e.g. for a veth peer's ``net_ns_fd``; the caller closes it."""
    return os.open(path(name), os.O_RDONLY)


def write_sysctl(name: str, key: str, value: str) -> None:
    """Set a net.* sysctl inside namespace ``name`` (``/proc/sys/net`` is per namespace of the opener)."""
    with entered(name):
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


def read_sysctl(name: str, key: str) -> str:
    with entered(name):
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            return f.read().strip()


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (what ``ip netns pids`` prints)."""
    try:
        st = os.stat(path(name))
    except FileNotFoundError:
        return []
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if ns.st_ino == st.st_ino and ns.st_dev == st.st_dev:
            out.append(int(entry))
    return out


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
