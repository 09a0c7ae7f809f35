#!/usr/bin/env python3
"""Load benchmark: direct vs rayshift vs nginx vs HAProxy in front of a 1-worker nginx backend.

Run it through benches/load/run.sh (which installs the tools and builds rayshift). Method, in short:

* backend: nginx, 1 worker, no access log, answering `/` (3-byte body), `/16k` (16 KiB static file),
  `/-/healthz` and `/-/routes` (so rayshift's Serve probes pass), on two ports (the churn run needs
  two clusters);
* targets: `direct` (wrk -> backend), `rayshift`, `nginx` (1 worker, upstream keepalive) and
  `haproxy` (1 thread, http-reuse always), all with no access log and pooled keep-alive upstreams;
* cores: wrk (and the small python helpers) on --load-cpu, the backend and the proxy under test
  on --proxy-cpu;
* rounds: each round runs every scenario through every target, the target order rotating from round
  to round so machine drift hits all alike; the report gives the median over rounds of each figure;
* CPU/request: utime+stime of the proxy's processes from /proc/PID/stat, before and after the wrk
  run, divided by the requests wrk completed;
* churn: a second rayshift with two clusters (the backend's two ports) in one shard, with weights
  set through `PUT /v1/shards/shard-0/weights` --churn-rate times a second while wrk runs, against
  the same instance without churn; two patterns: "flip" swaps 100/0 <-> 0/100 (all traffic moves
  each time), "same split" sets 100/0 each time (the table is rebuilt, persisted and published, the
  traffic stays);
* RSS: VmRSS of each proxy (all its processes) with 1,000 idle keep-alive client connections, each
  of which has completed one request.

Helper modes (used by the benchmark itself): `bench.py idle ...` and `bench.py fsync ...`. The churner
is native (crates/churn, built by run.sh): it shares wrk's core.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LUA = HERE / "report.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = ["direct", "rayshift", "rayshift-alt", "nginx", "haproxy", "floor-epoll", "floor-tokio", "floor-uring"]
# Minimal relays (crates/floor), not proxies: what a proxy's system calls and event loop cost with no
# proxy logic at all. Only when named in --targets.
FLOORS = ["floor-epoll", "floor-tokio", "floor-uring"]
PROXIES = ["rayshift", "rayshift-alt", "nginx", "haproxy"]
# name -> (path, connections)
SCENARIOS = {
    "small-c64": ("/", 64),
    "small-c1": ("/", 1),
    "16k-c64": ("/16k", 64),
    "16k-c1": ("/16k", 1),
    # A new connection per request (wrk sends `Connection: close`): the accept path's cost.
    "close-c32": ("/", 32),
}
CLOSE_SCENARIOS = {"close-c32"}
SYSCALLS = ["read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto", "sendmsg", "sendfile64",
            "epoll_wait", "epoll_pwait", "epoll_ctl", "futex", "sched_yield"]
DEFAULT_SCENARIOS = ["small-c64", "small-c1", "16k-c64"]
SMALL_BODY = b"ok\n"
BIG_SIZE = 16 * 1024


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# /proc readers


def proc_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state); utime is field 14, stime field 15.
    return int(rest[11]) + int(rest[12])


def cpu_seconds(pids: list[int]) -> float:
    return sum(proc_ticks(p) for p in pids) / CLK_TCK


def thread_run_seconds(pid: int) -> dict[str, float]:
    """Time each thread of `pid` ran on a CPU, keyed by thread name (threads of one name summed):
    the scheduler's nanosecond count from /proc/PID/task/*/schedstat, not clock ticks."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            ran = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        out[comm] = out.get(comm, 0.0) + ran / 1e9
    return out


def run_seconds(pids: list[int]) -> float:
    """Time every thread of pids ran on a CPU (nanosecond count, see `thread_run_seconds`)."""
    return sum(sum(thread_run_seconds(p).values()) for p in pids)


# The interleaved run's control (`Bench.churn_null`).
NULL_CHURN = "null: swaps sent to a gateway on wrk's core"


def core_busy_seconds(cpu: int) -> float:
    """Time core `cpu` did work (user, nice, system, irq and softirq in /proc/stat; not idle,
    iowait or steal), in seconds: clock ticks, so read over windows of seconds."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK
    raise RuntimeError(f"no cpu{cpu} in /proc/stat")


def user_system_seconds(pids: list[int]) -> tuple[float, float]:
    u = s = 0
    for p in pids:
        with open(f"/proc/{p}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        u += int(rest[11])
        s += int(rest[12])
    return u / CLK_TCK, s / CLK_TCK


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def rss_kib(pids: list[int]) -> tuple[int, int]:
    """(VmRSS, VmHWM) summed over pids, KiB."""
    rss = hwm = 0
    for p in pids:
        st = proc_status(p)
        rss += int(st.get("VmRSS", "0 kB").split()[0])
        hwm += int(st.get("VmHWM", "0 kB").split()[0])
    return rss, hwm


def ctx_switches(pids: list[int]) -> int:
    """Voluntary plus involuntary context switches of every thread of pids."""
    total = 0
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            total += int(line.split()[1])
            except OSError:
                pass
    return total


def pss_kib(pids: list[int]) -> int:
    """Proportional set size summed over pids (pages shared between an nginx master and its worker
    counted once), KiB; 0 where smaps_rollup is unavailable."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            return 0
    return total


