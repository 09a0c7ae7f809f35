#!/usr/bin/env python3
"""CPU a weight change costs an idle gateway, by thread, with its state file on disk and on tmpfs.

    python3 benches/load/swap_cost.py [--rayshift BIN] [--rounds 3] [--duration 10] [--rate 100]
                                      [--pattern same|flip] [--memory-dir /dev/shm] [--idle-core]

Starts the benchmark's nginx backend and, in turn, a churn gateway (two clusters, all weight on
`a`, cores as in bench.py) with its state file in the work directory (this machine's disk) and one
with it in --memory-dir (tmpfs), sends --rate weight PUTs a second to each for --duration seconds
with no client load, and prints the gateway's CPU time per accepted change (the time every thread
ran, in nanoseconds from /proc/PID/task/*/schedstat, divided by the changes): in total and per
thread (the main thread runs the admin API, the control task and the proxy; `rayshift-state`
writes the state). A spinner at the lowest priority keeps the proxy core busy, as client load
does (`--idle-core`: not; each change then also pays this VM's wake-ups from halt). The gateways
are started afresh each round and the two kinds alternate, so drift hits both alike. Without load
the figures are far steadier than churn under load, where rounds scatter by more than a swap costs.
Run benches/load/run.sh once first: it installs nginx and builds rayshift and the churner.
"""
import argparse
import json
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from churn_floor import tmpfs_dir  # noqa: E402


def one_run(b: bench.Bench, state_dir: Path, a) -> tuple[float, dict[str, float], dict]:
    """Starts a churn gateway with its state in `state_dir`, churns it, stops it."""
    b.start_churn_gateway("gateway", state_dir)
    try:
        pid = b.pids["gateway"][0]
        time.sleep(1)  # first probes, first table
        out = b.work / "churn.out"
        churner = b.procs.start("churn", b.churner_argv("--admin", str(b.ports["gateway-admin"]), "--pattern", a.pattern),
                                b.args.load_cpu, stdout=out)
        try:
            bench.wait_for("churn", lambda: "CHURN started" in out.read_text())
            before = bench.thread_run_seconds(pid)
            time.sleep(a.duration)
            after = bench.thread_run_seconds(pid)
            churner.send_signal(signal.SIGTERM)
            churner.wait(timeout=15)
        finally:
            b.procs.stop("churn")
        stats = json.loads(re.findall(r"^CHURNJSON (.*)$", out.read_text(), re.M)[-1])
        out.unlink()
        if stats["failed"]:
            raise RuntimeError(f"{stats['failed']} weight changes failed: {stats.get('errors')}")
        changes = stats["rate"] * a.duration
        per_thread = {k: 1e6 * (after[k] - before.get(k, 0.0)) / changes for k in after}
        return sum(per_thread.values()), per_thread, stats
    finally:
        b.procs.stop("gateway")
        del b.pids["gateway"]


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(prog="swap_cost.py")
    ap.add_argument("--rayshift", default=str(here.parent.parent / "target" / "release" / "rayshift"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--rate", type=float, default=100, help="weight changes per second")
    ap.add_argument("--pattern", choices=["same", "flip"], default="same")
    ap.add_argument("--memory-dir", default="/dev/shm", help="a tmpfs mount (default /dev/shm)")
    ap.add_argument("--idle-core", action="store_true",
                    help="leave the proxy core idle between changes (each change then also pays this VM's "
                         "wake-ups from halt, which a core busy with client load does not)")
    a = ap.parse_args()
    mem = tmpfs_dir(a.memory_dir, "swap_cost.py")
    work = Path(tempfile.mkdtemp(prefix="rayshift-swap-cost."))
    args = bench.parse_args(["--work", str(work), "--rayshift", a.rayshift, "--results", str(here / "results"),
                             "--targets", "rayshift", "--churn-rate", str(a.rate)])
    b = bench.Bench(args)
    kinds = {"disk": work, "tmpfs": mem}
    totals: dict[str, list[float]] = {k: [] for k in kinds}
    threads: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    try:
        b.start_backend()
        if not a.idle_core:
            b.start_spinner()
        for rnd in range(1, a.rounds + 1):
            order = list(kinds) if rnd % 2 else list(reversed(kinds))
            for kind in order:
                total, per_thread, stats = one_run(b, kinds[kind], a)
                totals[kind].append(total)
                for name, us in per_thread.items():
                    threads[kind].setdefault(name, []).append(us)
                bench.log(f"round {rnd} {kind}: {stats['ok']} changes, {stats['rate']:.1f}/s, "
                          f"PUT p50 {stats['p50_ms']:.2f} ms; {total:.0f} us of CPU per change")
        core = "proxy core idle between changes" if a.idle_core else "proxy core kept busy by a lowest-priority spinner"
        print(f"\n{a.rounds} rounds of {a.duration:g} s, {a.rate:g} `{a.pattern}` changes a second, no client load, "
              f"{core}; medians per accepted change\n")
        names = sorted({n for k in kinds for n in threads[k]})
        print("| state file on | CPU per change | " + " | ".join(f"thread `{n}`" for n in names) + " |")
        print("|---|---|" + "---|" * len(names))
        for kind in kinds:
            cells = [f"{statistics.median(threads[kind][n]):.0f} us" if n in threads[kind] else "-" for n in names]
            print(f"| {kind} | {statistics.median(totals[kind]):.0f} us | " + " | ".join(cells) + " |")
    finally:
        b.procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(mem, ignore_errors=True)


if __name__ == "__main__":
    main()
