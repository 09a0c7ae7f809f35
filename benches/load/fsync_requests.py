#!/usr/bin/env python3
"""What one durable state change costs the disk: block requests per 4 KiB write + fdatasync.

Writes a 4 KiB block into a file of already-written blocks (as rayshift's state journal does) and
fdatasyncs it, N times, and reads the disk's counters from /proc/diskstats around the loop:
requests written, sectors written, cache flushes. Two paces: one change every 10 ms (100 a
second, the churn benchmark's rate: the file's modification time changes each time, so the
inode's block is written too) and back to back (many changes within one tick of the kernel's
timestamp clock: the modification time stays, only the data and the flush go out).

    python3 benches/load/fsync_requests.py [--dir DIR] [--count N]

DIR defaults to the current directory; use the directory of the gateway's state file.
"""

import argparse
import os
import time


def disk_of(path: str) -> str:
    """The /proc/diskstats name of the whole disk holding `path` (the kernel counts flushes on
    the whole disk only, not on its partitions)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sys_dev = f"/sys/dev/block/{major}:{minor}"
    if not os.path.exists(sys_dev):
        raise SystemExit(f"{path} is not on a block device ({major}:{minor}): nothing to count")
    if os.path.exists(os.path.join(sys_dev, "partition")):
        # /sys/dev/block/M:m links to .../<disk>/<partition>: the parent is the disk.
        return os.path.basename(os.path.dirname(os.path.realpath(sys_dev)))
    return os.path.basename(os.path.realpath(sys_dev))


def counters(disk: str) -> tuple[int, int, int | None]:
    """(write requests completed, sectors written, flush requests completed or None on kernels
    without the flush columns) of `disk`."""
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == disk:
                flushes = int(fields[18]) if len(fields) > 18 else None
                return int(fields[7]), int(fields[9]), flushes
    raise SystemExit(f"{disk} is not in /proc/diskstats")


def run(path: str, disk: str, count: int, pause: float) -> str:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, b"\0" * (256 * 4096), 0)
        os.fsync(fd)
        block = b"r" * 4096
        before = counters(disk)
        took = 0.0
        for i in range(count):
            start = time.monotonic()
            os.pwrite(fd, block, (i % 256) * 4096)
            os.fdatasync(fd)
            took += time.monotonic() - start
            if pause:
                time.sleep(pause)
        after = counters(disk)
    finally:
        os.close(fd)
        os.unlink(path)
    writes, sectors = after[0] - before[0], after[1] - before[1]
    flushes = "n/a" if after[2] is None else f"{(after[2] - before[2]) / count:.2f}"
    return (
        f"{writes / count:.2f} write requests (flushes included), "
        f"{sectors * 512 / count / 1024:.1f} KiB written, {flushes} flushes, "
        f"{took / count * 1e6:.0f} us in write + fdatasync, per change"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=".", help="directory to write in (default: .)")
    parser.add_argument("--count", type=int, default=300, help="changes per pace (default 300)")
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be 1 or more")
    path = os.path.join(args.dir, f".fsync-requests-{os.getpid()}")
    disk = disk_of(args.dir)
    print(f"disk {disk}, file in {os.path.abspath(args.dir)}")
    print("one change every 10 ms:", run(path, disk, args.count, 0.010))
    print("back to back:          ", run(path, disk, args.count, 0.0))


if __name__ == "__main__":
    main()
