#!/usr/bin/env python3
"""A/B of the table-swap cost of two rayshift builds, measured in the same rounds.

    python3 benches/load/churn_ab.py A_BINARY B_BINARY [--rounds 6] [--duration 6] [--pattern same]

Starts the benchmark's nginx backend and one churn gateway per build (two clusters, all weight on
`a`; cores as in bench.py), then, round by round with the order alternating, measures each gateway
steady and while the churner (crates/churn) swaps its weights 100 times a second. Prints per
build the median req/s steady and under churn, the median of the paired per-round changes, and the
CPU each request costs more under churn. Run benches/load/run.sh once first: it installs wrk and
nginx and builds the churner.
"""
import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="churn_ab.py")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=6)
    ap.add_argument("--pattern", choices=["flip", "same"], default="same")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="rayshift-churn-ab.")
    results = Path(__file__).resolve().parent / "results"
    args = bench.parse_args(["--work", work, "--rayshift", a.a, "--results", str(results), "--targets", "rayshift"])
    b = bench.Bench(args)
    builds = {"A": a.a, "B": a.b}
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        b.start_backend()
        for k, binary in builds.items():
            b.start_rayshift(f"gw{k}", [("a", b.ports["backend"], 100), ("b", b.ports["backend2"], 0)], binary)
        for rnd in range(a.rounds):
            for k in (["A", "B"] if rnd % 2 else ["B", "A"]):
                # churn_run and measure_once drive "rayshift-churn": point it at this build's gateway.
                b.ports["rayshift-churn"], b.ports["rayshift-churn-admin"] = b.ports[f"gw{k}"], b.ports[f"gw{k}-admin"]
                b.pids["rayshift-churn"] = b.pids[f"gw{k}"]
                for kind in (["steady", "churn"] if rnd % 2 else ["churn", "steady"]):
                    if kind == "steady":
                        r = b.measure_once("rayshift-churn", "small-c64", rnd, a.duration, f"{k} steady", None)
                    else:
                        r = b.churn_run(rnd, a.duration, f"{k} churn", a.pattern)
                    runs.setdefault((k, kind), []).append(r)
        print(f"\n{a.pattern} churn, {a.rounds} rounds of {a.duration:g} s")
        for k, binary in builds.items():
            steady, churn = runs[(k, "steady")], runs[(k, "churn")]
            s = statistics.median(r["rps"] for r in steady)
            c = statistics.median(r["rps"] for r in churn)
            paired = statistics.median(100 * (x["rps"] / y["rps"] - 1) for x, y in zip(churn, steady))
            cs = statistics.median(r["cpu_us"] for r in steady)
            cc = statistics.median(r["cpu_us"] for r in churn)
            print(f"{k} ({binary}): steady {s:,.0f} req/s, churn {c:,.0f} ({100 * (c / s - 1):+.1f}%, "
                  f"paired median {paired:+.1f}%); CPU/request {cs:.2f} -> {cc:.2f} us ({cc - cs:+.2f})")
    finally:
        b.procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
