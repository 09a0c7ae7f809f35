#!/usr/bin/env bash
# Load benchmark of rayshift against a direct connection, nginx and HAProxy (issue 5).
#
#   benches/load/run.sh            # full run: 10 s per run, 3 rounds (about 12 minutes)
#   benches/load/run.sh --quick    # smoke test: 3 s per run, 1 round (about 2 minutes)
#   benches/load/run.sh --help     # every option (passed on to bench.py)
#   benches/load/run.sh --syscalls --kprofile 10 --callgrind 10   # the full run with its diagnostics
#   benches/load/run.sh --pgo      # rayshift built with scripts/build-pgo, next to the plain release build
#
# What it does: installs wrk, nginx and haproxy (Debian packages) if missing, builds rayshift
# (cargo build --release), then runs benches/load/bench.py, which starts a 1-worker nginx backend,
# the three proxies, and wrk, pinned to cores (wrk on core 0; backend and proxy under test on core 1),
# and prints a markdown table that is also written to benches/load/results/<timestamp>.md.
# See benches/load/README.md for the method. Everything it starts is stopped when it exits.
#
# Environment: RAYSHIFT_BIN=path skips rayshift's build and benchmarks that binary.
#              BENCH_CHURN_BIN=path: the churner (default: crates/churn, built here).
#              BENCH_FLOOR_BIN=path: crates/floor's relays for the floor-* targets (built here when asked for).
#              BENCH_RESULTS=dir writes the report there instead of benches/load/results.
#              BENCH_NO_INSTALL=1 never calls apt-get (fails if a tool is missing).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

pgo=""
args=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) exec python3 "$here/bench.py" --help ;;
    # --pgo: rayshift is the profile-guided build (target rayshift) and the plain release build
    # runs beside it in the same rounds (target rayshift-alt).
    --pgo) pgo=1 ;;
    *) args+=("$arg") ;;
  esac
done
set -- ${args[@]+"${args[@]}"}

if [ "$(nproc)" -lt 2 ]; then
  echo "run.sh: needs at least 2 cores (wrk on core 0, proxy and backend on core 1)" >&2
  exit 1
fi

# --- tools -------------------------------------------------------------------------------------
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing+=(nginx)
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
case " $* " in *" --callgrind"*) command -v valgrind >/dev/null 2>&1 || missing+=(valgrind) ;; esac
case " $* " in *" --syscalls "*|*" --perf"*|*" --kprofile"*) command -v perf >/dev/null 2>&1 || missing+=(linux-perf) ;; esac
if [ "${#missing[@]}" -gt 0 ]; then
  if [ -n "${BENCH_NO_INSTALL:-}" ]; then
    echo "run.sh: missing: ${missing[*]} (BENCH_NO_INSTALL is set)" >&2
    exit 1
  fi
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "run.sh: installing ${missing[*]}" >&2
  # Keep the packages' own services (nginx and haproxy on port 80 and the like) from starting:
  # the benchmark runs its own instances with its own configs.
  policy_created=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    policy_created=1
  fi
  rc=0
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"; } || rc=$?
  [ -z "$policy_created" ] || $sudo rm -f /usr/sbin/policy-rc.d
  [ "$rc" -eq 0 ] || { echo "run.sh: apt-get failed" >&2; exit 1; }
fi

# --- rayshift ----------------------------------------------------------------------------------
if [ -n "$pgo" ]; then
  [ -z "${RAYSHIFT_BIN:-}" ] || { echo "run.sh: --pgo builds both binaries itself; unset RAYSHIFT_BIN" >&2; exit 1; }
  case " $* " in *" --compare"*) echo "run.sh: --pgo compares with the plain build itself; drop --compare" >&2; exit 1 ;; esac
  echo "run.sh: cargo build --release --bin rayshift, then scripts/build-pgo" >&2
  (cd "$repo" && cargo build --release --bin rayshift && scripts/build-pgo)
  RAYSHIFT_BIN="$repo/target/release-pgo/rayshift"
  set -- "$@" --compare "$repo/target/release/rayshift"
elif [ -z "${RAYSHIFT_BIN:-}" ]; then
  echo "run.sh: cargo build --release --bin rayshift" >&2
  (cd "$repo" && cargo build --release --bin rayshift)
  RAYSHIFT_BIN="$repo/target/release/rayshift"
fi
[ -x "$RAYSHIFT_BIN" ] || { echo "run.sh: no rayshift binary at $RAYSHIFT_BIN" >&2; exit 1; }
# The churner (crates/churn, seconds to build), built whatever RAYSHIFT_BIN names: it runs on wrk's
# core, so it is native and lean (the Python one it replaced took 4-5% of that core at 100 changes
# a second).
if [ -z "${BENCH_CHURN_BIN:-}" ]; then
  echo "run.sh: cargo build --release -p churn" >&2
  (cd "$repo" && cargo build --release -p churn)
  export BENCH_CHURN_BIN="${CARGO_TARGET_DIR:-$repo/target}/release/churn"
fi
[ -x "$BENCH_CHURN_BIN" ] || { echo "run.sh: no churner at $BENCH_CHURN_BIN" >&2; exit 1; }
# crates/floor's minimal relays, only when a floor-* target is asked for.
case " $* " in
  *floor-*)
    if [ -z "${BENCH_FLOOR_BIN:-}" ]; then
      echo "run.sh: cargo build --release -p floor" >&2
      (cd "$repo" && cargo build --release -p floor)
      export BENCH_FLOOR_BIN="${CARGO_TARGET_DIR:-$repo/target}/release/floor"
    fi
    ;;
esac

# --- run ---------------------------------------------------------------------------------------
# 1,000 idle client connections plus the proxies' upstream connections need more descriptors than
# the usual soft limit of 1,024.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work="$(mktemp -d "${TMPDIR:-/tmp}/rayshift-load.XXXXXX")"
cleanup() {
  # bench.py stops what it started; this is the safety net if it was killed. Each process it
  # starts is recorded in $work/pids/<name>.pid (by id, never by name).
  if [ -d "$work/pids" ]; then
    for f in "$work"/pids/*.pid; do
      [ -e "$f" ] || continue
      pid="$(cat "$f" 2>/dev/null || true)"
      [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 0.5
    for f in "$work"/pids/*.pid; do
      [ -e "$f" ] || continue
      pid="$(cat "$f" 2>/dev/null || true)"
      [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 "$here/bench.py" --work "$work" --rayshift "$RAYSHIFT_BIN" --results "${BENCH_RESULTS:-$here/results}" "$@"