def core_times() -> dict[int, tuple[int, int]]:
    """Per core: (busy ticks, total ticks) from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+)\s+(.*)", line)
            if not m:
                continue
            v = [int(x) for x in m.group(2).split()]
            user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
            busy = user + nice + system + irq + softirq + steal
            out[int(m.group(1))] = (busy, busy + idle + iowait)
    return out


def tcp_counters() -> dict[str, int]:
    """The machine's TCP counters (/proc/net/snmp). Everything the benchmark sends goes over
    loopback, so `OutSegs` counts each segment once."""
    out: dict[str, int] = {}
    lines = Path("/proc/net/snmp").read_text().splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        prefix, names = head.split(":", 1)
        if prefix == "Tcp":
            out.update(zip(names.split(), map(int, vals.split(":", 1)[1].split())))
    return out


def thread_ids(pids: list[int]) -> set[str]:
    """Every thread of the processes `pids` (perf attributes samples to threads)."""
    tids = {str(p) for p in pids}
    for p in pids:
        try:
            tids.update(os.listdir(f"/proc/{p}/task"))
        except FileNotFoundError:
            pass
    return tids


def children_of(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            if int(rest[1]) == pid:
                kids.append(int(d))
        except OSError:
            pass
    return sorted(kids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0, tls: bool = False) -> tuple[int, bytes]:
    """GET `path` from 127.0.0.1:`port`; `tls`: over TLS, the certificate not checked."""
    if tls:
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                        context=ssl._create_unverified_context())
    else:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_for(what: str, check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - anything means "not yet"
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s (last error: {last})")


# ------------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Starts processes pinned to cores, records their pids for run.sh's trap, stops them."""

    def __init__(self, work: Path, nice: int = 0):
        self.work = work
        self.nice = ["nice", "-n", str(nice)] if nice else []
        self.piddir = work / "pids"
        self.piddir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.extra: dict[str, list[int]] = {}

    def start(self, name: str, argv: list[str], cpu: str, env=None, stdout=None) -> subprocess.Popen:
        log_path = self.work / f"{name}.log"
        out = open(stdout or log_path, "ab")
        err = open(log_path, "ab") if stdout else None
        try:
            p = subprocess.Popen(
                ["taskset", "-c", cpu, *self.nice, *argv],
                stdout=out,
                stderr=err or subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            out.close()
            if err:
                err.close()
        self.procs[name] = p
        (self.piddir / f"{name}.pid").write_text(str(p.pid))
        return p

    def record_extra(self, name: str, pids: list[int]) -> None:
        """Processes forked by one we started (nginx workers): killed by the trap too."""
        self.extra[name] = pids
        for i, pid in enumerate(pids):
            (self.piddir / f"{name}-child{i}.pid").write_text(str(pid))

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in self.extra.pop(name, []):
            try:
                os.kill(pid, 0)
            except OSError:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for f in self.piddir.glob(f"{name}*.pid"):
            f.unlink(missing_ok=True)

    def stop_all(self) -> None:
        for name in list(self.procs)[::-1]:
            try:
                self.stop(name)
            except Exception as e:  # noqa: BLE001
                log(f"stopping {name}: {e}")


# ------------------------------------------------------------------------------------------------
# Configs

NGINX_TEMP = """
  client_body_temp_path {d}/{n}-tmp/body;
  proxy_temp_path {d}/{n}-tmp/proxy;
  fastcgi_temp_path {d}/{n}-tmp/fastcgi;
  uwsgi_temp_path {d}/{n}-tmp/uwsgi;
  scgi_temp_path {d}/{n}-tmp/scgi;
"""


def nginx_head(d: Path, name: str) -> str:
    # Workers of a root master run as "nobody", which cannot read the 0700 work dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    (d / f"{name}-tmp").mkdir(exist_ok=True)
    return (
        f"{user}worker_processes 1;\ndaemon off;\nmaster_process on;\npid {d}/{name}.pid;\n"
        f"error_log {d}/{name}.error.log warn;\nworker_rlimit_nofile 16384;\n"
        "events { worker_connections 8192; }\n"
    )


def backend_conf(d: Path, p1: int, p2: int) -> str:
    www = d / "www"
    www.mkdir(exist_ok=True)
    (www / "16k").write_bytes(bytes((i * 7 + 13) % 256 for i in range(BIG_SIZE)))
    return nginx_head(d, "backend") + f"""
http {{
  access_log off;
  {NGINX_TEMP.format(d=d, n="backend")}
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{p1} backlog=4096;
    listen 127.0.0.1:{p2} backlog=4096;
    location = / {{ default_type text/plain; return 200 "ok\\n"; }}
    location = /16k {{ root {www}; }}
    location = /-/healthz {{ default_type text/plain; return 200 "success"; }}
    location = /-/routes {{ default_type application/json; return 200 '{{"/": "bench"}}'; }}
  }}
}}
"""


def nginx_proxy_conf(d: Path, port: int, backend: int, name: str = "nginx") -> str:
    return nginx_head(d, name) + f"""
http {{
  access_log off;
  {NGINX_TEMP.format(d=d, n=name)}
  keepalive_timeout 75s;
  keepalive_requests 1000000;
  upstream backend {{
    server 127.0.0.1:{backend};
    keepalive 256;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"""


def haproxy_conf(port: int, backend: int, backend2: int | None = None, sock: Path | None = None) -> str:
    """HAProxy, one thread. With `backend2` (the churn comparison): servers `a` (weight 100) and `b`
    (weight 0) and an admin socket for `set weight`."""
    servers = (f"  server a 127.0.0.1:{backend} weight 100\n  server b 127.0.0.1:{backend2} weight 0\n"
               if backend2 else f"  server s1 127.0.0.1:{backend}\n")
    stats = f"  stats socket {sock} level admin\n" if sock else ""
    return f"""global
  nbthread 1
  maxconn 8000
{stats}
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  option http-keep-alive
  http-reuse always

frontend fe
  bind 127.0.0.1:{port}
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  default_backend be

backend be
{servers}"""


def rayshift_conf(d: Path, name: str, port: int, admin: int, backends: list[tuple[str, int, int]],
                  extra: str = "") -> str:
    lines = [
        f"listen: 127.0.0.1:{port}",
        "admin:",
        f"  listen: 127.0.0.1:{admin}",
        f"state_file: {d}/{name}-state.json",
        "shards: [shard-0]",
        "clusters:",
    ]
    for cname, bport, weight in backends:
        lines += [
            f"  - name: {cname}",
            "    shard: shard-0",
            "    revision: v1",
            f"    serve_url: http://127.0.0.1:{bport}",
            f"    weight: {weight}",
        ]
    lines += ["probe:", "  interval: 1s", "  timeout: 1s"]
    return "\n".join(lines) + "\n" + (extra.rstrip("\n") + "\n" if extra else "")


# ------------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.procs = Procs(self.work, args.nice)
        self.ports: dict[str, int] = {}
        self.pids: dict[str, list[int]] = {}  # processes whose CPU counts as the target's
        self.runs: list[dict] = []
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.results = Path(args.results)
        self.results.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.results / f"{self.stamp}.jsonl"
        self.info: dict = {}
        # rayshift serves its clients over TLS (h2_ab.py --tls sets it, with a `tls:` config extra).
        self.client_tls = False

    # --- setup -----------------------------------------------------------------------------------

    def start_nginx(self, name: str, conf: str) -> None:
        path = self.work / f"{name}.conf"
        path.write_text(conf)
        nginx = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "nginx"
        test = subprocess.run([nginx, "-t", "-q", "-p", str(self.work), "-e", str(self.work / f"{name}.error.log"),
                               "-c", str(path)], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"{name}: nginx -t failed:\n{test.stderr}")
        p = self.procs.start(name, [nginx, "-p", str(self.work), "-e", str(self.work / f"{name}.error.log"),
                                    "-c", str(path)], self.args.proxy_cpu)
        wait_for(f"{name} workers", lambda: len(children_of(p.pid)) >= 1)
        workers = children_of(p.pid)
        self.procs.record_extra(name, workers)
        self.pids[name] = [p.pid, *workers]

    def start_backend(self) -> None:
        p1, p2 = free_port(), free_port()
        self.ports["backend"], self.ports["backend2"] = p1, p2
        self.start_nginx("backend", backend_conf(self.work, p1, p2))
        self.ports["direct"] = p1
        # Only the worker serves requests; its CPU is reported as backend CPU/request.
        self.pids["backend"] = self.pids["backend"][1:]
        wait_for("backend", lambda: http_get(p1, "/") == (200, SMALL_BODY))

    def start_rayshift(self, name: str, backends: list[tuple[str, int, int]], binary: str | None = None,
                       state_dir: Path | None = None) -> None:
        """Starts rayshift as `name`; its state file goes into `state_dir` (default: the work dir)."""
        port, admin = free_port(), free_port()
        conf = self.work / f"{name}.yaml"
        conf.write_text(rayshift_conf(state_dir or self.work, name, port, admin, backends,
                                      self.args.rayshift_config_extra))
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        if self.args.rayshift_threads:
            # Not read by every rayshift version; taskset alone already gives tokio one worker.
            env["RAYSHIFT_WORKER_THREADS"] = str(self.args.rayshift_threads)
        out = self.work / f"{name}.stdout"
        p = self.procs.start(name, [binary or self.args.rayshift, "run", "--config", str(conf)],
                             self.args.rayshift_cpus or self.args.proxy_cpu, env=env, stdout=out)

        def listening():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.work / f'{name}.log').read_text()[-2000:]}")
            return "proxy listening on" in out.read_text()

        wait_for(f"{name} listener", listening)
        wait_for(f"{name} /ready", lambda: http_get(admin, "/ready")[0] == 200)
        wait_for(f"{name} route to backend", lambda: http_get(port, "/", tls=self.client_tls) == (200, SMALL_BODY))
        self.ports[name], self.ports[name + "-admin"] = port, admin
        self.pids[name] = [p.pid]

    def start_haproxy(self, name: str = "haproxy", churn: bool = False) -> None:
        port = free_port()
        path = self.work / f"{name}.cfg"
        if churn:
            sock = self.work / f"{name}.sock"
            path.write_text(haproxy_conf(port, self.ports["backend"], self.ports["backend2"], sock))
            self.haproxy_sock = sock
        else:
            path.write_text(haproxy_conf(port, self.ports["backend"]))
        haproxy = "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else "haproxy"
        test = subprocess.run([haproxy, "-c", "-q", "-f", str(path)], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"haproxy -c failed:\n{test.stdout}{test.stderr}")
        p = self.procs.start(name, [haproxy, "-db", "-f", str(path)], self.args.proxy_cpu)
        wait_for(name, lambda: http_get(port, "/") == (200, SMALL_BODY))
        self.ports[name] = port
        self.pids[name] = [p.pid]

    @staticmethod
    def floor_bin() -> str:
        floor = os.environ.get("BENCH_FLOOR_BIN") or str(REPO / "target" / "release" / "floor")
        if not os.access(floor, os.X_OK):
            raise RuntimeError(f"no floor relay at {floor}: run benches/load/run.sh, or cargo build --release -p floor")
        return floor

    def start_floor(self, name: str) -> None:
        """One of crates/floor's relays ($BENCH_FLOOR_BIN; run.sh builds it) in front of the backend."""
        port = free_port()
        p = self.procs.start(name, [self.floor_bin(), name.removeprefix("floor-"), str(port), str(self.ports["backend"])],
                             self.args.proxy_cpu)
        wait_for(name, lambda: p.poll() is None and http_get(port, "/") == (200, SMALL_BODY))
        self.ports[name] = port
        self.pids[name] = [p.pid]

    def setup(self) -> None:
        log(f"work dir {self.work}; load on cpu {self.args.load_cpu}, backend and proxy on cpu {self.args.proxy_cpu}")
        self.start_backend()
        for t in self.args.targets:
            if t == "rayshift":
                self.start_rayshift("rayshift", [("bench", self.ports["backend"], 100)])
            elif t == "rayshift-alt":
                self.start_rayshift("rayshift-alt", [("bench", self.ports["backend"], 100)], self.args.compare)
            elif t == "nginx":
                port = free_port()
                self.start_nginx("nginx", nginx_proxy_conf(self.work, port, self.ports["backend"]))
                self.ports["nginx"] = port
                wait_for("nginx proxy", lambda: http_get(port, "/") == (200, SMALL_BODY))
            elif t == "haproxy":
                self.start_haproxy()
            elif t in FLOORS:
                self.start_floor(t)
        for t in self.args.targets:
            status, body = http_get(self.ports[t], "/16k")
            if status != 200 or len(body) != BIG_SIZE:
                raise RuntimeError(f"{t}: GET /16k gave {status} with {len(body)} bytes")
        self.collect_info()

    def collect_info(self) -> None:
        def cmd(argv):
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                return (r.stdout + r.stderr).strip().splitlines()[0]
            except Exception as e:  # noqa: BLE001
                return f"? ({e})"

        cpu = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        rev = cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "Cargo.toml",
                                "Cargo.lock"], capture_output=True, text=True).stdout.strip()
        self.info = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "host": f"{platform.node()}, {os.cpu_count()} cores, {cpu}, Linux {platform.release()}",
            "rayshift": f"{self.args.rayshift}, built "
                        f"{dt.datetime.fromtimestamp(os.path.getmtime(self.args.rayshift)).isoformat(timespec='seconds')}"
                        f" (repo at {rev}{' with uncommitted changes to src' if dirty else ''})",
            "nginx": cmd(["/usr/sbin/nginx", "-v"]),
            "haproxy": cmd(["/usr/sbin/haproxy", "-v"]),
            "wrk": cmd(["wrk", "--version"]),
            "cores": f"wrk on cpu {self.args.load_cpu}; backend and proxy on cpu {self.args.proxy_cpu}",
            "runs": f"{self.args.duration}s per run, {self.args.rounds} round(s), scenarios {', '.join(self.args.scenarios)}",
        }
        if "rayshift" in self.pids:
            st = proc_status(self.pids["rayshift"][0])
            self.info["rayshift threads"] = st.get("Threads", "?")
        if self.args.compare:
            self.info["rayshift-alt"] = (f"{self.args.compare}, built "
                                         f"{dt.datetime.fromtimestamp(os.path.getmtime(self.args.compare)).isoformat(timespec='seconds')}"
                                         f", {proc_status(self.pids['rayshift-alt'][0]).get('Threads', '?')} threads")

    # --- one wrk run -----------------------------------------------------------------------------

    def wrk(self, port: int, path: str, conns: int, duration: float, close: bool = False) -> tuple[dict, float]:
        argv = ["taskset", "-c", self.args.load_cpu, *self.procs.nice, "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s",
                "--timeout", "5s", "--latency", *(["-H", "Connection: close"] if close else []),
                "-s", str(LUA), f"http://127.0.0.1:{port}{path}"]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        (self.procs.piddir / "wrk.pid").write_text(str(p.pid))
        out = p.stdout.read().decode(errors="replace")
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        (self.procs.piddir / "wrk.pid").unlink(missing_ok=True)
        m = re.search(r"^WRKJSON (.*)$", out, re.M)
        if p.returncode != 0 or not m:
            raise RuntimeError(f"wrk failed ({p.returncode}):\n{out}")
        return json.loads(m.group(1)), ru.ru_utime + ru.ru_stime

    def measure(self, target: str, scenario: str, round_no: int, duration: float, label: str | None = None,
                record: bool = True, port: int | None = None) -> dict:
        """One wrk run; with --retry-foreign, re-run (up to twice) while other processes took more
        than that share of the proxy core, keeping the least disturbed run."""
        best = None
        for attempt in range(3 if self.args.retry_foreign else 1):
            r = self.measure_once(target, scenario, round_no, duration, label, port)
            r["attempt"] = attempt + 1
            if best is None or r["proxy_core_foreign_pct"] < best["proxy_core_foreign_pct"]:
                best = r
            if not self.args.retry_foreign or r["proxy_core_foreign_pct"] <= self.args.retry_foreign:
                break
            log(f"  other processes took {r['proxy_core_foreign_pct']:.0f}% of the proxy core: running again")
        if record:
            self.runs.append(best)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(best) + "\n")
        return best

    def measure_once(self, target: str, scenario: str, round_no: int, duration: float, label: str | None,
                     port: int | None) -> dict:
        path, conns = SCENARIOS[scenario]
        pids = self.pids.get(target.split("+")[0], []) if target != "direct" else []
        bpids = self.pids["backend"]
        lc, pc = int(self.args.load_cpu), int(self.args.proxy_cpu)
        x0, us0, bx0 = ctx_switches(pids), user_system_seconds(pids), ctx_switches(bpids)
        n0 = tcp_counters()
        k0, c0, b0, t0 = core_times(), cpu_seconds(pids), cpu_seconds(bpids), time.monotonic()
        w, wrk_cpu = self.wrk(port or self.ports[target], path, conns, duration, scenario in CLOSE_SCENARIOS)
        k1, c1, b1, t1 = core_times(), cpu_seconds(pids), cpu_seconds(bpids), time.monotonic()
        n1 = tcp_counters()
        x1, us1, bx1 = ctx_switches(pids), user_system_seconds(pids), ctx_switches(bpids)
        reqs = max(w["requests"], 1)
        secs = w["duration_us"] / 1e6
        proxy_cpu, backend_cpu = c1 - c0, b1 - b0
        busy_p = (k1[pc][0] - k0[pc][0]) / CLK_TCK
        total_p = max((k1[pc][1] - k0[pc][1]) / CLK_TCK, 1e-9)
        busy_l = (k1[lc][0] - k0[lc][0]) / CLK_TCK
        total_l = max((k1[lc][1] - k0[lc][1]) / CLK_TCK, 1e-9)
        r = {
            "round": round_no,
            "scenario": scenario,
            "target": label or target,
            "conns": conns,
            "path": path,
            "rps": w["requests"] / secs,
            "requests": w["requests"],
            "p50_us": w["lat_p50_us"],
            "p99_us": w["lat_p99_us"],
            "max_us": w["lat_max_us"],
            "errors": w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"],
            "non2xx": w["err_status"],
            "cpu_us": proxy_cpu * 1e6 / reqs if pids else None,
            "backend_cpu_us": backend_cpu * 1e6 / reqs,
            "ctxsw_per_req": (x1 - x0) / reqs if pids else None,
            # On the shared core the proxy and the backend hand it to each other, so the backend's
            # switches follow the proxy's (equal in the runs of BENCHMARKS.md).
            "backend_ctxsw_per_req": (bx1 - bx0) / reqs,
            "cpu_user_us": (us1[0] - us0[0]) * 1e6 / reqs if pids else None,
            "cpu_sys_us": (us1[1] - us0[1]) * 1e6 / reqs if pids else None,
            "wrk_cpu_pct": 100 * wrk_cpu / (t1 - t0),
            # Loopback TCP segments per request (all sockets of the machine): a proxy's floor is 4
            # (request in and out, response in and out); anything above it is ACKs or split writes.
            "segs_per_req": (n1["OutSegs"] - n0["OutSegs"]) / reqs,
            "load_core_busy_pct": 100 * busy_l / total_l,
            "proxy_core_busy_pct": 100 * busy_p / total_p,
            # CPU time on the proxy core not used by the proxy or the backend: other machine load.
            "proxy_core_foreign_pct": max(0.0, 100 * (busy_p - proxy_cpu - backend_cpu) / total_p),
        }
        log(f"round {round_no} {scenario:9} {r['target']:14} {fmt_rps(r['rps']):>7} req/s  "
            f"p50/p99 {r['p50_us']}/{r['p99_us']} us  cpu/req {fmt_us(r['cpu_us'])}  "
            f"backend {fmt_us(r['backend_cpu_us'])}  err {r['errors']}+{r['non2xx']}  "
            f"foreign {r['proxy_core_foreign_pct']:.0f}%  TCP segments/req {r['segs_per_req']:.2f}")
        return r

    # --- phases ----------------------------------------------------------------------------------

    def warmup(self) -> None:
        for t in self.args.targets:
            for sc in ("small-c64", "16k-c64"):
                self.measure_once(t, sc, 0, self.args.warmup, None, None)

    def rounds(self) -> None:
        targets = self.args.targets
        for rnd in range(1, self.args.rounds + 1):
            k = (rnd - 1) % len(targets)
            order = targets[k:] + targets[:k]
            log(f"round {rnd}/{self.args.rounds}: order {', '.join(order)}")
            for sc in self.args.scenarios:
                for t in order:
                    self.measure(t, sc, rnd, self.args.duration)

    def start_churn_gateway(self, name: str = "rayshift-churn", state_dir: Path | None = None) -> None:
        """A rayshift with two clusters in shard-0 (the backend's two ports), all weight on `a`."""
        self.start_rayshift(name, [("a", self.ports["backend"], 100), ("b", self.ports["backend2"], 0)],
                            state_dir=state_dir)

    def churn_run(self, rnd: int, duration: float, label: str = "rayshift churn", pattern: str = "flip",
                  target: str = "rayshift-churn") -> dict:
        """One 64-connection run through `target` (a churn gateway) while the churner swaps weights.

        pattern "flip": 100/0 and 0/100 alternate, so every swap moves all traffic to the other
        cluster (and its set of upstream connections); "same": every PUT sets 100/0 again, so every
        swap rebuilds, persists and publishes the table while the traffic stays where it is."""
        admin = self.ports[f"{target}-admin"]
        m0 = scrape_requests(admin)
        t0 = scrape_counter(admin, "rayshift_routing_table_updates_total")
        c0 = scrape_counter(admin, "rayshift_upstream_connections_opened_total")
        r = self.run_with_churner(["--admin", str(admin), "--pattern", pattern], target, rnd, duration, label)
        m1 = scrape_requests(admin)
        d = {k: m1.get(k, 0) - m0.get(k, 0) for k in set(m0) | set(m1)}
        r.update({
            "pattern": pattern,
            # Routing tables published during the run: proves every accepted PUT swapped the table.
            "table_swaps": scrape_counter(admin, "rayshift_routing_table_updates_total") - t0,
            # Upstream connections opened during the run: a swap should move requests between
            # pooled connections, not open new ones.
            "upstream_opened": scrape_counter(admin, "rayshift_upstream_connections_opened_total") - c0,
            # About 50% (pattern flip) proves that the swaps took effect on the request path.
            "share_b_pct": 100 * d.get("b", 0) / (sum(d.values()) or 1),
            "non2xx_by_cluster": {k: v for k, v in d.items() if k not in ("a", "b")},
        })
        log(f"  churn: tables published {r['table_swaps']:.0f}; share to b {r['share_b_pct']:.0f}%; "
            f"upstream connections opened {r['upstream_opened']:.0f}")
        return r

    def run_alongside(self, name: str, argv: list[str], cpu: str, target: str, rnd: int, duration: float,
                      label: str) -> tuple[dict, dict]:
        """One 64-connection run through `target` while the helper `argv` runs on `cpu`: it
        prints "<NAME> started" when it is going and "<NAME>JSON {...}" after SIGTERM. Returns the
        run's figures and the helper's JSON."""
        out = self.work / f"{name}.out"
        tag = name.upper()
        p = self.procs.start(name, argv, cpu, stdout=out)
        try:
            wait_for(name, lambda: f"{tag} started" in out.read_text())
            time.sleep(0.2)
            # No --retry-foreign here: the helper's counts cover exactly this one run.
            r = self.measure_once(target, "small-c64", rnd, duration, label, None)
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=15)
        finally:
            self.procs.stop(name)
        stats = json.loads(re.findall(rf"^{tag}JSON (.*)$", out.read_text(), re.M)[-1])
        out.unlink()
        return r, stats

    def run_with_churner(self, churner_args: list[str], target: str, rnd: int, duration: float, label: str) -> dict:
        """One 64-connection run through `target` while the churner (`churner_args` added) swaps
        weights --churn-rate times a second; the run's figures plus the churner's."""
        r, stats = self.run_alongside("churn", self.churner_argv(*churner_args), self.args.load_cpu, target, rnd,
                                      duration, label)
        r.update({
            "swaps_ok": stats["ok"], "swaps_failed": stats["failed"], "swaps_per_s": stats["rate"],
            "swaps_total": stats["ok"] + stats["failed"],
            "put_p50_ms": stats["p50_ms"], "put_p99_ms": stats["p99_ms"], "put_max_ms": stats["max_ms"],
            "put_errors": stats["errors"], "churner_cpu_us": stats.get("cpu_us_per_change"),
        })
        log(f"  churn: {stats['ok']} swaps ok, {stats['failed']} failed, {stats['rate']:.1f}/s, "
            f"p50/p99 {stats['p50_ms']:.1f}/{stats['p99_ms']:.1f} ms, churner {stats.get('cpu_us_per_change') or 0:.0f} us "
            f"of CPU per swap"
            + (f"; errors {stats['errors']}" if stats["errors"] else ""))
        return r

    def start_spinner(self) -> None:
        """Keeps the proxy core busy at the lowest priority (SCHED_IDLE) until `procs.stop("spinner")`.

        On this kind of VM a thread woken on an idle core is charged the wake-up from halt, tens of
        microseconds per wake-up that a core busy with client load does not pay; any other thread
        on the core runs before the spinner."""
        self.procs.start("spinner", ["chrt", "-i", "0", sys.executable, "-c", "while True: pass"],
                         self.args.proxy_cpu)
        time.sleep(0.5)

    def churner_argv(self, *args: str) -> list[str]:
        """The churner (crates/churn, $BENCH_CHURN_BIN; run.sh builds it) at --churn-rate
        between clusters a and b, with `args` added."""
        churner = os.environ.get("BENCH_CHURN_BIN") or str(Path(__file__).resolve().parents[2] / "target" / "release"
                                                           / "churn")
        if not os.access(churner, os.X_OK):
            raise RuntimeError(f"no churner at {churner}: run benches/load/run.sh, or cargo build --release -p churn")
        return [churner, "--rate", str(self.args.churn_rate), "--clusters", "a,b", *args]

    def swap_cost(self, target: str, churner_args: list[str], label: str, duration: float) -> dict:
        """What a swap costs the proxy: the churner alone against `target` for `duration` seconds,
        and as long without it (the baseline: probes, timers), the time the proxy's threads ran
        (nanoseconds) taken per swap, the proxy core kept busy meanwhile as client load keeps it
        (`start_spinner`). Under
        load the same work takes that share of the core from requests: the loss a swap itself
        costs, without the churn run's round-to-round scatter and without the flip's move of all
        traffic to the other cluster's connections."""
        pids = self.pids[target]

        def window(seconds):
            a, t0 = run_seconds(pids), time.monotonic()
            time.sleep(seconds)
            return (run_seconds(pids) - a) / (time.monotonic() - t0)

        out = self.work / "swapcost.out"
        self.start_spinner()
        try:
            idle = window(duration)
            argv = self.churner_argv(*churner_args)
            p = self.procs.start("swapcost", argv, self.args.load_cpu, stdout=out)
            wait_for("churner", lambda: "CHURN started" in out.read_text())
            time.sleep(0.5)
            busy = window(duration)
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=15)
        finally:
            self.procs.stop("swapcost")
            self.procs.stop("spinner")
        stats = json.loads(re.findall(r"^CHURNJSON (.*)$", out.read_text(), re.M)[-1])
        out.unlink()
        rate = max(stats["rate"], 1e-9)
        r = {
            "round": 0, "scenario": "swap-cost", "target": label, "swaps_per_s": stats["rate"],
            "swaps_failed": stats["failed"], "put_p50_ms": stats["p50_ms"], "put_p99_ms": stats["p99_ms"],
            "proxy_us_per_swap": 1e6 * (busy - idle) / rate,
            "core_share_pct": 100 * (busy - idle),
        }
        log(f"  swap cost {label}: {stats['rate']:.1f} swaps/s, {r['proxy_us_per_swap']:.0f} us of the proxy "
            f"per swap ({r['core_share_pct']:.2f}% of the core)")
        self.runs.append(r)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(r) + "\n")
        return r

    def churn_interleaved(self, target: str, churner_args: list[str], label: str, count,
                          window: float = 2.0) -> dict:
        """One continuous 64-connection load through `target` while the churner is switched
        on and off every `window` seconds (`windows` of each, starting and ending steady): each
        churn window is compared with the mean of the steady windows on either side, so the
        machine's drift, which moves whole rounds by tens of percent here, cancels. Per window:
        requests from the proxy's own counters (`count()`), CPU from its threads' run time, and
        the backend's (which shares the proxy's core: what a swap costs it comes off the
        throughput too)."""
        pids = self.pids[target]
        backend = self.pids["backend"]
        # The drift-cancelled figure needs the target alone with the backend on one core.
        alone = self.args.proxy_cpu.isdigit() and (target.startswith("haproxy")
                                                   or self.args.rayshift_cpus in (None, self.args.proxy_cpu))
        core = int(self.args.proxy_cpu) if alone else None
        windows = self.args.churn_windows or (4 if self.args.quick else 16)
        out = self.work / "interleaved.out"
        churner = self.procs.start("churn", self.churner_argv(*churner_args, "--paused"), self.args.load_cpu,
                                   stdout=out)
        # Margin for the scrapes between windows; the last window must end before the load does.
        total = (2 * windows + 1) * window + 6
        load = None
        try:
            wait_for("churner", lambda: "CHURN started" in out.read_text())
            load = subprocess.Popen(["taskset", "-c", self.args.load_cpu, "wrk", "-t1", "-c64", f"-d{round(total)}s",
                                     "--timeout", "5s", "-s", str(LUA), f"http://127.0.0.1:{self.ports[target]}/"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            (self.procs.piddir / "wrk.pid").write_text(str(load.pid))
            load_end = time.monotonic() + total
            time.sleep(1)

            def sample():
                busy = core_busy_seconds(core) if core is not None else 0.0
                return count(), run_seconds(pids), time.monotonic(), run_seconds(backend), busy

            samples = [sample()]
            deadline = samples[0][2]
            for i in range(2 * windows + 1):
                churner.send_signal(signal.SIGUSR1 if i % 2 else signal.SIGUSR2)
                deadline += window
                time.sleep(max(0.0, deadline - time.monotonic()))
                samples.append(sample())
            churner.send_signal(signal.SIGUSR2)
            if samples[-1][2] > load_end - 1:
                raise RuntimeError("the interleaved windows outlasted the load")
            wrk_out, _ = load.communicate(timeout=total + 15)
            m = re.search(r"^WRKJSON (.*)$", wrk_out, re.M)
            if load.returncode != 0 or not m:
                raise RuntimeError(f"wrk failed ({load.returncode}):\n{wrk_out}")
            load = None
            (self.procs.piddir / "wrk.pid").unlink(missing_ok=True)
            w = json.loads(m.group(1))
            churner.send_signal(signal.SIGTERM)
            churner.wait(timeout=15)
        finally:
            if load is not None:
                load.kill()
                load.wait()
            self.procs.stop("churn")
        stats = json.loads(re.findall(r"^CHURNJSON (.*)$", out.read_text(), re.M)[-1])
        out.unlink()
        rps = [(b[0] - a[0]) / (b[2] - a[2]) for a, b in zip(samples, samples[1:])]
        cpu = [(b[1] - a[1]) * 1e6 / max(b[0] - a[0], 1) for a, b in zip(samples, samples[1:])]
        d_rps = [rps[i] / ((rps[i - 1] + rps[i + 1]) / 2) - 1 for i in range(1, len(rps) - 1, 2)]
        d_cpu = [cpu[i] / ((cpu[i - 1] + cpu[i + 1]) / 2) - 1 for i in range(1, len(cpu) - 1, 2)]
        bcpu = [(b[3] - a[3]) * 1e6 / max(b[0] - a[0], 1) for a, b in zip(samples, samples[1:])]
        d_bcpu = [bcpu[i] / ((bcpu[i - 1] + bcpu[i + 1]) / 2) - 1 for i in range(1, len(bcpu) - 1, 2)]
        # Everything the shared core did per request (the proxy, the backend, interrupts, kernel
        # threads such as the disk's), in units of the backend's CPU per request in the same
        # window: the machine's drift moves both alike and cancels, as in the 3 B ratios. With the
        # core saturated, throughput goes as 1 / work per request, so a churn window's change
        # against its neighbours is the throughput change the swaps cause, drift taken out (it
        # assumes the backend's own work per request unchanged, which backend_cpu_change checks).
        drift_cancelled = {}
        if core is not None:
            work = [(b[4] - a[4]) / max(b[3] - a[3], 1e-9) for a, b in zip(samples, samples[1:])]
            d_work = [((work[i - 1] + work[i + 1]) / 2) / work[i] - 1 for i in range(1, len(work) - 1, 2)]
            other = [((b[4] - a[4]) - (b[1] - a[1]) - (b[3] - a[3])) * 1e6 / max(b[0] - a[0], 1)
                     for a, b in zip(samples, samples[1:])]
            busy = [(b[4] - a[4]) / (b[2] - a[2]) for a, b in zip(samples, samples[1:])]
            drift_cancelled = {
                "implied_change": statistics.median(d_work), "implied_changes": d_work, "work_per_window": work,
                "steady_other_us": statistics.median(other[0::2]), "churn_other_us": statistics.median(other[1::2]),
                "core_busy_pct": 100 * min(busy),
            }
        r = {
            "round": 0, "scenario": "churn-interleaved", "target": label, "windows": windows, "window_s": window,
            "steady_rps": statistics.median(rps[0::2]), "churn_rps": statistics.median(rps[1::2]),
            "rps_change": statistics.median(d_rps), "cpu_change": statistics.median(d_cpu),
            "backend_cpu_change": statistics.median(d_bcpu),
            **drift_cancelled,
            "rps_changes": d_rps, "rps_per_window": rps, "swaps_ok": stats["ok"], "swaps_failed": stats["failed"],
            "failed": w["err_connect"] + w["err_read"] + w["err_write"] + w["err_timeout"] + w["err_status"],
            "steady_cpu_us": statistics.median(cpu[0::2]), "churn_cpu_us": statistics.median(cpu[1::2]),
            # Taken from wrk's core while the churner runs (it sleeps while paused).
            "churner_cpu_us": stats.get("cpu_us_per_change"), "swap_errors": stats["errors"],
        }
        log(f"  interleaved {label}: req/s {100 * r['rps_change']:+.1f}%, CPU/request {100 * r['cpu_change']:+.1f}%, "
            f"backend CPU/request {100 * r['backend_cpu_change']:+.1f}%"
            + (f", drift-cancelled {100 * r['implied_change']:+.1f}% (the core's other work "
               f"{r['steady_other_us']:.2f} -> {r['churn_other_us']:.2f} us/request; busy >= "
               f"{r['core_busy_pct']:.0f}%)" if drift_cancelled else "") + " "
            f"(median of {windows} churn windows against their neighbours; {stats['ok']} swaps, "
            f"{stats['failed']} failed; {r['failed']} failed requests; the churner's own CPU "
            f"{r['churner_cpu_us'] or 0:.0f} us per swap)" + (f"; swap errors {stats['errors']}" if stats["errors"] else ""))
        self.runs.append(r)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(r) + "\n")
        return r

    def churn_null(self, count) -> None:
        """The control for the interleaved runs: the same windows through the churn gateway, the
        churner switched on and off as there, but its weight changes go to another gateway (the
        sink) on wrk's core, so the proxy core is left alone. What this run reports is what the
        method reads when the swaps cost nothing: the machine's scatter, and whatever the
        churner itself takes from wrk's core."""
        cpus = self.args.rayshift_cpus
        self.args.rayshift_cpus = self.args.load_cpu
        try:
            self.start_churn_gateway("sink")
        finally:
            self.args.rayshift_cpus = cpus
        try:
            self.churn_interleaved("rayshift-churn", ["--admin", str(self.ports["sink-admin"]), "--pattern", "flip"],
                                   NULL_CHURN, count)
        finally:
            self.procs.stop("sink")
            del self.pids["sink"]

    def churn(self) -> None:
        self.start_churn_gateway()
        self.measure_once("rayshift-churn", "small-c64", 0, self.args.warmup or 1, None, None)
        admin = str(self.ports["rayshift-churn-admin"])
        for pattern, label in (("flip", "rayshift flip"), ("same", "rayshift same split")):
            self.swap_cost("rayshift-churn", ["--admin", admin, "--pattern", pattern], label, self.args.duration)
        count = lambda: sum(scrape_requests(int(admin)).values())  # noqa: E731
        self.churn_null(count)
        for pattern, label in (("flip", "rayshift flip"), ("same", "rayshift same split")):
            self.churn_interleaved("rayshift-churn", ["--admin", admin, "--pattern", pattern], label, count)
        kinds = ["steady", "flip", "same"]
        for rnd in range(1, self.args.rounds + 1):
            # Rotate the order, so drift hits every kind alike.
            order = kinds[rnd % 3:] + kinds[:rnd % 3]
            for kind in order:
                if kind == "steady":
                    self.measure("rayshift-churn", "small-c64", rnd, self.args.duration, label="rayshift steady")
                    continue
                label = "rayshift churn" if kind == "flip" else "rayshift churn same-split"
                r = self.churn_run(rnd, self.args.duration, label, kind)
                self.runs.append(r)
                with open(self.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
        self.procs.stop("rayshift-churn")
        del self.pids["rayshift-churn"]
        if "haproxy" in self.args.targets:
            self.haproxy_churn()

    def haproxy_churn(self) -> None:
        """The flip pattern through HAProxy: `set weight` on its admin socket (not persisted)."""
        self.start_haproxy("haproxy-churn", churn=True)
        self.measure_once("haproxy-churn", "small-c64", 0, self.args.warmup or 1, None, None)
        self.swap_cost("haproxy-churn", ["--haproxy-socket", str(self.haproxy_sock), "--pattern", "flip"],
                       "haproxy flip", self.args.duration)
        self.churn_interleaved("haproxy-churn", ["--haproxy-socket", str(self.haproxy_sock), "--pattern", "flip"],
                               "haproxy flip", lambda: haproxy_requests(self.haproxy_sock))
        for rnd in range(1, self.args.rounds + 1):
            for kind in (["steady", "flip"] if rnd % 2 else ["flip", "steady"]):
                if kind == "steady":
                    self.measure("haproxy-churn", "small-c64", rnd, self.args.duration, label="haproxy steady")
                    continue
                s0 = haproxy_server_totals(self.haproxy_sock)
                r = self.run_with_churner(["--haproxy-socket", str(self.haproxy_sock), "--pattern", "flip"],
                                          "haproxy-churn", rnd, self.args.duration, "haproxy churn")
                s1 = haproxy_server_totals(self.haproxy_sock)
                d = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1}
                r.update({"pattern": "flip", "table_swaps": r["swaps_ok"],
                          "share_b_pct": 100 * d.get("b", 0) / (sum(d.values()) or 1)})
                log(f"  haproxy churn: share to b {r['share_b_pct']:.0f}%")
                self.runs.append(r)
                with open(self.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
        self.procs.stop("haproxy-churn")
        del self.pids["haproxy-churn"]

    def rss(self) -> None:
        for t in [t for t in self.args.targets if t in PROXIES]:
            pids = self.pids[t]
            before, _ = rss_kib(pids)
            out = self.work / "idle.out"
            argv = [sys.executable, str(Path(__file__)), "idle", "--port", str(self.ports[t]),
                    "-n", str(self.args.idle_conns)]
            h = self.procs.start("idle", argv, self.args.load_cpu, stdout=out)
            wait_for("idle connections", lambda: "IDLEJSON" in out.read_text() or h.poll() is not None, timeout=60)
            opened = json.loads(re.findall(r"^IDLEJSON (.*)$", out.read_text(), re.M)[0])
            time.sleep(1.0)
            after, hwm = rss_kib(pids)
            pss = pss_kib(pids)
            threads = sum(int(proc_status(p).get("Threads", "0")) for p in pids)
            h.send_signal(signal.SIGTERM)
            h.wait(timeout=15)
            self.procs.stop("idle")
            res = re.findall(r"^IDLEJSON (.*)$", out.read_text(), re.M)
            still = json.loads(res[-1]).get("still_open") if len(res) > 1 else None
            out.unlink()
            r = {"round": 0, "scenario": "rss", "target": t, "rss_before_kib": before, "rss_idle_conns_kib": after,
                 "hwm_kib": hwm, "pss_kib": pss, "conns_ok": opened["ok"], "conns_still_open": still, "processes": len(pids),
                 "threads": threads}
            self.runs.append(r)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")
            log(f"rss {t}: {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB with {opened['ok']} idle conns "
                f"({still} still open at the end), peak {hwm / 1024:.1f} MiB, {threads} threads")

    def syscalls(self) -> None:
        """Counts the proxies' system calls and context switches per request (perf stat on syscall
        tracepoints: a diagnostic run, not a measured one, since tracing slows every syscall)."""
        events = ["raw_syscalls:sys_enter", "context-switches"] + [f"syscalls:sys_enter_{n}" for n in SYSCALLS]
        for t in [t for t in self.args.targets if t in PROXIES]:
            for sc in ("small-c64", "16k-c64"):
                out = self.work / "perfstat.csv"
                st = subprocess.Popen(["taskset", "-c", self.args.load_cpu, "perf", "stat", "-x", ",", "-e",
                                       ",".join(events), "-p", ",".join(map(str, self.pids[t])), "-o", str(out)],
                                      stdout=subprocess.DEVNULL, stderr=open(self.work / "perf.log", "ab"))
                (self.procs.piddir / "perfstat.pid").write_text(str(st.pid))
                time.sleep(0.5)
                try:
                    r = self.measure_once(t, sc, 0, self.args.duration, f"{t} (syscalls)", None)
                finally:
                    st.send_signal(signal.SIGINT)
                    st.wait(timeout=30)
                    (self.procs.piddir / "perfstat.pid").unlink(missing_ok=True)
                counts = {}
                for line in out.read_text().splitlines():
                    f = line.split(",")
                    if len(f) > 2 and f[0].replace(".", "").isdigit():
                        counts[f[2].replace("syscalls:sys_enter_", "")] = float(f[0])
                out.unlink()
                per = {k: v / max(r["requests"], 1) for k, v in counts.items()}
                row = {"round": 0, "scenario": "syscalls", "target": t, "body": sc, "per_request": per,
                       "requests": r["requests"], "cpu_us": r["cpu_us"]}
                self.runs.append(row)
                with open(self.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"syscalls {t} {sc}: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items() if v >= 0.01))

    def perf(self) -> None:
        """Profiles rayshift with perf (software cpu-clock) during one run (or one churn run)."""
        churn = self.args.perf_scenario == "churn"
        out = self.results / f"{self.stamp}-perf{'-churn' if churn else ''}"
        data = Path(f"{out}.data")  # kept (results/ is not committed) for further perf report queries
        if churn:
            self.start_churn_gateway()
        pid = self.pids["rayshift-churn" if churn else "rayshift"][0]
        rec = subprocess.Popen(["taskset", "-c", self.args.load_cpu, "perf", "record", "-e", "cpu-clock",
                                "-F", "1999", "--call-graph", self.args.perf_callgraph, "-p", str(pid), "-o", str(data)],
                               stdout=subprocess.DEVNULL, stderr=open(self.work / "perf.log", "ab"))
        (self.procs.piddir / "perf.pid").write_text(str(rec.pid))
        time.sleep(0.5)
        try:
            if churn:
                self.churn_run(0, self.args.perf, "rayshift churn (perf)")
            else:
                self.measure_once("rayshift", self.args.perf_scenario, 0, self.args.perf, "rayshift (perf)", None)
        finally:
            rec.send_signal(signal.SIGINT)
            rec.wait(timeout=120)
            (self.procs.piddir / "perf.pid").unlink(missing_ok=True)
            if churn:
                self.procs.stop("rayshift-churn")
        report = ["perf", "report", "-i", str(data), "--stdio"]
        sections = [
            ("time by binary (dso)", ["--no-children", "--sort", "dso", "-g", "none"]),
            ("self time by symbol", ["--no-children", "--sort", "dso,symbol", "-g", "none", "--percent-limit", "0.25"]),
            ("inclusive time by symbol (children)", ["--children", "--sort", "symbol", "-g", "none",
                                                     "--percent-limit", "0.2"]),
        ]
        flat = subprocess.run(report + ["--no-children", "--sort", "dso,symbol", "-g", "none", "--percent-limit", "0"],
                              capture_output=True, text=True).stdout
        with open(f"{out}.txt", "w") as f:
            f.write(classify_profile(flat))
            f.write(f"perf record -e cpu-clock -F 1999 --call-graph {self.args.perf_callgraph} on rayshift, "
                    f"{self.args.perf_scenario}, {self.args.perf} s\n")
            for title, opts in sections:
                f.write(f"\n===== {title} =====\n")
                f.flush()
                subprocess.run(report + opts, stdout=f, stderr=subprocess.DEVNULL)
        log(f"perf report: {out}.txt (data: {data})")

    def kprofile(self) -> None:
        """Where each proxy's CPU goes, per request: perf samples the whole proxy core (cpu-clock, no
        call graphs) during one 64-connection small-body run per proxy, and the samples of the
        proxy's processes are split into user space and kernel, and by kernel function. The same
        kernel work (TCP over loopback, waking the other side, system call entry) is what every proxy
        pays; the table shows how close each proxy is to it."""
        freq = 4999
        for t in [t for t in self.args.targets if t in PROXIES]:
            data = self.results / f"{self.stamp}-kprofile-{t}.data"
            rec = subprocess.Popen(["taskset", "-c", self.args.load_cpu, "perf", "record", "-C", self.args.proxy_cpu,
                                    "-e", "cpu-clock", "-F", str(freq), "-o", str(data)],
                                   stdout=subprocess.DEVNULL, stderr=open(self.work / "perf.log", "ab"))
            (self.procs.piddir / "perf.pid").write_text(str(rec.pid))
            time.sleep(0.5)
            # perf's "pid" is the thread id: sample every thread of the proxy and the backend.
            mine, backend = thread_ids(self.pids[t]), thread_ids(self.pids["backend"])
            try:
                r = self.measure_once(t, "small-c64", 0, self.args.kprofile, f"{t} (kprofile)", None)
            finally:
                rec.send_signal(signal.SIGINT)
                rec.wait(timeout=120)
                (self.procs.piddir / "perf.pid").unlink(missing_ok=True)
            if rec.returncode not in (0, -signal.SIGINT, 130) or not data.exists():
                raise RuntimeError(f"kprofile {t}: perf record failed ({rec.returncode}); see {self.work / 'perf.log'}")
            flat = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "pid,sym",
                                   "-F", "sample,pid,sym"], capture_output=True, text=True).stdout
            per_req = 1e6 / freq / max(r["requests"], 1)
            user = kernel = backend_us = 0.0
            ksyms: dict[str, float] = {}
            for line in flat.splitlines():
                mm = re.match(r"\s*(\d+)\s+(\d+):\S*\s+\[(.)\]\s+(\S+)", line)
                if not mm:
                    continue
                us, pid, kind, sym = int(mm.group(1)) * per_req, mm.group(2), mm.group(3), mm.group(4)
                if pid in backend:
                    backend_us += us
                elif pid in mine and kind == "k":
                    kernel += us
                    ksyms[sym] = ksyms.get(sym, 0.0) + us
                elif pid in mine:
                    user += us
            if user + kernel == 0:
                raise RuntimeError(f"kprofile {t}: no samples of the proxy's threads {sorted(mine)} in {data}")
            top = sorted(ksyms.items(), key=lambda kv: -kv[1])[:8]
            row = {"round": 0, "scenario": "kprofile", "target": t, "requests": r["requests"], "rps": r["rps"],
                   "user_us": user, "kernel_us": kernel, "backend_us": backend_us, "top_kernel": top,
                   "segs_per_req": r["segs_per_req"], "data": str(data)}
            self.runs.append(row)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"kprofile {t}: user {user:.2f} us, kernel {kernel:.2f} us per request (backend {backend_us:.2f} us); "
                f"top kernel: " + ", ".join(f"{k} {v:.2f}" for k, v in top[:4]))

    def callgrind(self) -> None:
        """Instructions per request (user space) of each proxy under valgrind's callgrind: exact and
        repeatable where timings are not. A second instance of each proxy runs under valgrind, in
        front of the same backend; counters are zeroed after a warm-up, so start-up is not counted."""
        backend = self.ports["backend"]
        # floor-uring is left out: valgrind does not see its io_uring loop through reliably, and its
        # work is the kernel's, which callgrind does not count.
        for t in [t for t in self.args.targets if t in PROXIES or t in ("floor-epoll", "floor-tokio")]:
            name, port = f"callgrind-{t}", free_port()
            out = self.results / f"{self.stamp}-{name}.out"
            env = None
            if t.startswith("rayshift"):
                admin = free_port()
                conf = self.work / f"{name}.yaml"
                conf.write_text(rayshift_conf(self.work, name, port, admin, [("bench", backend, 100)],
                                              self.args.rayshift_config_extra))
                binary = self.args.compare if t == "rayshift-alt" else self.args.rayshift
                argv = [binary, "run", "--config", str(conf)]
                env = dict(os.environ, RUST_LOG="warn")
                if self.args.rayshift_threads:
                    env["RAYSHIFT_WORKER_THREADS"] = str(self.args.rayshift_threads)
            elif t in FLOORS:
                argv = [self.floor_bin(), t.removeprefix("floor-"), str(port), str(backend)]
            elif t == "nginx":
                conf = self.work / f"{name}.conf"
                # One process: the worker's instructions are the ones counted.
                conf.write_text(nginx_proxy_conf(self.work, port, backend, name)
                                .replace("master_process on;", "master_process off;"))
                nginx = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "nginx"
                argv = [nginx, "-p", str(self.work), "-e", str(self.work / f"{name}.error.log"), "-c", str(conf)]
            else:
                conf = self.work / f"{name}.cfg"
                conf.write_text(haproxy_conf(port, backend))
                haproxy = "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else "haproxy"
                argv = [haproxy, "-db", "-f", str(conf)]
            p = self.procs.start(name, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
                                 self.args.proxy_cpu, env=env)
            try:
                wait_for(f"{name}", lambda: http_get(port, "/")[0] == 200, timeout=120)
                self.wrk(port, "/", 64, 2)
                subprocess.run(["callgrind_control", "-z", str(p.pid)], capture_output=True, check=True)
                w, _ = self.wrk(port, "/", 64, self.args.callgrind)
                subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True, check=True)
                dump = Path(f"{out}.1")
                wait_for(f"{name} dump", lambda: dump.exists() and "totals:" in dump.read_text(errors="replace"))
            finally:
                self.procs.stop(name)
            total = next(int(line.split()[1]) for line in dump.read_text(errors="replace").splitlines()
                         if line.startswith("totals:"))
            row = {"round": 0, "scenario": "callgrind", "target": t, "requests": w["requests"],
                   "instructions": total, "ir_per_request": total / max(w["requests"], 1), "dump": str(dump)}
            self.runs.append(row)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"callgrind {t}: {row['ir_per_request']:,.0f} instructions per request "
                f"({w['requests']} requests; callgrind_annotate {dump})")

    # --- report ----------------------------------------------------------------------------------

    def report(self) -> str:
        return render(self.runs, self.info, self.args)


