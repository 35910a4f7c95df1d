"""The lab's network: namespaces, veths, bridges, addresses, routes and sysctls.

Shaped like a small bare-metal cluster with a bridge CNI (kubenet):

* ``kl-LAB.u`` -- the underlay: bridge ``ul0`` (the gateway address, .1 of
  ``underlayCIDR``) that every node and the external client plug into;
* ``kl-LAB.n.NODE`` -- a node: ``eth0`` on the underlay (.10, .11, ...),
  default route via the gateway, bridge ``cbr0`` holding .1 of the node's pod
  CIDR, a route to every other node's pod CIDR via that node, ``ip_forward``
  on, ``br_netfilter`` calling iptables for bridged frames (the setting is
  per namespace on current kernels, so it is set in every node);
* ``kl-LAB.p.NS.POD`` -- a pod: ``eth0`` (a veth whose node end ``vpXXXXXXXXXX``
  is a port of ``cbr0`` in hairpin mode, so a pod can reach itself through
  a Service as kubenet's hairpin-veth allows), its IP from the node's pod
  CIDR and a MAC made from that IP (:func:`mac_for`, so a reused IP keeps
  its MAC), default route via ``cbr0``; hostNetwork pods have no namespace
  of their own and run in the node's;
* ``kl-LAB.c`` -- the external client: ``eth0`` on the underlay (the
  next-to-last address), default route via the first node, so NodePorts,
  externalIPs and LoadBalancer IPs are reachable from outside the cluster.

Names use '.', which lab names cannot contain, so one lab's prefix
``kl-LAB.`` never matches another's.  Everything is done over netlink with
pyroute2, from this process, switching threads between namespaces with
:mod:`kubelab.netlab.nsutil`.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
from dataclasses import dataclass

from pyroute2 import IPRoute

from kubelab.netlab import nsutil
from kubelab.netlab.spec import LabSettings

BRIDGE = "cbr0"
UNDERLAY_BRIDGE = "ul0"
ETC_NETNS = "/etc/netns"

NODE_SYSCTLS = (
    ("net.ipv4.ip_forward", "1"),
    # kube-proxy's iptables mode sets route_localnet itself for localhost
    # NodePorts; the bridge ones make bridged pod-to-pod traffic (same node)
    # traverse iptables, which Service DNAT replies need.
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
)


def prefix(lab: str) -> str:
    return f"kl-{lab}."


def underlay_ns(lab: str) -> str:
    return f"kl-{lab}.u"


def client_ns(lab: str) -> str:
    return f"kl-{lab}.c"


def node_ns(lab: str, node: str) -> str:
    return f"kl-{lab}.n.{node}"


def pod_ns(lab: str, namespace: str, name: str) -> str:
    return f"kl-{lab}.p.{namespace}.{name}"


def pod_veth(namespace: str, name: str) -> str:
    """The node-side veth of a pod: 'vp' + 10 hex digits (interface names are at most 15)."""
    return "vp" + hashlib.sha1(f"{namespace}/{name}".encode()).hexdigest()[:10]


@dataclass
class _Netlink:
    """One pyroute2 netlink socket per namespace, opened inside it."""

    sockets: dict[str, IPRoute]

    def get(self, ns: str) -> IPRoute:
        sock = self.sockets.get(ns)
        if sock is None:
            with nsutil.entered(ns):
                sock = IPRoute()
            self.sockets[ns] = sock
        return sock

    def drop(self, ns: str) -> None:
        sock = self.sockets.pop(ns, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for sock in self.sockets.values():
            with contextlib.suppress(Exception):
                sock.close()
        self.sockets.clear()


class Topology:
    """Builds and removes one lab's namespaces and links (see module docstring)."""

    def __init__(self, settings: LabSettings):
        self.settings = settings
        self.lab = settings.name
        self._nl = _Netlink({})
        self._bridge_index: dict[str, int] = {}  # node namespace -> ifindex of its cbr0
        self._underlay_prefix = ipaddress.ip_network(settings.underlay_cidr).prefixlen

    def close(self) -> None:
        self._nl.close()

    # ------------------------------------------------------------------

    def _veth(self, in_ns: str, name: str, peer_ns: str, peer_name: str, peer_address: str | None = None) -> int:
        """A veth ``name`` in ``in_ns`` whose peer ``peer_name`` (MAC ``peer_address`` if given) is created in ``peer_ns``."""
        ipr = self._nl.get(in_ns)
        fd = nsutil.open_fd(peer_ns)
        peer = {"ifname": peer_name, "net_ns_fd": fd}
        if peer_address:
            peer["address"] = peer_address
        try:
            ipr.link("add", ifname=name, kind="veth", peer=peer)
        finally:
            os.close(fd)
        return ipr.link_lookup(ifname=name)[0]

    @staticmethod
    def _up(ipr: IPRoute, ifname: str, address: str | None = None, prefixlen: int = 0) -> int:
        # Loopback is always interface 1 of a namespace: one netlink lookup less per pod.
        idx = 1 if ifname == "lo" else ipr.link_lookup(ifname=ifname)[0]
        if address:
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
        ipr.link("set", index=idx, state="up")
        return idx

    def build_underlay(self) -> None:
        """The underlay bridge and the external client."""
        s = self.settings
        u, c = underlay_ns(self.lab), client_ns(self.lab)
        nsutil.add(u)
        ipr = self._nl.get(u)
        self._up(ipr, "lo")
        ipr.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge", address=mac_for(s.gateway_ip))
        self._up(ipr, UNDERLAY_BRIDGE, s.gateway_ip, self._underlay_prefix)
        nsutil.write_sysctl(u, "net.ipv4.ip_forward", "1")
        nsutil.add(c)
        idx = self._veth(u, "client", c, "eth0")
        ipr.link("set", index=idx, master=ipr.link_lookup(ifname=UNDERLAY_BRIDGE)[0], state="up")
        cl = self._nl.get(c)
        self._up(cl, "lo")
        self._up(cl, "eth0", s.client_ip, self._underlay_prefix)
        # Everything off the underlay (cluster IPs, externalIPs, LB IPs) goes to the first node.
        cl.route("add", dst="0.0.0.0/0", gateway=s.node_ip(0))

    def build_node(self, index: int) -> None:
        s = self.settings
        node = s.nodes[index]
        u, n = underlay_ns(self.lab), node_ns(self.lab, node.name)
        nsutil.add(n)
        uipr = self._nl.get(u)
        idx = self._veth(u, f"n{index}", n, "eth0")
        uipr.link("set", index=idx, master=uipr.link_lookup(ifname=UNDERLAY_BRIDGE)[0], state="up")
        ipr = self._nl.get(n)
        self._up(ipr, "lo")
        self._up(ipr, "eth0", s.node_ip(index), self._underlay_prefix)
        ipr.route("add", dst="0.0.0.0/0", gateway=s.gateway_ip)
        cidr = s.node_pod_cidr(index)
        # An explicit bridge MAC, as kubenet sets on cbr0: otherwise the bridge
        # takes the lowest MAC of its ports, which changes as pods come and go,
        # and every pod's neighbour entry for its gateway goes stale.
        ipr.link("add", ifname=BRIDGE, kind="bridge", address=mac_for(str(cidr.network_address + 1)))
        self._bridge_index[n] = self._up(ipr, BRIDGE, str(cidr.network_address + 1), cidr.prefixlen)
        for j, other in enumerate(s.nodes):
            if j != index:
                ipr.route("add", dst=str(s.node_pod_cidr(j)), gateway=s.node_ip(j))
        # The underlay router knows every pod CIDR too (return traffic from the client side).
        uipr.route("add", dst=str(cidr), gateway=s.node_ip(index))
        for key, value in NODE_SYSCTLS:
            with contextlib.suppress(FileNotFoundError):
                nsutil.write_sysctl(n, key, value)

    def build_pod(self, namespace: str, name: str, node: str, ip: str, resolv_conf: str | None = None) -> str:
        """A pod namespace wired to its node's bridge; returns the namespace name."""
        s = self.settings
        index = s.node_index(node)
        cidr = s.node_pod_cidr(index)
        n, p = node_ns(self.lab, node), pod_ns(self.lab, namespace, name)
        if resolv_conf is not None:
            write_resolv_conf(p, resolv_conf)
        nsutil.add(p)
        ipr = self._nl.get(n)
        veth = pod_veth(namespace, name)
        # The pod's MAC follows from its IP (as ovn-kubernetes does): a pod
        # created with the IP of a deleted one has the MAC it had, so the
        # neighbour entries the node and other pods still hold stay right
        # instead of black-holing the new pod until they expire (~30 s).
        idx = self._veth(n, veth, p, "eth0", mac_for(ip))
        bridge = self._bridge_index.get(n) or ipr.link_lookup(ifname=BRIDGE)[0]
        ipr.link("set", index=idx, master=bridge, state="up")
        with contextlib.suppress(Exception):  # hairpin: a pod reaching itself via its Service
            # IFLA_BRPORT_MODE is pyroute2's ``mode``; it silently ignores unknown keywords such as ``hairpin_mode``.
            ipr.brport("set", index=idx, mode=1)
        with nsutil.entered(p):
            pipr = IPRoute()
        try:
            self._up(pipr, "lo")
            self._up(pipr, "eth0", ip, cidr.prefixlen)
            pipr.route("add", dst="0.0.0.0/0", gateway=str(cidr.network_address + 1))
        finally:
            pipr.close()
        return p

    def remove_pod(self, namespace: str, name: str) -> None:
        p = pod_ns(self.lab, namespace, name)
        nsutil.kill_pids(nsutil.pids_in(p))
        nsutil.remove(p)  # the veth pair goes with the namespace
        shutil.rmtree(os.path.join(ETC_NETNS, p), ignore_errors=True)


