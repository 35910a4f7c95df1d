"""``kubelab lab``: build and drive network-namespace clusters from the shell."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Build a Kubernetes-shaped cluster out of network namespaces and drive it.

A lab file (YAML) holds the lab's settings (`lab:` -- nodes, proxy mode,
pod/service/underlay CIDRs, DNS) and ordinary Kubernetes manifests
(Services, Pods, Deployments as a replica shorthand).  `lab up` builds every
namespace, starts the pods' servers, the endpoints controller, `kubelab
proxy` in each node and `kubelab dns` when DNS is on, then returns; later
commands find the lab by name.  Needs root."""

EPILOG = """\
examples:
  kubelab lab up examples/labs/basic.yaml
  kubelab lab up examples/labs/basic.yaml --name mine --proxy-mode userspace
  kubelab lab exec basic client -- curl -s http://web/      # the pod `client`, cluster DNS
  kubelab lab exec basic external -- curl -s http://172.18.0.10:30000/
  kubelab lab exec basic web-1 -- getent ahosts web
  kubelab lab apply basic more-services.yaml
  kubelab lab delete basic pod/web-1 --grace-period 10
  kubelab lab status basic
  kubelab lab down basic          # or: kubelab lab down --all

exec targets: a pod (NAME or NAMESPACE/NAME), a node, `external` (outside the
cluster, on the underlay; also `client` when no pod has that name) or
`underlay`.  Files: /run/kubelab/labs/NAME/
(state.json, manifests/, logs/)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("up", help="build a lab from a lab file and start it",
                       description="Build a lab from FILE; returns once every pod serves and the proxies run.")
    p.add_argument("file", help="lab file (YAML: a `lab:` settings document plus manifests)")
    p.add_argument("--name", help="lab name (default: the file's lab.name, else the file name)")
    p.add_argument("--proxy-mode", choices=("iptables", "ipvs", "userspace", "none"), help="override lab.proxyMode")
    p.add_argument("--kernel", choices=("host", "uml", "auto"), help="override lab.kernel")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the lab (default 300)")
    p.add_argument("--wait-synced", action="store_true", help="also wait until every proxy has programmed the lab")

    p = sub.add_parser("exec", help="run a command in a pod, node or the external client",
                       description="Run COMMAND inside TARGET's network namespace (its resolv.conf too).")
    p.add_argument("lab")
    p.add_argument("target", help="pod name (or ns/name), node name, `external` or `underlay`")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds the command may run in a lab inside UML (default 600; host-kernel labs: no limit)")
    p.add_argument("-i", "--stdin", action="store_true",
                   help="pass this command's stdin to it in a lab inside UML (host-kernel labs always do)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the command and its arguments")

    p = sub.add_parser("apply", help="create or update Services, Pods, Deployments from files",
                       description="Apply manifests (a file or a folder); all or nothing, problems listed.")
    p.add_argument("lab")
    p.add_argument("files", nargs="+")

    p = sub.add_parser("delete", help="delete pod/NAME, service/NAME, deployment/NAME, endpointslice/NAME",
                       description="Delete objects.  Pods turn terminating for their grace period, then go.")
    p.add_argument("lab")
    p.add_argument("refs", nargs="+", metavar="KIND/[NAMESPACE/]NAME")
    p.add_argument("--grace-period", type=int, default=None,
                   help="seconds a deleted pod stays terminating (default: the pod's terminationGracePeriodSeconds)")
    p.add_argument("--now", action="store_true", help="same as --grace-period 0")

    p = sub.add_parser("status", help="show a lab's nodes, pods, services and processes")
    p.add_argument("lab", nargs="?", help="lab name (default: list the labs that are up)")
    p.add_argument("--json", action="store_true", help="print the state as JSON")

    p = sub.add_parser("down", help="tear a lab down: namespaces, links, files, processes")
    p.add_argument("labs", nargs="*")
    p.add_argument("--all", action="store_true", help="every lab that is up (and leftovers of crashed ones)")

    sub.add_parser("list", help="names of the labs that are up")


def run(args: argparse.Namespace) -> int:
    from kubelab.netlab.lab import Lab, LabError, LabSpecError

    try:
        return _ACTIONS[args.action](args, Lab)
    except LabSpecError as exc:
        print("error: the lab file or manifests are invalid; nothing was changed:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _up(args, Lab) -> int:
    from kubelab.netlab.spec import LabSpec

    overrides = {}
    if args.proxy_mode:
        overrides["proxyMode"] = args.proxy_mode
    if args.kernel:
        overrides["kernel"] = args.kernel
    spec = LabSpec.from_file(args.file, name=args.name, **overrides)
    print(f"lab {spec.name}: bringing up {len(spec.settings.nodes)} nodes, proxy mode {spec.settings.proxy_mode} ...", flush=True)
    lab = Lab.up(spec, timeout=args.timeout)
    if args.wait_synced:
        lab.wait_synced()
    print_status(lab.state(), sys.stdout)
    print(f"\nnext: kubelab lab exec {spec.name} external -- curl -s http://NODE_IP:NODE_PORT/ ; kubelab lab down {spec.name}")
    return 0


def _exec(args, Lab) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("error: give the command after --, e.g. kubelab lab exec basic client -- curl -s http://10.96.0.20/", file=sys.stderr)
        return 2
    lab = Lab.attach(args.lab)
    import os

    if lab.kernel == "uml":
        # The namespaces are inside the UML kernel: run there, relay output and exit code.
        stdin = sys.stdin.read() if args.stdin else None
        r = lab.exec(args.target, argv, timeout=args.timeout, input=stdin)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        return r.returncode
    full = lab.exec_argv(args.target, argv)
    os.execvp(full[0], full)  # the command's own stdio and exit code
    return 0  # not reached


def _apply(args, Lab) -> int:
    lab = Lab.attach(args.lab)
    for f in args.files:
        result = lab.apply(f)
        for kind in ("services", "pods"):
            for name in result.get(kind, []):
                print(f"{kind[:-1]}/{name} configured")
        for name in result.get("scaledDown", []):
            print(f"pod/{name} deleted (scaled down)")
    return 0


def _delete(args, Lab) -> int:
    lab = Lab.attach(args.lab)
    grace = 0 if args.now else args.grace_period
    for ref in args.refs:
        result = lab.delete(ref, grace=grace)
        extra = f" (terminating for {result['gracePeriod']}s)" if result.get("gracePeriod") else ""
        print(f"{ref} deleted{extra}")
    return 0


def _status(args, Lab) -> int:
    if not args.lab:
        labs = Lab.list()
        print("\n".join(labs) if labs else "no labs are up")
        return 0
    lab = Lab.attach(args.lab)
    try:
        state = lab.status()
    except Exception as exc:  # daemon gone: show the last state written, and say so
        state = lab.state()
        print(f"warning: the lab daemon is not answering ({exc}); showing the last recorded state", file=sys.stderr)
    if args.json:
        json.dump(state, sys.stdout, indent=1, sort_keys=True)
        print()
    else:
        print_status(state, sys.stdout)
    return 0


def _down(args, Lab) -> int:
    from kubelab.netlab import nsutil

    names = list(args.labs)
    if args.all:
        names = sorted(set(names) | set(Lab.list()) | {n[3:].split(".", 1)[0] for n in nsutil.names("kl-") if "." in n})
    if not names:
        print("error: name a lab, or use --all", file=sys.stderr)
        return 2
    for name in names:
        Lab.down_by_name(name)
        print(f"lab {name} is down")
    return 0


def _list(args, Lab) -> int:
    for name in Lab.list():
        print(name)
    return 0


_ACTIONS = {"up": _up, "exec": _exec, "apply": _apply, "delete": _delete, "status": _status, "down": _down, "list": _list}


def _table(rows: list[list[str]], out) -> None:
    if not rows:
        return
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def print_status(state: dict, out) -> None:
    """Nodes, pods, services and processes of a lab, as tables."""
    dns = state.get("dns") or {}
    out.write(
        f"lab {state['name']}  proxy mode {state['proxyMode']}  kernel {state.get('kernel', 'host')}  "
        f"DNS {'on at ' + dns['clusterIP'] if dns.get('enabled') else 'off'}\n"
        f"client {state['client']['ip']} (exec target `external`)\n\n"
    )
    rows = [["NODE", "IP", "POD CIDR", "ZONE"]]
    for name, n in state["nodes"].items():
        rows.append([name, n["ip"], n["podCIDR"], n["labels"].get("topology.kubernetes.io/zone", "")])
    _table(rows, out)
    out.write("\n")
    rows = [["POD", "IP", "NODE", "READY", "STATUS"]]
    for key, p in sorted(state["pods"].items()):
        status = "Terminating" if p["terminating"] else "Running"
        rows.append([key, p["ip"] + (" (host)" if p["hostNetwork"] else ""), p["node"], "1/1" if p["ready"] else "0/1", status])
    _table(rows, out)
    out.write("\n")
    rows = [["SERVICE", "TYPE", "CLUSTER-IP", "PORTS"]]
    for key, s in sorted(state["services"].items()):
        ports = ",".join(
            f"{p['port']}{':' + str(p['nodePort']) if p['nodePort'] else ''}/{p['protocol']}" for p in s["ports"]
        )
        rows.append([key, s["type"], s["clusterIP"] or "-", ports or "-"])
    _table(rows, out)
    procs = state.get("processes") or {}
    if procs:
        out.write("\n")
        rows = [["PROCESS", "PID", "STATE", "RESTARTS", "LOG"]]
        for name, p in sorted(procs.items()):
            st = "running" if p["running"] else f"exited {p['exitCode']}"
            pid = str(p["pid"]) if p.get("pid") else f"{p['umlPid']} (in UML)" if p.get("umlPid") else "-"
            rows.append([name, pid, st, str(p["restarts"]), p["log"]])
        _table(rows, out)
