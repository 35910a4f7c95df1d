"""Reading and writing sysctls (``net/ipv4/conf/all/route_localnet`` etc.).

Goes through a runner (``sysctl -n`` / ``sysctl -w``) rather than
``/proc/sys`` directly so it acts in the runner's network namespace: a
process's own ``/proc/sys/net`` is its own namespace's, and the kernel tests
run the proxier against a namespace the test process is not in.
"""

from __future__ import annotations

from collections.abc import Callable

RunFn = Callable[..., tuple[int, str, str]]


class SysctlError(RuntimeError):
    pass


class Sysctl:
    """kube-proxy's utilsysctl.Interface over ``sysctl(8)``; keys use "/" or "." separators."""

    def __init__(self, run: RunFn) -> None:
        self._run = run

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", ".")

    def get(self, name: str) -> int:
        rc, out, err = self._run(["sysctl", "-n", self._key(name)])
        if rc != 0:
            raise SysctlError(f"cannot read sysctl {name}: {(err or out).strip()}")
        return int(out.strip().split()[0])

    def set(self, name: str, value: int) -> None:
        rc, out, err = self._run(["sysctl", "-w", f"{self._key(name)}={value}"])
        if rc != 0:
            raise SysctlError(f"cannot set sysctl {name}={value}: {(err or out).strip()} (needs root)")

    def ensure(self, name: str, value: int) -> bool:
        """Set ``name`` to ``value`` unless it already is; True if it changed (kube-proxy's EnsureSysctl)."""
        try:
            if self.get(name) == value:
                return False
        except SysctlError:
            pass
        self.set(name, value)
        return True
