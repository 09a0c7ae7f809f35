#!/usr/bin/env python3
"""A small, bounded HTTP load loop for the local Ray Serve clusters (standard library only).

    python tests/ray/load.py URL [-n 500] [-c 8] [--method GET] [--data BODY] [--timeout 10]

Sends exactly N requests from C threads, each on its own keep-alive HTTP/1.1 connection (reopened
after errors or a server close), and prints one JSON object: requests, seconds, rps, statuses
(status code -> count, "error" for transport errors), latency percentiles in ms, and the share of
each distinct x-version header. Exits 0 unless every request failed at the transport level.
Only loopback URLs are accepted.
"""

import argparse
import http.client
import json
import threading
import time
import urllib.parse
from collections import Counter

LOOPBACK = ("127.", "localhost", "[::1]", "::1")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("-n", type=int, default=500, help="total requests")
    p.add_argument("-c", type=int, default=8, help="concurrent connections")
    p.add_argument("--method", default="GET")
    p.add_argument("--data", default=None, help="request body")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    a = p.parse_args()

    u = urllib.parse.urlsplit(a.url)
    if u.scheme != "http" or not (u.hostname or "").startswith(LOOPBACK):
        raise SystemExit("only http:// loopback URLs")
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    body = a.data.encode() if a.data is not None else None

    lock = threading.Lock()
    remaining = [a.n]
    statuses, versions, latencies = Counter(), Counter(), []

    def take():
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def worker():
        conn = None
        while take():
            t = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=a.timeout)
                conn.request(a.method, path, body=body)
                r = conn.getresponse()
                r.read()
                key, version = r.status, r.getheader("x-version")
                if r.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                key, version = "error", None
                if conn is not None:
                    conn.close()
                conn = None
            dt = (time.perf_counter() - t) * 1000
            with lock:
                statuses[key] += 1
                latencies.append(dt)
                if version:
                    versions[version] += 1
        if conn is not None:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(max(1, a.c))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0

    latencies.sort()

    def pct(q):
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    out = {
        "url": a.url,
        "requests": a.n,
        "concurrency": a.c,
        "seconds": round(secs, 2),
        "rps": round(a.n / secs, 1) if secs > 0 else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "versions": dict(versions),
        "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": pct(1.0)},
    }
    print(json.dumps(out))
    return 1 if statuses.get("error", 0) == a.n else 0


if __name__ == "__main__":
    raise SystemExit(main())