PROFILE_GROUPS = [
    ("kernel (TCP/IP, syscalls, scheduler)", r"\[kernel|\[k\]"),
    ("malloc / free", r"malloc|_int_free|cfree|unlink_chunk|realloc|calloc|tcache|sysmalloc|__libc_free"),
    ("memcpy / memmove", r"memmove|memcpy|memset"),
    ("metrics crates", r"metrics(_exporter_prometheus|_util)?::|quanta::"),
    ("hashing (SipHash, foldhash, xxh3)", r"sip::|hash_one|foldhash|xxh3|BuildHasher"),
    ("http headers (HeaderMap)", r"http::header::"),
    ("hyper-util client pool", r"hyper_util::client::legacy::pool"),
    ("hyper-util client", r"hyper_util::client"),
    ("hyper client dispatch channel", r"hyper::client::dispatch|want::"),
    ("hyper-util server (auto)", r"hyper_util::server"),
    ("hyper h1 (parse, encode, dispatch, io)", r"hyper::proto|httparse|hyper::"),
    ("tokio mpsc / sync", r"tokio::sync"),
    ("tokio runtime (scheduler, io driver, timers)", r"tokio::"),
    ("rayshift code", r"rayshift::"),
    ("futures / bytes / std", r"futures_|bytes::|core::|alloc::|std::"),
]


