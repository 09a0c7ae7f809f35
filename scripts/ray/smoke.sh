#!/usr/bin/env bash
# End-to-end smoke check of the local Ray Serve cluster set-up (about 2 minutes, ~2.5 GB RAM at peak):
# install, two clusters side by side (v1: echo=/echo,extra=/extra; v2: --dashboard, echo=/echo),
# their endpoints, 500 requests each, a third cluster with --fail-ratio 0.2 (expects exactly 100 of
# 500 to be 500s), memory per cluster, then stops everything and checks that no process is left.
#
#   scripts/ray/smoke.sh [WORKDIR]      # WORKDIR defaults to a fresh /tmp/rs-smoke.XXXXXX
#
# Exits non-zero on the first failed check; the clusters are stopped in every case.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY="$(scripts/ray/install.sh | tail -n1)"
W="${1:-$(mktemp -d /tmp/rs-smoke.XXXXXX)}"
mkdir -p "$W"
CLUSTER=(tests/ray/cluster.py)
CLUSTERS=(v1 v2 v3)

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'smoke: FAILED: %s\n' "$*" >&2; exit 1; }
field() { "$PY" -c 'import json,sys; v=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v=v[k]
print(v)' "$W/$1/cluster.json" "$2"; }

temp_dirs=()
cleanup() {
  local rc=$?
  for c in "${CLUSTERS[@]}"; do
    [ -f "$W/$c/cluster.json" ] && "$PY" "${CLUSTER[@]}" stop --dir "$W/$c" >&2 || rc=1
  done
  for t in "${temp_dirs[@]}"; do
    if pgrep -f "$t" >/dev/null; then
      echo "smoke: processes left under $t:" >&2; pgrep -af "$t" >&2; rc=1
    fi
    [ ! -e "$t" ] || { echo "smoke: $t not removed" >&2; rc=1; }
  done
  [ $rc -eq 0 ] && say "OK (work dir $W)"
  exit $rc
}
trap cleanup EXIT

start() {  # start NAME ARGS...
  local c=$1; shift
  local s e
  s=$(date +%s.%N)
  "$PY" "${CLUSTER[@]}" start --dir "$W/$c" --name "$c" --version "$c" "$@" >"$W/$c.json" 2>"$W/$c.log" \
    || { cat "$W/$c.log" >&2; die "start $c"; }
  e=$(date +%s.%N)
  temp_dirs+=("$(field "$c" temp_dir)")
  printf '%s: started in %.1f s (ray start %s s, deploy %s s), serve %s\n' "$c" "$(echo "$e - $s" | bc)" \
    "$(field "$c" timings_s.ray_start)" "$(field "$c" timings_s.deploy)" "$(field "$c" serve_url)" >&2
}

expect() {  # expect DESCRIPTION EXPECTED ACTUAL
  [ "$2" = "$3" ] || die "$1: expected '$2', got '$3'"
  echo "ok: $1" >&2
}

say "start v1 and v2"
start v1 --apps echo=/echo,extra=/extra
start v2 --apps echo=/echo --dashboard
S1=$(field v1 serve_url); S2=$(field v2 serve_url); D2=$(field v2 dashboard_url)
expect "v1 has no dashboard" None "$(field v1 dashboard_url)"

say "endpoints"
expect "v1 healthz" "200 success" "$(curl -s -w '%{http_code}' -o "$W/body" "$S1/-/healthz") $(cat "$W/body")"
expect "v2 healthz" 200 "$(curl -s -o /dev/null -w '%{http_code}' "$S2/-/healthz")"
expect "v1 routes" '{"/echo":"echo","/extra":"extra"}' "$(curl -s "$S1/-/routes")"
expect "v2 routes" '{"/echo":"echo"}' "$(curl -s "$S2/-/routes")"
expect "v1 /echo body" "v1 echo" "$(curl -s "$S1/echo")"
expect "v1 /extra/a/b body" "v1 extra" "$(curl -s "$S1/extra/a/b")"
expect "v2 POST /echo/x body" "v2 echo" "$(curl -s -X POST --data hello "$S2/echo/x")"
expect "v2 x-version header" "x-version: v2" "$(curl -s -D - -o /dev/null "$S2/echo" | tr -d '\r' | grep -i '^x-version:')"
expect "v1 POST body length seen" "x-body-len: 5" "$(curl -s -D - -o /dev/null --data hello "$S1/echo" | tr -d '\r' | grep -i '^x-body-len:')"
expect "v1 unknown prefix" 404 "$(curl -s -o /dev/null -w '%{http_code}' "$S1/echoes")"
expect "v2 dashboard: echo RUNNING" RUNNING "$(curl -s "$D2/api/serve/applications/" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["applications"]["echo"]["status"])')"

say "load: 500 requests, 8 connections"
for c in v1 v2; do
  out=$("$PY" tests/ray/load.py "$(field $c serve_url)/echo/load" -n 500 -c 8)
  echo "$c: $out" >&2
  expect "$c: 500 x 200" '{"200": 500}' "$("$PY" -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])["statuses"]))' "$out")"
done

say "start v3 with --fail-ratio 0.2"
start v3 --apps echo=/echo --fail-ratio 0.2
out=$("$PY" tests/ray/load.py "$(field v3 serve_url)/echo" -n 500 -c 8)
echo "v3: $out" >&2
expect "v3: 400 x 200, 100 x 500" '{"200": 400, "500": 100}' "$("$PY" -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])["statuses"]))' "$out")"

say "memory"
for c in "${CLUSTERS[@]}"; do
  "$PY" "${CLUSTER[@]}" status --dir "$W/$c" | "$PY" -c 'import json,sys; d=json.load(sys.stdin)
print("%s: %d processes, RSS %s MB, PSS %s MB" % (d["name"], len(d["live_processes"]), d["rss_mb"], d["pss_mb"]))' >&2
done

say "stop (checked on exit)"
