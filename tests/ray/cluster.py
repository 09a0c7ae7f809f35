#!/usr/bin/env python3
"""Start and stop real, independent, local Ray Serve clusters for rayshift's end-to-end tests.

    python tests/ray/cluster.py start --dir DIR --name v1 --version v1 \
        [--apps echo=/echo,extra=/extra] [--dashboard] [--fail-ratio 0.0] [--num-cpus 1] [--timeout 120]
    python tests/ray/cluster.py status --dir DIR
    python tests/ray/cluster.py stop --dir DIR [--grace 10] [--keep-logs]

`start` runs one Ray head node (every port picked free at run time, its own process session, a short
temp dir under /tmp), deploys one Serve application per `--apps` entry with the Python API, waits until
the Serve proxy answers `/-/healthz` with 200 and `/-/routes` lists every app (and, with `--dashboard`,
until the dashboard reports every app RUNNING), writes DIR/cluster.json and prints it on stdout.
The Serve apps live in the cluster (detached Serve controller): they keep running after `start` exits.
On failure it prints the tail of the Ray logs on stderr, stops what it started, and exits non-zero.

`stop` kills everything the cluster started (its process group, every process whose command line or
open files name its temp dir, and their descendants): SIGTERM, then SIGKILL after the grace period.
It verifies that no process is left, removes the temp dir, and is idempotent.

Each app answers every method on every path under its prefix with the body "<version> <app>" and
headers x-version, x-app, x-cluster, x-path, x-method, x-request-count, x-body-len, x-body-sha256.
Query parameters: `sleep_ms=N` waits N ms (at most 120000) before answering; `status=N` answers
with status N. With `--fail-ratio R` the app raises (Serve answers 500) on a deterministic share R of
requests: request number n (counted per app from 1) fails when floor(n*R) > floor((n-1)*R),
so R=0.2 fails requests 5, 10, 15, ...

`start` needs the venv from scripts/ray/install.sh; run with any python 3 it re-executes itself with
that venv's python when `import ray` fails here. `stop` and `status` use only the standard library.
"""

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

CLUSTER_JSON = "cluster.json"
TEMP_LINK = "ray-tmp"
START_LOG = "ray-start.log"
WORKER_PORTS = 100  # size of the worker port range
# Ray puts Unix sockets at <temp>/session_<date>_<time>_<usec>_<pid>/sockets/<name>; sun_path is 107
# bytes, so the temp dir itself must stay short.
MAX_TEMP_LEN = 40


def log(msg):
    print(f"ray-cluster: {msg}", file=sys.stderr, flush=True)


def venv_python():
    cache = os.environ.get("RAYSHIFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rayshift")
    return os.environ.get("RAYSHIFT_RAY_PYTHON") or os.path.join(cache, "ray-venv", "bin", "python")


# ---------------------------------------------------------------------------------------------
# The Serve application (pickled by value into the replicas: this file is __main__ there).


def make_app(version, app_name, cluster_name, fail_ratio):
    from ray import serve

    @serve.deployment(
        name="versioned",
        num_replicas=1,
        max_ongoing_requests=100,
        ray_actor_options={"num_cpus": 0},
    )
    class Versioned:
        def __init__(self, version, app_name, cluster_name, fail_ratio):
            from fractions import Fraction

            self.version = version
            self.app = app_name
            self.cluster = cluster_name
            self.ratio = Fraction(str(fail_ratio))
            self.count = 0

        def _fails(self, n):
            r = self.ratio
            return r > 0 and (n * r.numerator) // r.denominator > ((n - 1) * r.numerator) // r.denominator

        async def __call__(self, request):
            import asyncio
            import hashlib

            from starlette.responses import Response

            self.count += 1
            n = self.count
            body = await request.body()
            q = request.query_params
            sleep_ms = q.get("sleep_ms")
            if sleep_ms:
                await asyncio.sleep(min(max(int(sleep_ms), 0), 120_000) / 1000.0)
            if self._fails(n):
                raise RuntimeError(f"{self.version} {self.app}: injected failure on request {n}")
            status = int(q.get("status", "200"))
            headers = {
                "x-version": self.version,
                "x-app": self.app,
                "x-cluster": self.cluster,
                "x-path": request.url.path,
                "x-method": request.method,
                "x-request-count": str(n),
                "x-body-len": str(len(body)),
                "x-body-sha256": hashlib.sha256(body).hexdigest(),
            }
            return Response(
                content=f"{self.version} {self.app}",
                status_code=status,
                headers=headers,
                media_type="text/plain",
            )

    return Versioned.bind(version, app_name, cluster_name, fail_ratio)


