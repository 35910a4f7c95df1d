"""Run the test API server as a process, driven by JSON commands on stdin.

For tests that need the server somewhere the test process is not (inside a
network namespace)::

    ip netns exec NS python3 -m fakeapi.serve --port 0 --objects objs.json

It prints ``listening <url>`` once up, then for each stdin line, one JSON
command, prints ``ok <result>`` (or ``error <message>``):

    {"op": "apply", "object": {...}}                      create or replace
    {"op": "delete", "kind": "Service", "namespace": "default", "name": "web"}
    {"op": "compact"}                                      expire history (410 for resumes)
    {"op": "cut"}                                          drop every open watch mid-event
    {"op": "outage", "count": 5}                           drop the next 5 requests unanswered
    {"op": "stats"}                                        requests, violations, open watches

End of input stops the server; violations are printed and set the exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from .server import FakeAPIServer


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fakeapi.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--objects", help="a JSON file with a list of objects to start with")
    p.add_argument("--bookmark-interval", type=float, default=60.0)
    args = p.parse_args(argv)
    api = FakeAPIServer(host=args.host, bookmark_interval=args.bookmark_interval, strict=False)
    api.port = args.port
    if args.objects:
        with open(args.objects) as f:
            api.apply_all(json.load(f))
    await api.start()
    print(f"listening {api.url}", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
                op = cmd["op"]
                if op == "apply":
                    result = api.apply(cmd["object"])["metadata"]["resourceVersion"]
                elif op == "delete":
                    result = api.delete(cmd["kind"], cmd.get("namespace", ""), cmd["name"])
                elif op == "compact":
                    api.compact()
                    result = api.store.compacted
                elif op == "cut":
                    result = api.cut_watches()
                elif op == "outage":
                    api.inject(status=0, count=int(cmd.get("count", 1)))
                    result = api.cut_watches(partial=False)
                elif op == "stats":
                    result = {"requests": [[r.op, r.path, r.status] for r in api.requests],
                              "violations": api.violations, "open_watches": api.open_watches,
                              "faults_left": sum(f.count for f in api.faults)}
                else:
                    raise ValueError(f"unknown op {op!r}")
                print("ok " + json.dumps(result), flush=True)
            except Exception as e:  # noqa: BLE001 - report and keep serving
                print(f"error {type(e).__name__}: {e}", flush=True)
    finally:
        await api.stop()
    for v in api.violations:
        print(f"violation {v}", file=sys.stderr)
    return 1 if api.violations else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
