#!/usr/bin/env python3
"""A/B of two rayshift builds (or of rayshift and nginx) for HTTP/2 or TLS clients, in the same rounds.

    python3 benches/load/h2_ab.py A_BINARY B_BINARY [--rounds 6] [--duration 6] [--conns 64] [--streams N]
                                  [--tls] [--h1]

The main benchmark sends plain HTTP/1.1 (wrk), so it never takes rayshift's HTTP/2 path nor its
TLS listener; this does, with h2load (Debian's nghttp2-client, installed if missing): by default
h2c (HTTP/2 with prior knowledge); `--tls` serves the clients over TLS (a self-signed ECDSA P-256
certificate made with openssl in the work dir; ALPN picks h2); `--tls --h1` sends HTTP/1.1 over
TLS (`--streams` then counts requests in flight per connection, pipelined: 1 by default).
Either binary may be the word `nginx`: nginx as bench.py configures it, its listener speaking
HTTP/2 (`http2`, with `ssl` and TLS 1.3 only under --tls). Starts the benchmark's nginx backend
and one gateway per build (cores as in bench.py: h2load on the load core, backend and gateways
on the proxy core), then, round by round with the order alternating, runs h2load against each
and reads the gateway's CPU from /proc (the handshakes, one per connection, are in it too); the
negotiated TLS version and cipher are logged. Prints each run and the medians of the paired per-round
ratios (req/s, CPU per request) and differences (user time per request). Used to check that the
profile-guided build (scripts/build-pgo, whose training sends neither HTTP/2 nor TLS) is no
slower here. Run benches/load/run.sh once first: it installs nginx.
"""
import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="h2_ab.py")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=6)
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--streams", type=int, help="requests in flight per connection (h2load -m): "
                    "default 4 streams for HTTP/2, 1 (no pipelining) for --h1")
    ap.add_argument("--tls", action="store_true", help="clients over TLS (ALPN h2, or HTTP/1.1 with --h1)")
    ap.add_argument("--h1", action="store_true", help="HTTP/1.1 instead of HTTP/2 (h2load --h1); needs --tls")
    a = ap.parse_args()
    if a.h1 and not a.tls:
        ap.error("--h1 needs --tls (plain HTTP/1.1 is the main benchmark's: benches/load/run.sh)")
    if a.streams is None:
        a.streams = 1 if a.h1 else 4
    if shutil.which("h2load") is None:
        subprocess.run([str(Path(__file__).resolve().parents[2] / "scripts/apt-install.sh"), "nghttp2-client"],
                       check=True)
    work = tempfile.mkdtemp(prefix="rayshift-h2-ab.")
    results = Path(__file__).resolve().parent / "results"
    extra, cert, key = [], None, None
    if a.tls:
        cert, key = Path(work) / "tls.crt", Path(work) / "tls.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        extra = ["--rayshift-config-extra", f"tls:\n  cert_file: {cert}\n  key_file: {key}\n"]
    args = bench.parse_args(["--work", work, "--rayshift", a.a, "--results", str(results), "--targets", "rayshift",
                             *extra])
    b = bench.Bench(args)
    b.client_tls = a.tls
    scheme = "https" if a.tls else "http"
    protocol = ("HTTP/1.1 over TLS" if a.h1 else "HTTP/2 over TLS") if a.tls else "h2c"
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    try:
        b.start_backend()
        for k, binary in (("A", a.a), ("B", a.b)):
            if binary == "nginx":
                start_nginx(b, f"gw{k}", a.tls, cert, key)
            else:
                b.start_rayshift(f"gw{k}", [("bench", b.ports["backend"], 100)], binary)
        for rnd in range(a.rounds):
            for k in (["A", "B"] if rnd % 2 == 0 else ["B", "A"]):
                pids = b.pids[f"gw{k}"]
                u0, s0 = bench.user_system_seconds(pids)
                out = subprocess.run(
                    ["taskset", "-c", args.load_cpu, "h2load", "-t", "1", "-c", str(a.conns), "-m", str(a.streams),
                     *(["--h1"] if a.h1 else []), "-D", str(a.duration), f"{scheme}://127.0.0.1:{b.ports['gw' + k]}/"],
                    capture_output=True, text=True, check=True).stdout
                u1, s1 = bench.user_system_seconds(pids)
                done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
                rps = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
                if not done or not rps or int(done.group(1)) == 0:
                    raise RuntimeError(f"h2load gave no successful requests:\n{out}")
                n = int(done.group(1))
                tls = re.search(r"TLS Protocol: (\S+)\nCipher: (\S+)", out)
                if tls and rnd == 0:
                    bench.log(f"{k}: {tls.group(1)}, {tls.group(2)}")
                run = {"rps": float(rps.group(1)), "cpu_us": (u1 - u0 + s1 - s0) / n * 1e6,
                       "user_us": (u1 - u0) / n * 1e6, "succeeded": n}
                runs[k].append(run)
                bench.log(f"round {rnd} {k}: {run['rps']:.0f} req/s, CPU {run['cpu_us']:.1f} us/request "
                          f"({run['user_us']:.1f} user), {n} succeeded")
    finally:
        b.procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    pairs = list(zip(runs["A"], runs["B"]))
    med = statistics.median
    print(f"A = {a.a}\nB = {a.b}\n{protocol}, {a.conns} connections, {a.streams} in flight each")
    print(f"paired medians over {len(pairs)} rounds: req/s A/B {med(x['rps'] / y['rps'] for x, y in pairs):.3f}, "
          f"CPU/request A/B {med(x['cpu_us'] / y['cpu_us'] for x, y in pairs):.3f}, "
          f"user time A-B {med(x['user_us'] - y['user_us'] for x, y in pairs):+.2f} us "
          f"(A lower in {sum(x['user_us'] < y['user_us'] for x, y in pairs)} of {len(pairs)})")


def start_nginx(b: bench.Bench, name: str, tls: bool, cert: Path | None, key: Path | None) -> None:
    """nginx as the benchmark configures it (1 worker, upstream keep-alive, no access log), its
    listener speaking HTTP/2: h2c with prior knowledge, or TLS 1.3 with ALPN h2 and http/1.1."""
    port = bench.free_port()
    conf = bench.nginx_proxy_conf(b.work, port, b.ports["backend"], name)
    listen = f"listen 127.0.0.1:{port} backlog=4096;"
    assert listen in conf
    if tls:
        # TLS 1.3 as rayshift speaks it (nginx 1.22 otherwise settles on 1.2 with h2load).
        directives = (f"listen 127.0.0.1:{port} backlog=4096 ssl http2;\n    ssl_certificate {cert};\n"
                      f"    ssl_certificate_key {key};\n    ssl_protocols TLSv1.3;")
    else:
        directives = f"listen 127.0.0.1:{port} backlog=4096 http2;"
    b.start_nginx(name, conf.replace(listen, directives))
    b.ports[name] = port


if __name__ == "__main__":
    main()