# ---------------------------------------------------------------------------------------------
# Processes (standard library only, Linux /proc).


def read_proc(pid):
    """(pgid, sid, ppid, state, cmdline) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2 :].split()
    state, ppid, pgid, sid = rest[0], int(rest[1]), int(rest[2]), int(rest[3])
    return pgid, sid, ppid, state, cmd


def references(pid, paths):
    """True when one of the process's open files lies under one of `paths` (every Ray process keeps
    its log files open; workers rename their command line to `ray::...`, so only this finds them once
    their raylet is gone)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    links = []
    for name in names:
        with contextlib.suppress(OSError):
            links.append(os.readlink(os.path.join(fd_dir, name)))
    return any(link == p or link.startswith(p + "/") for link in links for p in paths)


def cluster_procs(temp_dir, pgids):
    """Live (non-zombie) processes of one cluster: members of the process groups or sessions `pgids`
    (`ray start` runs as the leader of a new session; Ray's workers make their own process groups but
    stay in that session), processes whose command line or open files name `temp_dir`, and all their
    descendants. Returns {pid: cmdline}."""
    me = {os.getpid(), os.getppid()}
    paths = {temp_dir, os.path.realpath(temp_dir)} if temp_dir else set()
    table, found = {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        info = read_proc(pid)
        if info is None or pid in me or pid <= 1:
            continue
        pgid, sid, ppid, state, cmd = info
        if state in ("Z", "X"):
            continue
        table[pid] = (ppid, cmd)
        if pgid in pgids or sid in pgids or (paths and (any(p in cmd for p in paths) or references(pid, paths))):
            found.add(pid)
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {pid: table[pid][1] for pid in sorted(found)}


def signal_all(pids, sig):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _exe(cmd):
    return os.path.basename(cmd.split(" ", 1)[0])


# Shutdown order (as `ray stop` does): the raylet first (its workers and agents exit with it within
# about 0.1 s), then the other head processes, the GCS last. SIGTERM to all at once is slow: the raylet
# then drains for about 10 s, and gcs_server and the autoscaler monitor ignore SIGTERM while the
# others are still connected.
SHUTDOWN_PHASES = (
    ("raylet", lambda cmd: _exe(cmd) == "raylet"),
    ("head processes", lambda cmd: _exe(cmd) != "gcs_server"),
    ("gcs_server", lambda cmd: True),
)


def kill_cluster(temp_dir, pgids, grace):
    """SIGTERM every process of the cluster (in SHUTDOWN_PHASES order, each phase waiting at most
    grace/3 s for its processes), SIGKILL what is left after `grace` seconds.
    Returns the processes still alive afterwards ({} on success)."""
    procs = cluster_procs(temp_dir, pgids)
    if not procs:
        return {}
    t0 = time.monotonic()
    deadline = t0 + grace
    log(f"stopping {len(procs)} processes")
    termed = set()
    for what, selected in SHUTDOWN_PHASES:
        procs = cluster_procs(temp_dir, pgids)
        if not procs:
            break
        targets = {p for p, c in procs.items() if selected(c)} - termed
        if not targets:
            continue
        signal_all(targets, signal.SIGTERM)
        termed |= targets
        phase_deadline = min(deadline, time.monotonic() + grace / len(SHUTDOWN_PHASES))
        while time.monotonic() < phase_deadline and targets & set(cluster_procs(temp_dir, pgids)):
            time.sleep(0.1)
    while time.monotonic() < deadline:
        procs = cluster_procs(temp_dir, pgids)
        if not procs:
            break
        fresh = set(procs) - termed  # started during shutdown (e.g. a worker being spawned)
        signal_all(fresh, signal.SIGTERM)
        termed |= fresh
        time.sleep(0.1)
    for _ in range(50):
        procs = cluster_procs(temp_dir, pgids)
        if not procs:
            log(f"all processes exited in {time.monotonic() - t0:.1f} s")
            return {}
        log(f"SIGKILL to {len(procs)} processes still alive after {grace:g} s: "
            + ", ".join(f"{p} {c[:60]}" for p, c in procs.items()))
        signal_all(procs, signal.SIGKILL)
        time.sleep(0.1)
    return cluster_procs(temp_dir, pgids)


# ---------------------------------------------------------------------------------------------
# Ports.


def free_ports(count):
    """`count` distinct TCP ports free on every address right now (kept bound until all are picked)."""
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def port_is_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port_range(size, avoid):
    """A range [lo, lo+size) of free ports below the kernel's ephemeral range (32768-60999, so outgoing
    connections do not take them) and above the Ray client proxy's 23000-24000."""
    for _ in range(200):
        lo = random.randrange(24001, 32000 - size)
        rng = range(lo, lo + size)
        if not any(p in avoid for p in rng) and all(port_is_free(p) for p in rng):
            return lo, lo + size - 1
    raise RuntimeError(f"no free range of {size} ports found in 24001-32000")


# ---------------------------------------------------------------------------------------------
# Files.


def read_state(d):
    try:
        with open(os.path.join(d, CLUSTER_JSON)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_state(d, state):
    path = os.path.join(d, CLUSTER_JSON)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def log_tail(d, temp_dir, lines=40):
    """The tail of the start log and of Ray's main logs, for failure reports."""
    files = [os.path.join(d, START_LOG)]
    logs = os.path.join(temp_dir or "", "session_latest", "logs")
    if temp_dir and os.path.isdir(logs):
        names = sorted(os.listdir(logs))
        for prefix in ("gcs_server.err", "gcs_server.out", "raylet.err", "raylet.out", "dashboard.log", "dashboard.err", "dashboard_agent.log"):
            files += [os.path.join(logs, n) for n in names if n.startswith(prefix)]
        serve = os.path.join(logs, "serve")
        if os.path.isdir(serve):
            files += [os.path.join(serve, n) for n in sorted(os.listdir(serve)) if n.startswith(("controller_", "proxy_", "replica_"))]
        files += [os.path.join(logs, n) for n in names if n.startswith("worker-") and n.endswith(".err") and os.path.getsize(os.path.join(logs, n)) > 0]
    out = []
    for path in files:
        try:
            with open(path, errors="replace") as f:
                tail = f.readlines()[-lines:]
        except OSError:
            continue
        if tail:
            out.append(f"----- {path} (last {len(tail)} lines)\n" + "".join(tail))
    return "\n".join(out) or "(no Ray logs found)"


# ---------------------------------------------------------------------------------------------
# HTTP.


def http_get(url, timeout=2.0):
    """(status, body) or (None, error text)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return None, str(e)


def wait_for(what, check, deadline, interval=0.25):
    while True:  # checks at least once, even past the deadline
        ok, last = check()
        if ok:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out waiting for {what}; last: {last}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Commands.


def parse_apps(spec):
    apps = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, prefix = item.partition("=")
        if not sep or not name or not prefix.startswith("/"):
            raise SystemExit(f"--apps: bad entry {item!r} (want name=/prefix)")
        apps.append({"name": name, "route_prefix": prefix})
    if not apps or len({a["name"] for a in apps}) != len(apps) or len({a["route_prefix"] for a in apps}) != len(apps):
        raise SystemExit("--apps: need at least one app, with distinct names and prefixes")
    return apps


def ray_env():
    """Environment for Ray's processes: single-node and loopback only. Ray replaces 127.0.0.1 given as
    --node-ip-address by the host's routable address unless multi-node support is switched off."""
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    for k in ("RAY_ADDRESS", "RAY_NAMESPACE", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        env.pop(k, None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    return env


def cmd_start(args):
    os.environ.update(ray_env())  # before importing ray: its constants read the environment once
    for k in ("RAY_ADDRESS", "RAY_NAMESPACE", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        os.environ.pop(k, None)
    try:
        import ray  # noqa: F401
    except ImportError:
        py = venv_python()
        if os.environ.get("RAYSHIFT_RAY_REEXEC") or not os.path.exists(py):
            raise SystemExit(f"ray is not importable by {sys.executable} and not by {py}: run scripts/ray/install.sh")
        os.environ["RAYSHIFT_RAY_REEXEC"] = "1"  # no loop if that python cannot import ray either
        os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])

    t0 = time.monotonic()
    deadline = t0 + args.timeout
    d = os.path.abspath(args.dir)
    os.makedirs(d, exist_ok=True)
    apps = parse_apps(args.apps)
    if not 0.0 <= args.fail_ratio <= 1.0:
        raise SystemExit("--fail-ratio must be within [0, 1]")

    old = read_state(d)
    if old and old.get("state") != "stopped":
        if cluster_procs(old.get("temp_dir"), set(old.get("pgids", []))):
            raise SystemExit(f"a cluster is already running from {d}: stop it first")
        stop_dir(d, grace=1.0, keep_logs=False)

    temp_root = os.environ.get("RAYSHIFT_RAY_TMP", "/tmp")
    temp_dir = tempfile.mkdtemp(prefix="rs-", dir=temp_root)
    if len(temp_dir) > MAX_TEMP_LEN:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise SystemExit(f"temp dir {temp_dir} is longer than {MAX_TEMP_LEN} chars (Unix socket paths): set RAYSHIFT_RAY_TMP shorter")
    link = os.path.join(d, TEMP_LINK)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    os.symlink(temp_dir, link)
    shutil.rmtree(os.path.join(d, "logs"), ignore_errors=True)  # logs kept by an earlier failed start

    state = {
        "state": "starting",
        "name": args.name,
        "version": args.version,
        "dir": d,
        "temp_dir": temp_dir,
        "pgids": [],
        "apps": apps,
        "fail_ratio": args.fail_ratio,
    }
    write_state(d, state)

    # Bound the whole start, whatever hangs (ray.init and serve.run have no timeout of their own).
    def on_timeout():
        log(f"start did not finish in {args.timeout:g} s")
        fail(d, state, None)

    watchdog = threading.Timer(args.timeout + 5, on_timeout)
    watchdog.daemon = True
    watchdog.start()

    def on_sigterm(signum, frame):  # e.g. a test harness's timeout: clean up like any failure
        raise SystemExit(f"killed by signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGHUP, on_sigterm)

    try:
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        if not os.path.exists(ray_bin):
            raise RuntimeError(f"no ray CLI next to {sys.executable}")
        for attempt in (1, 2):
            names = ["gcs", "node_manager", "object_manager", "ray_client_server", "dashboard_agent_listen",
                     "dashboard_agent_grpc", "runtime_env_agent", "metrics_export", "autoscaler_metrics",
                     "dashboard_metrics", "serve_http"]
            if args.dashboard:
                names.append("dashboard")
            ports = dict(zip(names, free_ports(len(names))))
            lo, hi = free_port_range(WORKER_PORTS, set(ports.values()))
            ports["min_worker"], ports["max_worker"] = lo, hi
            cmd = [
                ray_bin, "start", "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={ports['gcs']}",
                f"--node-manager-port={ports['node_manager']}",
                f"--object-manager-port={ports['object_manager']}",
                f"--ray-client-server-port={ports['ray_client_server']}",
                f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
                f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
                f"--runtime-env-agent-port={ports['runtime_env_agent']}",
                f"--metrics-export-port={ports['metrics_export']}",
                f"--min-worker-port={lo}",
                f"--max-worker-port={hi}",
                f"--num-cpus={args.num_cpus}",
                "--num-gpus=0",
                f"--object-store-memory={args.object_store_mb * 1000 * 1000}",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
                "--include-log-monitor=false",  # streams worker logs to drivers: not needed, saves ~50 MB
                "--log-style=record",
                "--log-color=false",
            ]
            if args.dashboard:
                cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}"]
            else:
                cmd += ["--include-dashboard=false"]
            log(f"starting Ray head {args.name} (attempt {attempt}): gcs 127.0.0.1:{ports['gcs']}, temp {temp_dir}")
            with open(os.path.join(d, START_LOG), "w" if attempt == 1 else "a") as out:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                # No flag for these two Prometheus endpoints: their defaults (44217, 44227) are fixed ports that
                # a second cluster on the machine fails to bind.
                env = ray_env()
                env["AUTOSCALER_METRIC_PORT"] = str(ports["autoscaler_metrics"])
                env["DASHBOARD_METRIC_PORT"] = str(ports["dashboard_metrics"])
                # Temp files of Ray's processes (e.g. the dashboard's multiprocessing pymp-* dirs) go
                # into the temp dir, which `stop` removes.
                env["TMPDIR"] = temp_dir
                # Own session (and process group): the Ray daemons it forks stay in the session, so the
                # whole cluster can be found and killed; the caller's terminal signals do not reach it.
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True, cwd=d)
            state["pgids"].append(proc.pid)
            write_state(d, state)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError("ray start did not return in time")
            if rc == 0:
                break
            with open(os.path.join(d, START_LOG), errors="replace") as f:
                text = f.read()
            if attempt == 1 and ("already in use" in text.lower() or "address in use" in text.lower()):
                log("a port was taken meanwhile: retrying with fresh ports")
                kill_cluster(temp_dir, set(state["pgids"]), grace=2.0)
                continue
            raise RuntimeError(f"ray start exited with {rc}")
        t_ray = time.monotonic()
        gcs = f"127.0.0.1:{ports['gcs']}"
        serve_url = f"http://127.0.0.1:{ports['serve_http']}"
        dashboard_url = f"http://127.0.0.1:{ports['dashboard']}" if args.dashboard else None
        state.update({
            "gcs_address": gcs,
            "serve_url": serve_url,
            "dashboard_url": dashboard_url,
            "ports": ports,
        })
        write_state(d, state)
        log(f"Ray head up in {t_ray - t0:.1f} s; deploying {', '.join(a['name'] + '=' + a['route_prefix'] for a in apps)}")

        deploy(gcs, ports["serve_http"], apps, args)
        t_deploy = time.monotonic()

        def routes_ok():
            s, body = http_get(serve_url + "/-/healthz")
            if s != 200:
                return False, f"healthz {s} {body[:200]}"
            s, body = http_get(serve_url + "/-/routes")
            if s != 200:
                return False, f"routes {s} {body[:200]}"
            try:
                routes = json.loads(body)
            except ValueError:
                return False, f"routes not JSON: {body[:200]}"
            want = {a["route_prefix"]: a["name"] for a in apps}
            return all(routes.get(p) == n for p, n in want.items()), f"routes {routes}"

        wait_for("/-/healthz 200 and /-/routes listing every app", routes_ok, deadline)
        if dashboard_url:
            def dashboard_ok():
                s, body = http_get(dashboard_url + "/api/serve/applications/", timeout=5.0)
                if s != 200:
                    return False, f"{s} {body[:200]}"
                try:
                    got = json.loads(body).get("applications") or {}
                except ValueError:
                    return False, f"not JSON: {body[:200]}"
                statuses = {a["name"]: got.get(a["name"], {}).get("status") for a in apps}
                return all(v == "RUNNING" for v in statuses.values()), statuses

            wait_for("dashboard /api/serve/applications/ with every app RUNNING", dashboard_ok, deadline, interval=0.5)
        t_ready = time.monotonic()

        procs = cluster_procs(temp_dir, set(state["pgids"]))
        state.update({
            "state": "running",
            "pgid": state["pgids"][-1],
            "pids": sorted(procs),
            "session_dir": os.path.realpath(os.path.join(temp_dir, "session_latest")),
            "log_dir": os.path.join(os.path.realpath(os.path.join(temp_dir, "session_latest")), "logs"),
            "python": sys.executable,
            "ray_version": ray.__version__,
            "started_at": time.time(),
            "timings_s": {
                "ray_start": round(t_ray - t0, 2),
                "deploy": round(t_deploy - t_ray, 2),
                "ready": round(t_ready - t_deploy, 2),
                "total": round(t_ready - t0, 2),
            },
        })
        write_state(d, state)
    except BaseException as e:  # noqa: BLE001 - every failure must clean up
        watchdog.cancel()
        log(f"start failed: {type(e).__name__}: {e}")
        fail(d, state, e)
    watchdog.cancel()
    log(f"cluster {args.name} ({args.version}) ready in {time.monotonic() - t0:.1f} s: serve {serve_url}"
        + (f", dashboard {dashboard_url}" if dashboard_url else "") + f", {len(state['pids'])} processes")
    print(json.dumps(state, indent=2), flush=True)
    return 0


def deploy(gcs, serve_port, apps, args):
    """Connect as a driver, start Serve on `serve_port` and run every app, then disconnect.
    Serve's controller is a detached actor: the apps keep running after this driver exits."""
    import logging

    import ray
    from ray import serve

    ray.init(address=gcs, logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        for a in apps:
            serve.run(make_app(args.version, a["name"], args.name, args.fail_ratio), name=a["name"], route_prefix=a["route_prefix"])
    finally:
        ray.shutdown()


_fail_lock = threading.Lock()


def fail(d, state, exc):
    """Print the logs' tail, stop what was started, exit 1 (callable from the watchdog thread)."""
    _fail_lock.acquire()  # never released: the first failure reports and exits
    print(log_tail(d, state.get("temp_dir")), file=sys.stderr, flush=True)
    try:
        stop_dir(d, grace=3.0, keep_logs=True)
    finally:
        os._exit(1)


def stop_dir(d, grace, keep_logs):
    """Stop the cluster of `d`. Returns the processes left alive ({} on success)."""
    state = read_state(d)
    link = os.path.join(d, TEMP_LINK)
    temp_dir = (state or {}).get("temp_dir")
    if not temp_dir and os.path.islink(link):
        temp_dir = os.readlink(link)
    if not temp_dir:
        log(f"nothing to stop in {d}")
        return {}
    # Process groups are trusted only while the temp dir exists: after a stop, their numbers may be reused.
    pgids = set(state.get("pgids", [])) if state and os.path.isdir(temp_dir) else set()
    left = kill_cluster(temp_dir, pgids, grace)
    if left:
        log("processes still alive: " + ", ".join(f"{p} {c[:80]}" for p, c in left.items()))
        return left
    if os.path.isdir(temp_dir):
        if keep_logs:
            src = os.path.join(temp_dir, "session_latest", "logs")
            dst = os.path.join(d, "logs")
            if os.path.isdir(src):
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst, symlinks=True, ignore_dangling_symlinks=True,
                                ignore=shutil.ignore_patterns("*.sock", "events"))
                log(f"Ray logs copied to {dst}")
        shutil.rmtree(temp_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    if state and state.get("state") != "stopped":
        state["state"] = "stopped"
        state["stopped_at"] = time.time()
        write_state(d, state)
    return {}


def cmd_stop(args):
    d = os.path.abspath(args.dir)
    t0 = time.monotonic()
    left = stop_dir(d, args.grace, args.keep_logs)
    if left:
        return 1
    log(f"stopped {d} in {time.monotonic() - t0:.1f} s; no process left")
    return 0


def cmd_status(args):
    d = os.path.abspath(args.dir)
    state = read_state(d)
    if not state:
        log(f"no {CLUSTER_JSON} in {d}")
        return 1
    alive = {}
    if state.get("state") != "stopped" and os.path.isdir(state.get("temp_dir", "")):
        alive = cluster_procs(state["temp_dir"], set(state.get("pgids", [])))
    mem = {"Rss:": 0, "Pss:": 0}
    for pid in alive:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(" ", 1)[0]
                if key in mem:
                    mem[key] += int(line.split()[1])
    out = dict(state)
    out["live_processes"] = {str(p): c[:120] for p, c in alive.items()}
    out["rss_mb"] = round(mem["Rss:"] / 1024, 1)  # counts shared pages once per process
    out["pss_mb"] = round(mem["Pss:"] / 1024, 1)  # shared pages split between their users
    if state.get("serve_url") and alive:
        out["healthz"] = http_get(state["serve_url"] + "/-/healthz")[0]
    print(json.dumps(out, indent=2))
    return 0 if alive and out.get("healthz") == 200 else 3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a cluster and deploy its Serve apps")
    s.add_argument("--dir", required=True, help="state dir (cluster.json, ray-start.log, ray-tmp link)")
    s.add_argument("--name", required=True, help="cluster name (x-cluster header)")
    s.add_argument("--version", required=True, help="version the apps report (body and x-version header)")
    s.add_argument("--apps", default="echo=/echo", help="comma-separated name=/route_prefix (default echo=/echo)")
    s.add_argument("--dashboard", action="store_true", help="run the Ray dashboard (for /api/serve/applications/)")
    s.add_argument("--fail-ratio", type=float, default=0.0, help="share of requests that raise (HTTP 500)")
    s.add_argument("--num-cpus", type=int, default=1, help="logical CPUs of the node (replicas use 0)")
    s.add_argument("--object-store-mb", type=int, default=100, help="object store size in MB (Ray's minimum is 78.6, i.e. 75 MiB)")
    s.add_argument("--timeout", type=float, default=120.0, help="bound on the whole start, in seconds")
    s.set_defaults(func=cmd_start)
    t = sub.add_parser("stop", help="stop a cluster: kill all its processes, remove its temp dir")
    t.add_argument("--dir", required=True)
    t.add_argument("--grace", type=float, default=6.0, help="seconds between SIGTERM and SIGKILL")
    t.add_argument("--keep-logs", action="store_true", help="copy Ray's logs to DIR/logs before removing the temp dir")
    t.set_defaults(func=cmd_stop)
    st = sub.add_parser("status", help="print cluster.json with live processes and RSS; exit 0 when serving")
    st.add_argument("--dir", required=True)
    st.set_defaults(func=cmd_status)
    args = p.parse_args()
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