def classify_profile(flat: str) -> str:
    """Self time of a `perf report --sort dso,symbol` grouped into components."""
    totals: dict[str, float] = {}
    for line in flat.splitlines():
        mm = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
        if not mm:
            continue
        pct, dso, kind, sym = float(mm.group(1)), mm.group(2), mm.group(3), mm.group(4)
        text = f"[{kind}] {dso} {sym}"
        group = "other user space"
        for name, rx in PROFILE_GROUPS:
            if re.search(rx, text):
                group = name
                break
        totals[group] = totals.get(group, 0.0) + pct
    user = sum(v for k, v in totals.items() if not k.startswith("kernel"))
    lines = ["===== self time by component (share of all samples; share of user-space samples) ====="]
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        share = "" if k.startswith("kernel") or not user else f"   {100 * v / user:5.1f}% of user space"
        lines.append(f"{v:6.2f}%  {k}{share}")
    return "\n".join(lines) + "\n\n"


def haproxy_command(sock: Path, command: str, timeout: float = 5) -> str:
    """One command on HAProxy's admin socket (non-interactive: it answers and closes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(str(sock))
        c.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            b = c.recv(65536)
            if not b:
                return b"".join(chunks).decode()
            chunks.append(b)


def haproxy_server_totals(sock: Path) -> dict[str, float]:
    """Sessions each server of backend `be` took so far (`show stat`, field stot)."""
    out: dict[str, float] = {}
    lines = haproxy_command(sock, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("pxname") == "be" and row.get("svname") in ("a", "b"):
            out[row["svname"]] = float(row["stot"] or 0)
    return out


def haproxy_requests(sock: Path) -> float:
    """HTTP requests HAProxy's frontends took so far (`show stat`, field req_tot)."""
    lines = haproxy_command(sock, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    return sum(float(row.get("req_tot") or 0) for row in (dict(zip(header, line.split(","))) for line in lines[1:])
               if row.get("svname") == "FRONTEND")


def scrape_counter(admin: int, name: str) -> float:
    """A counter from rayshift's /metrics, summed over its labels."""
    _, body = http_get(admin, "/metrics", timeout=5)
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape_requests(admin: int) -> dict[str, float]:
    """rayshift_requests_total summed by cluster (2xx as the cluster's name, others as name:code)."""
    _, body = http_get(admin, "/metrics", timeout=5)
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if not line.startswith("rayshift_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        key = labels.get("cluster", "?")
        if not labels.get("code", "").startswith("2"):
            key += ":" + labels.get("code", "?")
        out[key] = out.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return out


# ------------------------------------------------------------------------------------------------
# Rendering


def fmt_rps(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def fmt_us(v) -> str:
    return "-" if v is None else f"{v:.1f} us"


def fmt_cpu(r: dict) -> str:
    if r.get("cpu_us") is None:
        return "-"
    if r.get("cpu_user_us") is None:
        return fmt_us(r["cpu_us"])
    return f"{r['cpu_us']:.1f} us ({r['cpu_user_us']:.1f} user)"


def med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def render(runs: list[dict], info: dict, args) -> str:
    def sel(target, scenario):
        return [r for r in runs if r["target"] == target and r["scenario"] == scenario]

    def m(target, scenario, key):
        return med(sel(target, scenario), key)

    def rel(target, scenario):
        """Median over rounds of the proxy's CPU per request over the backend's in the same run:
        the backend (the same nginx behind every proxy) measures how fast the shared core ran
        during that run, so this cancels the machine's drift between runs."""
        v = [r["cpu_us"] / r["backend_cpu_us"] for r in sel(target, scenario)
             if r.get("cpu_us") and r.get("backend_cpu_us")]
        return statistics.median(v) if v else None

    targets = [t for t in TARGETS if any(r["target"] == t for r in runs)]
    L = []
    L.append(f"# rayshift load benchmark, {info.get('date', '')}")
    L.append("")
    if args.rounds < 3 or args.duration < 10:
        L.append(f"**Preliminary: {args.duration}s per run, {args.rounds} round(s)** "
                 "(the issue's figures are medians of 3 rounds of 10 s or more).")
        L.append("")
    for k, v in info.items():
        L.append(f"- {k}: {v}")
    L.append("")
    L.append("Medians over rounds. Small body: 3 bytes (`/`); 16 KiB body: `/16k`. "
             "x = ratio to direct. CPU/request = utime+stime of the proxy's processes / requests.")
    L.append("")
    L.append("| target | req/s, 64 conns | proxy CPU/request | p50 / p99, 64 conns | p50 / p99, 1 conn "
             "| added p50 / p99, 1 conn | 16 KiB body: req/s, CPU/request | backend CPU/request, small / 16 KiB "
             "| failed requests |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    d64, d1p50, d1p99, d16 = (m("direct", "small-c64", "rps"), m("direct", "small-c1", "p50_us"),
                              m("direct", "small-c1", "p99_us"), m("direct", "16k-c64", "rps"))

    def ratio(v, base):
        return f" (x{v / base:.2f})" if v is not None and base else ""

    def lat(t, sc):
        p50, p99 = m(t, sc, "p50_us"), m(t, sc, "p99_us")
        return "-" if p50 is None else f"{p50:,.0f} / {p99:,.0f} us"

    for t in targets:
        rps = m(t, "small-c64", "rps")
        added = "-"
        if t != "direct" and m(t, "small-c1", "p50_us") is not None and d1p50 is not None:
            added = f"{m(t, 'small-c1', 'p50_us') - d1p50:+,.0f} / {m(t, 'small-c1', 'p99_us') - d1p99:+,.0f} us"
        big = m(t, "16k-c64", "rps")
        big_s = "-" if big is None else f"{fmt_rps(big)}{ratio(big, d16) if t != 'direct' else ''}, " \
                                        f"{fmt_us(m(t, '16k-c64', 'cpu_us')) if t != 'direct' else '-'}"
        fails = sum(r["errors"] + r["non2xx"] for r in runs if r["target"] == t and "errors" in r)
        L.append(f"| {t} | {fmt_rps(rps)}{ratio(rps, d64) if t != 'direct' else ''} "
                 f"| {fmt_us(m(t, 'small-c64', 'cpu_us'))} | {lat(t, 'small-c64')} | {lat(t, 'small-c1')} "
                 f"| {added} | {big_s} "
                 f"| {fmt_us(m(t, 'small-c64', 'backend_cpu_us'))} / {fmt_us(m(t, '16k-c64', 'backend_cpu_us'))} "
                 f"| {fails} |")
    L.append("")
    if any(t in FLOORS for t in targets):
        L.append("floor-*: crates/floor's minimal relays, not proxies: one upstream connection per client "
                 "connection, heads forwarded byte for byte, no routing, header rewriting, timeouts or metrics. "
                 "What the event loop alone costs: floor-epoll a hand-written epoll loop, floor-tokio tokio's "
                 "current-thread runtime (rayshift's), floor-uring io_uring with one submission per batch.")
        L.append("")

    cpu_rows = [t for t in targets if m(t, "small-c64", "cpu_user_us") is not None]
    if cpu_rows:
        L.append("Proxy CPU/request split, user + system (medians): " + "; ".join(
            f"{t} {m(t, 'small-c64', 'cpu_user_us'):.1f} + {m(t, 'small-c64', 'cpu_sys_us'):.1f} us (3 B)"
            + (f", {m(t, '16k-c64', 'cpu_user_us'):.1f} + {m(t, '16k-c64', 'cpu_sys_us'):.1f} us (16 KiB)"
               if m(t, '16k-c64', 'cpu_user_us') is not None else "")
            for t in cpu_rows) + ".")
        L.append("")
        rel_rows = [t for t in targets if rel(t, "small-c64") is not None]
        if rel_rows:
            L.append("Proxy CPU/request relative to the backend's in the same run (median of rounds; the backend, "
                     "the same nginx behind every proxy, shares the proxy's core, so its CPU per request measures "
                     "how fast the core ran during that run and the ratio cancels the machine's drift, which moves "
                     "single runs by tens of percent; it assumes a proxy does not change the backend's own work per "
                     "request, which the backend column shows): " + "; ".join(
                         f"{t} {rel(t, 'small-c64'):.2f} (3 B)"
                         + (f", {rel(t, '16k-c64'):.2f} (16 KiB)" if rel(t, "16k-c64") is not None else "")
                         for t in rel_rows) + ".")
            L.append("")

    if any(r["scenario"] == "16k-c1" for r in runs):
        L.append("16 KiB body, 1 connection: " + "; ".join(
            f"{t} {lat(t, '16k-c1')}" for t in targets if sel(t, "16k-c1")))
        L.append("")

    # Machine load during the runs: how much to trust the figures.
    L.append("Machine load during the runs (medians): "
             + "; ".join(f"{sc}: proxy core {med([r for r in runs if r['scenario'] == sc], 'proxy_core_busy_pct'):.0f}% busy, "
                         f"{med([r for r in runs if r['scenario'] == sc], 'proxy_core_foreign_pct'):.0f}% of it by other processes, "
                         f"wrk {med([r for r in runs if r['scenario'] == sc], 'wrk_cpu_pct'):.0f}% of its core"
                         for sc in args.scenarios if any(r["scenario"] == sc for r in runs)))
    L.append("")

    # (row name, runs, the steady runs of the same instance)
    churn_rows = []
    for proxy, rows in [("rayshift", [("churn, flip (all traffic moves)", "rayshift churn"),
                                      ("churn, same split", "rayshift churn same-split")]),
                        ("haproxy", [("churn, flip (`set weight`, not persisted)", "haproxy churn")])]:
        steady = [r for r in runs if r["target"] == f"{proxy} steady"]
        for name, target in rows:
            churn = [r for r in runs if r["target"] == target]
            if churn and steady:
                churn_rows.append((proxy, name, churn, steady))
    if churn_rows:
        L.append(f"## Churn: weights swapped {args.churn_rate}/s through the admin API (64 conns, small body)")
        L.append("")
        churner = [r["churner_cpu_us"] for _, _, churn, _ in churn_rows for r in churn if r.get("churner_cpu_us")]
        L.append("flip: 100/0 and 0/100 alternate, every swap moves all traffic to the other cluster's "
                 "connections; same split: every PUT sets 100/0 again, the table is rebuilt, persisted and "
                 "published all the same (tables published counts them) while traffic stays put. HAProxy: "
                 "the flip through `set weight` on its admin socket, which persists nothing."
                 + (f" The churner runs on wrk's core and took {statistics.median(churner):.0f} us of it per swap "
                    f"(median), {statistics.median(churner) * args.churn_rate / 1e4:.1f}% of the core." if churner else ""))
        L.append("")
        L.append("| proxy | run | req/s | failed requests | swaps/s done | tables published | swap p50 / p99 / max "
                 "| share to cluster b | CPU/request | CPU/swap (approx.) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        shown = set()
        for proxy, name, churn, steady in churn_rows:
            s = med(steady, "rps")
            if proxy not in shown:
                shown.add(proxy)
                L.append(f"| {proxy} | steady | {fmt_rps(s)} | {sum(r['errors'] + r['non2xx'] for r in steady)} "
                         f"| - | - | - | - | {fmt_us(med(steady, 'cpu_us'))} | - |")
            c = med(churn, "rps")
            fails = sum(r["errors"] + r["non2xx"] for r in churn)
            # CPU a swap costs the proxy: extra CPU/request over the steady run, times requests, per swap.
            sc = med(steady, "cpu_us")
            per_swap = [((r["cpu_us"] - sc) * r["requests"] / max(r["swaps_total"], 1)) for r in churn] if sc else []
            per_swap_s = f"{statistics.median(per_swap):,.0f} us" if per_swap else "-"
            L.append(f"| {proxy} | {name} | {fmt_rps(c)} ({100 * (c / s - 1):+.1f}%) | {fails} "
                     f"| {med(churn, 'swaps_per_s'):.1f} ({sum(r['swaps_failed'] for r in churn)} failed) "
                     f"| {med(churn, 'table_swaps') / max(med(churn, 'swaps_total'), 1):.0%} of swaps "
                     f"| {med(churn, 'put_p50_ms'):.1f} / {med(churn, 'put_p99_ms'):.1f} / {max(r['put_max_ms'] for r in churn):.1f} ms "
                     f"| {med(churn, 'share_b_pct'):.0f}% | {fmt_us(med(churn, 'cpu_us'))} | {per_swap_s} |")
        L.append("")
        # Each churn run against the steady run of its own round: drift between rounds cancels.
        paired, paired_dc = [], []
        for proxy, name, churn, steady in churn_rows:
            by_round = {r["round"]: r for r in steady}
            pairs = [(r, by_round[r["round"]]) for r in churn if by_round.get(r["round"])]
            ratios = [c["rps"] / s["rps"] - 1 for c, s in pairs]
            if ratios:
                paired.append(f"{proxy} {name.split(' (')[0]} {100 * statistics.median(ratios):+.1f}% "
                              f"(rounds {', '.join(f'{100 * x:+.1f}%' for x in ratios)})")
            # The same pairs with the drift taken out as in the 3 B ratios: each run's CPU per
            # request over the backend's, and the throughput that implies with both on the core.
            dc = [(s["cpu_us"] / s["backend_cpu_us"] + 1) / (c["cpu_us"] / c["backend_cpu_us"] + 1) - 1
                  for c, s in pairs if c.get("cpu_us") and c.get("backend_cpu_us") and s.get("cpu_us")
                  and s.get("backend_cpu_us")]
            if dc:
                paired_dc.append(f"{proxy} {name.split(' (')[0]} {100 * statistics.median(dc):+.1f}% "
                                 f"(rounds {', '.join(f'{100 * x:+.1f}%' for x in dc)})")
        if paired:
            L.append("Same-round change against steady, median of rounds: " + "; ".join(paired) + ".")
            L.append("")
        if paired_dc:
            L.append("The same pairs, drift-cancelled ((steady + 1) / (churn + 1), each run's CPU per request in units "
                     "of the backend's; rounds minutes apart, so a few points of scatter remain): "
                     + "; ".join(paired_dc) + ".")
            L.append("")
    inter = [r for r in runs if r["scenario"] == "churn-interleaved"]
    if inter:
        r0 = inter[0]
        L.append(f"Interleaved: one continuous 64-connection load through the churn gateway, the churner switched on "
                 f"and off every {r0['window_s']:g} s ({r0['windows']} churn windows), each churn window against the "
                 f"mean of the steady windows on either side (median): "
                 + "; ".join(f"{r['target']} req/s {100 * r['rps_change']:+.1f}%, CPU/request {100 * r['cpu_change']:+.1f}%"
                             + (f", backend CPU/request {100 * r['backend_cpu_change']:+.1f}%"
                                if "backend_cpu_change" in r else "")
                             + (f", **drift-cancelled {100 * r['implied_change']:+.1f}%** (windows "
                                f"{min(r['implied_changes']) * 100:+.1f}% to {max(r['implied_changes']) * 100:+.1f}%; "
                                f"the core's other work {r['steady_other_us']:.2f} -> {r['churn_other_us']:.2f} us "
                                f"per request)" if "implied_change" in r else "") + " "
                             f"({fmt_rps(r['churn_rps'])} vs {fmt_rps(r['steady_rps'])} req/s; windows "
                             f"{min(r['rps_changes']) * 100:+.0f}% to {max(r['rps_changes']) * 100:+.0f}%; "
                             f"{r['failed']} failed requests, {r['swaps_failed']} failed swaps; the churner's own "
                             f"CPU {r.get('churner_cpu_us') or 0:.0f} us per swap, taken from wrk's core)" for r in inter)
                 + ".")
        L.append("")
        if any("implied_change" in r for r in inter):
            L.append("Drift-cancelled: all the work the shared core did per request in a window (the proxy's, the "
                     "backend's, interrupts', kernel threads'), in units of the backend's CPU per request in the same "
                     "window, against the same for the steady windows on either side. The machine's drift moves "
                     "the backend's cost and the rest alike and cancels; with the core saturated, throughput goes as "
                     "one over that work, so this is the throughput change the swaps cause (it takes the backend's own "
                     "work per request as unchanged by the swaps, which the backend's CPU/request above checks).")
            L.append("")

    costs = [r for r in runs if r["scenario"] == "swap-cost"]
    if costs:
        L.append(f"## What a swap costs the proxy ({args.churn_rate}/s, churner alone, proxy core kept busy)")
        L.append("")
        L.append("Time the proxy's threads ran per swap (scheduler nanoseconds), the same time without swaps "
                 "taken out, a lowest-priority spinner keeping the core busy as client load does. Under load "
                 "that share of the core is taken from requests: what the swap itself costs, apart from the "
                 "flip's move of all traffic between the clusters' connections and the churn runs' scatter.")
        L.append("")
        L.append("| swaps | swaps/s done (failed) | PUT p50 / p99 | proxy CPU per swap | share of the proxy core |")
        L.append("|---|---|---|---|---|")
        for r in costs:
            L.append(f"| {r['target']} | {r['swaps_per_s']:.1f} ({r['swaps_failed']}) "
                     f"| {r['put_p50_ms']:.1f} / {r['put_p99_ms']:.1f} ms | {r['proxy_us_per_swap']:,.0f} us "
                     f"| {r['core_share_pct']:.2f}% |")
        L.append("")

    rss = [r for r in runs if r["scenario"] == "rss"]
    if rss:
        L.append(f"## Memory with {args.idle_conns:,} idle keep-alive client connections")
        L.append("")
        L.append("| target | RSS before | RSS with idle conns | PSS with idle conns | peak RSS (VmHWM) "
                 "| conns answered / still open | processes, threads |")
        L.append("|---|---|---|---|---|---|---|")
        for r in rss:
            L.append(f"| {r['target']} | {r['rss_before_kib'] / 1024:.1f} MiB | {r['rss_idle_conns_kib'] / 1024:.1f} MiB "
                     f"| {r['pss_kib'] / 1024:.1f} MiB | {r['hwm_kib'] / 1024:.1f} MiB | {r['conns_ok']} / {r['conns_still_open']} "
                     f"| {r['processes']}, {r['threads']} |")
        L.append("")

    # Issue 5's targets.
    peers = [t for t in ("nginx", "haproxy") if t in targets]
    for cand in [t for t in ("rayshift", "rayshift-alt") if t in targets]:
        if not peers:
            break
        L.append(f"## Issue 5 targets: {cand}")
        L.append("")
        L.append(f"| goal | {cand} | better peer | verdict |")
        L.append("|---|---|---|---|")

        def row(goal, mine, best, ok, fmt):
            if mine is None or best is None:
                return
            L.append(f"| {goal} | {fmt(mine)} | {fmt(best)} | {'met' if ok(mine, best) else 'NOT met'} |")

        best_rps = max((m(p, "small-c64", "rps") or 0) for p in peers)
        row("req/s, 64 conns >= 1.10x better peer", m(cand, "small-c64", "rps"), best_rps,
            lambda a, b: a >= 1.10 * b, fmt_rps)
        for sc, name in (("small-c64", "small body"), ("16k-c64", "16 KiB body")):
            vals = [m(p, sc, "cpu_us") for p in peers if m(p, sc, "cpu_us") is not None]
            row(f"CPU/request, {name} <= 0.9x better peer", m(cand, sc, "cpu_us"), min(vals) if vals else None,
                lambda a, b: a <= 0.9 * b, fmt_us)
        for sc, name in (("small-c64", "small body"), ("16k-c64", "16 KiB body")):
            vals = [rel(p, sc) for p in peers if rel(p, sc) is not None]
            row(f"CPU/request relative to the backend's (drift cancelled), {name} <= 0.9x better peer",
                rel(cand, sc), min(vals) if vals else None, lambda a, b: a <= 0.9 * b, lambda v: f"{v:.2f}")
        # With the backend on the proxy's core, a request costs the core proxy + backend: the
        # throughput ratio the drift-free CPU figures imply.
        vals = [rel(p, "small-c64") for p in peers if rel(p, "small-c64") is not None]
        mine = rel(cand, "small-c64")
        if vals and mine is not None:
            implied = (min(vals) + 1) / (mine + 1)
            L.append(f"| req/s >= 1.10x better peer, as the drift-cancelled CPU figures imply ((peer + 1) / "
                     f"({cand} + 1), in backend CPU per request) | {implied:.2f}x | - | "
                     f"{'met' if implied >= 1.10 else 'NOT met'} |")
        if d1p99 is not None:
            added = [m(p, "small-c1", "p99_us") - d1p99 for p in peers if m(p, "small-c1", "p99_us") is not None]
            mine = m(cand, "small-c1", "p99_us")
            row("added p99, 1 conn <= better peer", None if mine is None else mine - d1p99,
                min(added) if added else None, lambda a, b: a <= b, lambda v: f"{v:+,.0f} us")
        for proxy, name, churn, steady in churn_rows if cand == "rayshift" else []:
            if proxy != "rayshift":
                continue
            s, c = med(steady, "rps"), med(churn, "rps")
            fails = sum(r["errors"] + r["non2xx"] for r in churn)
            peer = [med(pc, "rps") / med(ps, "rps") - 1 for p, n, pc, ps in churn_rows
                    if p == "haproxy" and "flip" in name]
            L.append(f"| {name}: 0 failed requests, < 3% throughput loss | {fails} failed, {100 * (c / s - 1):+.1f}% "
                     f"| {f'HAProxy {100 * peer[0]:+.1f}%' if peer else '-'} "
                     f"| {'met' if fails == 0 and c >= 0.97 * s else 'NOT met'} |")
        for r in [r for r in runs if r["scenario"] == "churn-interleaved" and r["target"].startswith("rayshift")] \
                if cand == "rayshift" else []:
            ok = r["failed"] == 0 and r["swaps_failed"] == 0 and r["rps_change"] >= -0.03
            L.append(f"| churn interleaved, {r['target'].removeprefix('rayshift ')}: 0 failed requests, < 3% throughput "
                     f"loss | {r['failed']} failed, {100 * r['rps_change']:+.1f}% | - | {'met' if ok else 'NOT met'} |")
            if "implied_change" in r:
                ok = r["failed"] == 0 and r["swaps_failed"] == 0 and r["implied_change"] >= -0.03
                peer = [p["implied_change"] for p in runs if p["scenario"] == "churn-interleaved"
                        and p["target"].startswith("haproxy") and "implied_change" in p]
                L.append(f"| the same, drift-cancelled | {r['failed']} failed, {100 * r['implied_change']:+.1f}% "
                         f"| {f'HAProxy flip {100 * peer[0]:+.1f}%' if peer else '-'} | {'met' if ok else 'NOT met'} |")
        mine = [r for r in rss if r["target"] == cand]
        if mine:
            v = mine[0]["rss_idle_conns_kib"] / 1024
            L.append(f"| RSS <= 40 MB with 1,000 idle conns | {v:.1f} MiB | - | {'met' if v * 1.048576 <= 40 else 'NOT met'} |")
        L.append("")

    sys_rows = [r for r in runs if r["scenario"] == "syscalls"]
    if sys_rows:
        L.append("## System calls and context switches per request (diagnostic runs, 64 conns)")
        L.append("")
        cols = ["read+recv", "write+send", "epoll_wait", "epoll_ctl", "futex"]
        L.append("| target | body | syscalls | context switches | " + " | ".join(cols) + " | other |")
        L.append("|---|---|---|---|" + "---|" * (len(cols) + 1))
        for r in sys_rows:
            p = r["per_request"]
            g = {
                "read+recv": sum(p.get(k, 0) for k in ("read", "readv", "recvfrom", "recvmsg")),
                "write+send": sum(p.get(k, 0) for k in ("write", "writev", "sendto", "sendmsg", "sendfile64")),
                "epoll_wait": p.get("epoll_wait", 0) + p.get("epoll_pwait", 0),
                "epoll_ctl": p.get("epoll_ctl", 0),
                "futex": p.get("futex", 0) + p.get("sched_yield", 0),
            }
            total = p.get("raw_syscalls:sys_enter", 0)
            L.append(f"| {r['target']} | {'16 KiB' if r['body'].startswith('16k') else '3 B'} | {total:.2f} "
                     f"| {p.get('context-switches', 0):.2f} | " + " | ".join(f"{g[c]:.2f}" for c in cols)
                     + f" | {total - sum(g.values()):.2f} |")
        L.append("")

    cg_rows = [r for r in runs if r["scenario"] == "callgrind"]
    if cg_rows:
        L.append("## Instructions per request (callgrind, user space, 64 conns, small body)")
        L.append("")
        L.append("| target | instructions/request | requests counted | dump (callgrind_annotate) |")
        L.append("|---|---|---|---|")
        for r in cg_rows:
            L.append(f"| {r['target']} | {r['ir_per_request']:,.0f} | {r['requests']:,} | `{r['dump']}` |")
        L.append("")

    kp_rows = [r for r in runs if r["scenario"] == "kprofile"]
    if kp_rows:
        L.append("## Where the CPU goes, per request (perf on the proxy core, 64 conns, small body)")
        L.append("")
        L.append("Sampled (cpu-clock, 4,999 Hz) over the whole proxy core during one run per proxy. TCP segments")
        L.append("are the machine's loopback total per request: 4 is a proxy's floor (request and response, in and out).")
        L.append("")
        L.append("| target | req/s | user | kernel | proxy total | backend | TCP segments | largest kernel functions (us/request) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for r in kp_rows:
            top = ", ".join(f"`{k}` {v:.2f}" for k, v in r["top_kernel"][:5])
            L.append(f"| {r['target']} | {fmt_rps(r['rps'])} | {r['user_us']:.2f} us | {r['kernel_us']:.2f} us "
                     f"| {r['user_us'] + r['kernel_us']:.2f} us | {r['backend_us']:.2f} us "
                     f"| {r['segs_per_req']:.2f} | {top} |")
        L.append("")

    L.append("## Every run")
    L.append("")
    L.append("| round | scenario | target | req/s | p50 / p99 / max | CPU/req (of it user) | backend CPU/req "
             "| context switches/req, proxy / backend | errors + non-2xx | proxy core busy (foreign) | wrk CPU |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if r["scenario"] in ("rss", "syscalls", "callgrind", "kprofile", "swap-cost", "churn-interleaved"):
            continue
        L.append(f"| {r['round']} | {r['scenario']} | {r['target']} | {fmt_rps(r['rps'])} "
                 f"| {r['p50_us']:,} / {r['p99_us']:,} / {r['max_us']:,} us | {fmt_cpu(r)} "
                 f"| {fmt_us(r['backend_cpu_us'])} "
                 f"| {'-' if r.get('ctxsw_per_req') is None else format(r['ctxsw_per_req'], '.2f')} / "
                 f"{'-' if r.get('backend_ctxsw_per_req') is None else format(r['backend_ctxsw_per_req'], '.2f')} "
                 f"| {r['errors']} + {r['non2xx']} "
                 f"| {r['proxy_core_busy_pct']:.0f}% ({r['proxy_core_foreign_pct']:.0f}%) | {r['wrk_cpu_pct']:.0f}% |")
    L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------------------------------------
# Helper modes


def read_response(s: socket.socket) -> int:
    """Reads one HTTP/1.1 response (content-length or chunked); returns the status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise ConnectionError("closed before the response head")
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if "content-length" in hdrs:
        need = int(hdrs["content-length"])
        while len(rest) < need:
            d = s.recv(65536)
            if not d:
                raise ConnectionError("closed in the body")
            rest += d
    elif "chunked" in hdrs.get("transfer-encoding", ""):
        while not rest.endswith(b"0\r\n\r\n"):
            d = s.recv(65536)
            if not d:
                raise ConnectionError("closed in the body")
            rest += d
    return status


def fsync_main(argv: list[str]) -> None:
    """Writes a 4 KiB block and fdatasyncs it --rate times a second until SIGTERM: a durable write
    per change without rayshift, to compare a churn run with (churn_floor.py); prints FSYNCJSON."""
    ap = argparse.ArgumentParser(prog="bench.py fsync")
    ap.add_argument("--path", required=True, help="file to write (created, 1 MiB, removed at the end)")
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--no-sync", action="store_true", help="write to the page cache only (no fdatasync)")
    a = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fd = os.open(a.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        # Written and synced once, so later writes overwrite allocated blocks (as the journal's do).
        os.pwrite(fd, b"\0" * (1 << 20), 0)
        os.fsync(fd)
        block = b"r" * 4096
        print("FSYNC started", flush=True)
        n, start = 0, time.monotonic()
        nxt = start
        while not stop.is_set():
            os.pwrite(fd, block, 4096 * (1 + n % 255))
            if not a.no_sync:
                os.fdatasync(fd)
            n += 1
            nxt += 1 / a.rate
            stop.wait(max(0.0, nxt - time.monotonic()))
        print("FSYNCJSON " + json.dumps({"writes": n, "rate": n / (time.monotonic() - start)}), flush=True)
    finally:
        os.close(fd)
        os.unlink(a.path)


def idle_main(argv: list[str]) -> None:
    """Opens N keep-alive connections, one request each, holds them until SIGTERM."""
    ap = argparse.ArgumentParser(prog="bench.py idle")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", type=int, default=1000)
    a = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    socks, ok = [], 0
    for _ in range(a.n):
        try:
            s = socket.create_connection(("127.0.0.1", a.port), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n")
            if read_response(s) == 200:
                ok += 1
            socks.append(s)
        except OSError as e:
            print(f"connection failed: {e}", file=sys.stderr)
    print("IDLEJSON " + json.dumps({"ok": ok, "open": len(socks)}), flush=True)
    stop.wait(600)
    still = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1):
                still += 1  # unexpected data, but open
        except BlockingIOError:
            still += 1
        except OSError:
            pass
    print("IDLEJSON " + json.dumps({"still_open": still}), flush=True)
    for s in socks:
        s.close()


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(
        prog="benches/load/run.sh",
        description="Load benchmark of rayshift against direct, nginx and HAProxy (issue 5). "
                    "Prints a markdown table and writes it to the results directory.",
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 s per run, 1 round, 1 s warm-up")
    ap.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 10; 3 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="seconds of warm-up per target and body (default 2; 1 with --quick; 0: none)")
    ap.add_argument("--targets", default="direct,rayshift,nginx,haproxy",
                    help="comma-separated subset of direct,rayshift,nginx,haproxy (rayshift-alt comes with --compare); "
                         "floor-epoll, floor-tokio and floor-uring add crates/floor's minimal relays (no proxy logic: "
                         "the floor of an event loop's system calls)")
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                    help="comma-separated subset of " + ",".join(SCENARIOS))
    ap.add_argument("--compare", metavar="RAYSHIFT_BINARY",
                    help="also benchmark this second rayshift build as target rayshift-alt, in the same rounds "
                         "(A/B of a change against the baseline under the same machine drift)")
    ap.add_argument("--rayshift-config-extra", default="", metavar="YAML",
                    help="YAML appended to every rayshift config the benchmark writes, e.g. "
                         "$'upstream:\\n  direct_http1: false' to measure the general (hyper) path")
    ap.add_argument("--no-churn", dest="churn", action="store_false", help="skip the churn run")
    ap.add_argument("--churn-rate", type=float, default=100, help="weight swaps per second (default 100)")
    ap.add_argument("--churn-windows", type=int, default=0, metavar="N",
                    help="churn windows of the interleaved churn run (default 16, 4 with --quick): the "
                         "median's scatter shrinks with their square root, the run takes 4 s more per window")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the idle-connections RSS run")
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--perf", type=int, default=0, metavar="SECONDS",
                    help="also profile rayshift with perf record for one run of this length")
    ap.add_argument("--syscalls", action="store_true",
                    help="also count each proxy's system calls and context switches per request (perf stat)")
    ap.add_argument("--kprofile", type=int, default=0, metavar="SECONDS",
                    help="also sample the proxy core with perf during one run per proxy of this length and split "
                         "each proxy's CPU per request into user space and kernel functions")
    ap.add_argument("--callgrind", type=int, default=0, metavar="SECONDS",
                    help="also count each proxy's instructions per request under valgrind's callgrind, "
                         "over a load of this length (64 connections, small body)")
    ap.add_argument("--perf-scenario", default="small-c64", choices=[*SCENARIOS, "churn"],
                    help="what runs while perf records (churn: the churn run, on the two-cluster gateway)")
    ap.add_argument("--perf-callgraph", default="dwarf,16384", help="perf --call-graph mode (fp, dwarf,SIZE, lbr)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run wrk, the backend and the proxies under this nice value (e.g. -10 on a shared machine)")
    ap.add_argument("--retry-foreign", type=float, default=0, metavar="PCT",
                    help="re-run a measurement (at most twice) when other processes took more than PCT%% of the "
                         "proxy core; the least disturbed run is kept (default 0: off)")
    ap.add_argument("--load-cpu", default="0", help="core for wrk and the helpers (default 0)")
    ap.add_argument("--proxy-cpu", default="1", help="core for the backend and the proxy under test (default 1)")
    ap.add_argument("--rayshift-threads", type=int, default=1,
                    help="RAYSHIFT_WORKER_THREADS passed to rayshift (0: not set)")
    ap.add_argument("--rayshift-cpus", default=None, metavar="CPUS",
                    help="cores rayshift runs on (a taskset list; default: --proxy-cpu), e.g. 0,1 with "
                         "--rayshift-threads 2 to compare RAYSHIFT_RUNTIME=per-core and work-stealing")
    ap.add_argument("--work", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--rayshift", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--results", required=True, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.duration = a.duration or (3 if a.quick else 10)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.targets = [t for t in a.targets.split(",") if t and t != "rayshift-alt"]
    if a.compare:
        if not os.access(a.compare, os.X_OK):
            ap.error(f"--compare {a.compare}: not an executable")
        a.compare = os.path.abspath(a.compare)
        a.targets.insert(a.targets.index("rayshift") + 1 if "rayshift" in a.targets else len(a.targets), "rayshift-alt")
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    for t in a.targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t}")
    for s in a.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s}")
    if "direct" not in a.targets:
        a.targets.insert(0, "direct")
    if (a.churn or a.perf) and not os.access(a.rayshift, os.X_OK):
        ap.error("rayshift binary needed")
    if a.perf and "rayshift" not in a.targets:
        ap.error("--perf needs the rayshift target")
    if a.churn_windows < 0:
        ap.error("--churn-windows must be 1 or more")
    return a


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "fsync":
        fsync_main(sys.argv[2:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "idle":
        idle_main(sys.argv[2:])
        return 0
    args = parse_args(sys.argv[1:])
    bench = Bench(args)
    # SIGTERM (run.sh's trap, CI) unwinds like Ctrl-C so everything started is stopped.
    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        bench.setup()
        if args.warmup > 0:
            bench.warmup()
        bench.rounds()
        if args.churn and "rayshift" in args.targets:
            bench.churn()
        if args.rss:
            bench.rss()
        if args.syscalls:
            bench.syscalls()
        if args.perf:
            bench.perf()
        if args.kprofile:
            bench.kprofile()
        if args.callgrind:
            bench.callgrind()
        text = bench.report()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception:
        for f in sorted(Path(args.work).glob("*.log")):
            tail = f.read_text(errors="replace")[-1500:]
            if tail.strip():
                log(f"--- {f.name} (end) ---\n{tail}")
        raise
    finally:
        bench.procs.stop_all()
    out = bench.results / f"{bench.stamp}.md"
    out.write_text(text + "\n")
    print(text)
    log(f"written {out} (every run: {bench.jsonl})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
