#!/usr/bin/env python3
"""What 100 durable writes a second cost the proxy core, with and without rayshift.

    python3 benches/load/churn_floor.py [--rayshift BIN] [--rounds 8] [--duration 5] [--rate 100]

Starts the benchmark's nginx backend and the churn gateway (two clusters, all weight on `a`; cores
as in bench.py), then measures its 64-connection throughput, round by round with the order of the
runs rotating:

  steady                 no admin requests, nothing written
  rayshift flip          the churner moves the split 100/0 <-> 0/100 through the admin API
  rayshift same split    the churner sets 100/0 each time (table rebuilt, persisted, published)
  fsync, proxy core      no admin requests; a separate process on the proxy's core writes a 4 KiB
                         block and fdatasyncs it, --rate times a second (what a durable change
                         costs without rayshift)
  fsync, load core       the same process on the load generator's core
  write, proxy core      the same process on the proxy's core, page cache only (no fdatasync): the
                         cost of its own wake-ups
  steady, state in tmpfs and rayshift flip / same split, state in tmpfs
                         the same three runs through a second churn gateway whose state file is
                         in --memory-dir (tmpfs: every change written, none reaches a disk), their
                         changes taken against that gateway's own steady run: what a swap costs
                         rayshift without the durable write

and prints, per kind, the median of the per-round changes against steady and the proxy's and the
backend's CPU per request. The files it writes are in the same directory (so on the same
filesystem) as the first gateway's state file. Run benches/load/run.sh once first: it installs wrk
and nginx and builds rayshift.
"""
import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

MEM = ", state in tmpfs"
KINDS = ["steady", "rayshift flip", "rayshift same split", "fsync, proxy core", "fsync, load core",
         "write, proxy core", "steady" + MEM, "rayshift flip" + MEM, "rayshift same split" + MEM]


def tmpfs_dir(mount: str, prog: str) -> Path:
    """A new directory under `mount`, which must be a tmpfs mount point (else exits naming it)."""
    with open("/proc/mounts") as f:
        mounts = {line.split()[1] for line in f if line.split()[2] == "tmpfs"}
    if mount not in mounts:
        sys.exit(f"{prog}: --memory-dir {mount} is not a tmpfs mount point (see /proc/mounts)")
    return Path(tempfile.mkdtemp(prefix=f"rayshift-{prog.removesuffix('.py')}.", dir=mount))


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(prog="churn_floor.py")
    ap.add_argument("--rayshift", default=str(here.parent.parent / "target" / "release" / "rayshift"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--rate", type=float, default=100, help="changes (or writes) per second")
    ap.add_argument("--memory-dir", default="/dev/shm",
                    help="a tmpfs mount for the second gateway's state file (default /dev/shm)")
    a = ap.parse_args()
    mem = tmpfs_dir(a.memory_dir, "churn_floor.py")
    work = tempfile.mkdtemp(prefix="rayshift-churn-floor.")
    args = bench.parse_args(["--work", work, "--rayshift", a.rayshift, "--results", str(here / "results"),
                             "--targets", "rayshift", "--churn-rate", str(a.rate)])
    b = bench.Bench(args)
    runs: dict[str, list[dict]] = {k: [] for k in KINDS}
    try:
        b.start_backend()
        b.start_churn_gateway()
        b.start_churn_gateway("rayshift-churn-mem", mem)
        b.measure_once("rayshift-churn", "small-c64", 0, 2, None, None)
        b.measure_once("rayshift-churn-mem", "small-c64", 0, 2, None, None)
        for rnd in range(1, a.rounds + 1):
            k = (rnd - 1) % len(KINDS)
            for kind in KINDS[k:] + KINDS[:k]:
                target = "rayshift-churn-mem" if kind.endswith(MEM) else "rayshift-churn"
                if kind.startswith("steady"):
                    r = b.measure_once(target, "small-c64", rnd, a.duration, kind, None)
                elif kind.startswith("rayshift"):
                    pattern = "flip" if kind.removesuffix(MEM).endswith("flip") else "same"
                    r = b.churn_run(rnd, a.duration, kind, pattern, target)
                else:
                    r = writer_run(b, a, rnd, kind)
                runs[kind].append(r)
        print(f"\n{a.rounds} rounds of {a.duration:g} s, {a.rate:g} changes or writes a second; "
              f"work dir (state file and written files) {work}, tmpfs state dir {mem}\n")
        print("| run | req/s | change (paired median) | per round | proxy CPU/request | backend CPU/request |")
        print("|---|---|---|---|---|---|")
        for kind in KINDS:
            rows = runs[kind]
            steady = runs["steady" + MEM if kind.endswith(MEM) else "steady"]
            rel = [100 * (r["rps"] / s["rps"] - 1) for r, s in zip(rows, steady)]
            print(f"| {kind} | {statistics.median(r['rps'] for r in rows):,.0f} | "
                  f"{statistics.median(rel):+.1f}% | {', '.join(f'{x:+.0f}' for x in rel)} | "
                  f"{statistics.median(r['cpu_us'] for r in rows):.2f} us | "
                  f"{statistics.median(r['backend_cpu_us'] for r in rows):.2f} us |")
    finally:
        b.procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(mem, ignore_errors=True)


def writer_run(b: bench.Bench, a, rnd: int, kind: str) -> dict:
    """One steady run through the churn gateway while `bench.py fsync` writes on a core."""
    cpu = b.args.proxy_cpu if "proxy core" in kind else b.args.load_cpu
    argv = [sys.executable, bench.__file__, "fsync", "--path", str(b.work / "fsync.bin"), "--rate", str(a.rate),
            *(["--no-sync"] if kind.startswith("write") else [])]
    r, stats = b.run_alongside("fsync", argv, cpu, "rayshift-churn", rnd, a.duration, kind)
    bench.log(f"  {kind}: {stats['writes']} writes, {stats['rate']:.1f}/s")
    r["writes_per_s"] = stats["rate"]
    return r

if __name__ == "__main__":
    main()