def mac_for(ip: str) -> str:
    """A locally administered unicast MAC made from an IPv4 address: ``0a:58:`` then the address's 4 bytes."""
    return "0a:58:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ip).packed)


def write_resolv_conf(ns: str, text: str) -> None:
    """/etc/netns/NS/resolv.conf: ``ip netns exec`` bind-mounts it over /etc/resolv.conf."""
    d = os.path.join(ETC_NETNS, ns)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "resolv.conf"), "w") as f:
        f.write(text)


def resolv_conf(namespace: str, dns_ip: str, domain: str) -> str:
    """The resolv.conf kubelet writes for a ClusterFirst pod."""
    return f"search {namespace}.svc.{domain} svc.{domain} {domain}\nnameserver {dns_ip}\noptions ndots:5\n"


def teardown(lab: str) -> list[str]:
    """Remove everything of lab ``lab``: processes inside its namespaces, the namespaces, /etc/netns files.

    Safe to call any number of times, and after a half-finished build.
    Returns the namespaces removed.
    """
    pre = prefix(lab)
    names = nsutil.names(pre)
    inodes = {}
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(nsutil.path(name))
            inodes[(st.st_dev, st.st_ino)] = name
    victims = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{entry}/ns/net")
                if (st.st_dev, st.st_ino) in inodes:
                    victims.append(int(entry))
    nsutil.kill_pids(victims)
    # Pods first, then nodes, then the underlay: fewer veth peers die twice.
    order = sorted(names, key=lambda n: (0 if ".p." in n else 1 if ".n." in n else 2, n))
    for name in order:
        nsutil.remove(name)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(ETC_NETNS):
            if entry.startswith(pre):
                shutil.rmtree(os.path.join(ETC_NETNS, entry), ignore_errors=True)
    return order
