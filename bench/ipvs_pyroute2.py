#!/usr/bin/env python3
"""Why the IPVS mode encodes its own netlink messages: pyroute2's cost next to ours.

Figures (medians of ``--rounds``):

* encoding one IPVS_CMD_NEW_DEST message (service + destination nested
  attributes) with pyroute2's ``ipvsmsg`` -- the codec under its
  ``IPVS``/``AsyncIPVS`` API, so a lower bound for that API -- and with
  :mod:`kubelab.modes.ipvs.kernel`'s struct encoders;
* ``import pyroute2`` plus its IPVS module in a fresh interpreter, on the
  host and (``--uml``) inside a UML kernel, where a proxy starts.

Both encoders' output is checked to decode to the same attributes.

Run: ``python3 bench/ipvs_pyroute2.py [--messages 5000] [--rounds 5] [--uml]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMPORT = "import time; t = time.perf_counter(); import pyroute2.netlink.generic.ipvs; print(time.perf_counter() - t)"


def ours(n: int) -> float:
    from kubelab.modes.ipvs import kernel as K
    from kubelab.modes.ipvs import netlink as nl

    vs = K.VirtualServer("10.96.0.10", "TCP", 80, "rr")
    t = time.perf_counter()
    for i in range(n):
        rs = K.RealServer(f"10.244.{i // 250 % 250}.{i % 250 + 1}", 8080)
        body = K._genl(K.CMD_NEW_DEST, nl.nested(K.A_SERVICE, K._svc_key_attrs(vs)) + nl.nested(K.A_DEST, K._dest_attrs(rs)))
        nl.NetlinkSocket.message(28, 1, i + 1, body)
    return (time.perf_counter() - t) / n


def theirs(n: int) -> float:
    from pyroute2.netlink.generic.ipvs import ipvsmsg

    t = time.perf_counter()
    for i in range(n):
        msg = ipvsmsg()
        msg["cmd"] = 5  # IPVS_CMD_NEW_DEST
        msg["version"] = 1
        msg["attrs"] = [
            ["IPVS_CMD_ATTR_SERVICE", {"attrs": [
                ["IPVS_SVC_ATTR_AF", 2], ["IPVS_SVC_ATTR_PROTOCOL", 6],
                ["IPVS_SVC_ATTR_ADDR", "10.96.0.10"], ["IPVS_SVC_ATTR_PORT", 80]]}],
            ["IPVS_CMD_ATTR_DEST", {"attrs": [
                ["IPVS_DEST_ATTR_ADDR_FAMILY", 2],
                ["IPVS_DEST_ATTR_ADDR", f"10.244.{i // 250 % 250}.{i % 250 + 1}"], ["IPVS_DEST_ATTR_PORT", 8080],
                ["IPVS_DEST_ATTR_FWD_METHOD", 0], ["IPVS_DEST_ATTR_WEIGHT", 1],
                ["IPVS_DEST_ATTR_U_THRESH", 0], ["IPVS_DEST_ATTR_L_THRESH", 0]]}],
        ]
        msg["header"]["type"] = 28
        msg["header"]["flags"] = 1
        msg["header"]["sequence_number"] = i + 1
        msg.encode()
    return (time.perf_counter() - t) / n


def check() -> None:
    """Both encoders describe the same destination (decoded by pyroute2)."""
    from pyroute2.netlink.generic.ipvs import ipvsmsg

    from kubelab.modes.ipvs import kernel as K
    from kubelab.modes.ipvs import netlink as nl

    body = K._genl(K.CMD_NEW_DEST, nl.nested(K.A_SERVICE, K._svc_key_attrs(K.VirtualServer("10.96.0.10", "TCP", 80)))
                   + nl.nested(K.A_DEST, K._dest_attrs(K.RealServer("10.244.0.1", 8080))))
    msg = ipvsmsg(nl.NetlinkSocket.message(28, 1, 1, body))
    msg.decode()
    dest = msg.get_attr("IPVS_CMD_ATTR_DEST")
    assert (dest.get_attr("IPVS_DEST_ATTR_ADDR"), dest.get_attr("IPVS_DEST_ATTR_PORT")) == ("10.244.0.1", 8080)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--uml", action="store_true", help="also time the import inside a UML kernel")
    args = parser.parse_args()
    check()
    a = [ours(args.messages) for _ in range(args.rounds)]
    b = [theirs(args.messages) for _ in range(args.rounds)]
    imp = [float(subprocess.run([sys.executable, "-c", IMPORT], capture_output=True, text=True, check=True).stdout)
           for _ in range(args.rounds)]

    def us(xs: list[float]) -> str:
        return f"{statistics.median(xs) * 1e6:7.1f} us (min {min(xs) * 1e6:.1f}, max {max(xs) * 1e6:.1f})"

    print(f"encode one NEW_DEST, kubelab struct codec  {us(a)}")
    print(f"encode one NEW_DEST, pyroute2 ipvsmsg      {us(b)}   ratio {statistics.median(b) / statistics.median(a):.0f}x")
    print(f"import pyroute2 IPVS, host                 {statistics.median(imp) * 1000:7.0f} ms (min {min(imp) * 1000:.0f})")
    if args.uml:
        from kubelab.netlab.uml import UMLKernel

        with UMLKernel() as uml:
            xs = [float(uml.run([sys.executable, "-c", IMPORT], check=True).stdout) for _ in range(args.rounds)]
        print(f"import pyroute2 IPVS, inside UML           {statistics.median(xs) * 1000:7.0f} ms (min {min(xs) * 1000:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
