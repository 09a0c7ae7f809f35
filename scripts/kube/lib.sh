# Shared by scripts/kube/start.sh, stop.sh and restart.sh. Not meant to be run on its own.
# shellcheck shell=bash

KUBE_VERSION=v1.20.2
KUBE_CACHE="${RAYSHIFT_CACHE:-$HOME/.cache/rayshift}/kube"
KUBE_APISERVER_BIN="${KUBE_APISERVER_BIN:-$KUBE_CACHE/bin/kube-apiserver-$KUBE_VERSION}"
ETCD_BIN="${ETCD_BIN:-$(command -v etcd || true)}"
READY_TIMEOUT="${RAYSHIFT_KUBE_READY_TIMEOUT:-60}"   # seconds, for /readyz and etcd /health
# Seconds from SIGTERM to SIGKILL. kube-apiserver 1.20 waits for open watches on SIGTERM (up to
# 60 s), so a graceful stop with a watching client takes this long.
STOP_TIMEOUT="${RAYSHIFT_KUBE_STOP_TIMEOUT:-10}"

SCRIPT_NAME="$(basename "$0")"
now_ms() { local t=${EPOCHREALTIME/./}; echo $(( t / 1000 )); }
T0_MS=$(now_ms)
elapsed() { local d=$(( $(now_ms) - T0_MS )); printf '%d.%03d' $(( d / 1000 )) $(( d % 1000 )); }
log() { printf '[kube/%s %6ss] %s\n' "$SCRIPT_NAME" "$(elapsed)" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }

# Sets KDIR to the absolute form of $1 (creating it when $2 is "create").
resolve_dir() {
  local d="${1:-}"
  [ -n "$d" ] || die "usage: $SCRIPT_NAME DIR ..."
  if [ "${2:-}" = "create" ]; then
    mkdir -p "$d" || die "cannot create $d"
  fi
  [ -d "$d" ] || die "$d is not a directory"
  KDIR=$(cd "$d" && pwd -P)
  # DIR/env is KEY=VALUE without quoting: keep paths to characters that need none.
  [[ "$KDIR" =~ ^[A-Za-z0-9_./+@:,-]+$ ]] || die "DIR '$KDIR' may only contain [A-Za-z0-9_./+@:,-] (it goes unquoted into DIR/env)"
}

# env_get KEY -> value from $KDIR/env (empty if absent).
env_get() {
  [ -f "$KDIR/env" ] || return 0
  sed -n "s/^$1=//p" "$KDIR/env" | tail -n 1
}

# Free TCP ports on 127.0.0.1, chosen below the kernel's ephemeral range so that outgoing
# connections cannot take them between a stop and a restart.
free_ports() {
  python3 - "$1" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
try:
    lo = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except Exception:
    lo = 32768
hi = max(lo - 1, 12000)
cands = list(range(10000, hi))
random.shuffle(cands)
held, ports = [], []
for p in cands:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        s.close()
        continue
    held.append(s)
    ports.append(p)
    if len(ports) == n:
        break
for s in held:
    s.close()
if len(ports) < n:
    sys.exit("no free ports")
print(" ".join(map(str, ports)))
EOF
}

port_free() {
  python3 -c 'import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try: s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError: sys.exit(1)' "$1"
}

# wait_port_free PORT: waits up to 10 s for PORT to be free. A process stop_group saw stop may hold
# its port a moment longer: a killed multi-threaded process (Go) shows as a zombie once its main
# thread is gone while its other threads, which share its sockets, are still exiting, and the
# connections it had are closed by the kernel after it.
wait_port_free() {
  local i
  for (( i = 0; i < 100; i++ )); do
    port_free "$1" && return 0
    sleep 0.1
  done
  return 1
}

# proc_state_pgrp PID -> "STATE PGRP" of a process (STATE Z for a zombie); fails if gone.
proc_state_pgrp() {
  local stat st _ppid pgrp _rest
  { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  stat=${stat##*) }
  read -r st _ppid pgrp _rest <<<"$stat"
  echo "$st $pgrp"
}

# Is PID one of ours (alive, not a zombie, and its command line names $KDIR)?
is_ours() {
  local pid="$1" sp
  [ -n "$pid" ] || return 1
  sp=$(proc_state_pgrp "$pid") || return 1
  [ "${sp%% *}" != "Z" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$KDIR/"
}

# Live (non-zombie) processes in process group $1. Uses only builtins (no fork per process).
group_members() {
  local pg="$1" f s st _ppid pgrp _rest
  for f in /proc/[0-9]*/stat; do
    { read -r s <"$f"; } 2>/dev/null || continue
    s=${s##*) }
    read -r st _ppid pgrp _rest <<<"$s"
    if [ "$pgrp" = "$pg" ] && [ "$st" != "Z" ]; then
      f=${f#/proc/}
      echo "${f%/stat}"
    fi
  done
}

# stop_group NAME PID [SIGNAL]: signal the whole process group, wait, then SIGKILL.
stop_group() {
  local name="$1" pid="$2" sig="${3:-TERM}" i
  if ! is_ours "$pid"; then
    log "$name: not running (pid ${pid:-none})"
    return 0
  fi
  log "$name: SIG$sig to process group $pid"
  kill "-$sig" -- "-$pid" 2>/dev/null || true
  local deadline=$(( $(now_ms) + STOP_TIMEOUT * 1000 ))
  while [ "$(now_ms)" -lt "$deadline" ]; do
    [ -n "$(group_members "$pid")" ] || { log "$name: stopped"; return 0; }
    sleep 0.1
  done
  log "$name: still alive after ${STOP_TIMEOUT}s; SIGKILL to process group $pid"
  kill -KILL -- "-$pid" 2>/dev/null || true
  for (( i = 0; i < 50; i++ )); do
    [ -n "$(group_members "$pid")" ] || { log "$name: killed"; return 0; }
    sleep 0.1
  done
  die "$name: process group $pid survived SIGKILL: $(group_members "$pid" | tr '\n' ' ')"
}

# spawn LOGFILE CMD...: runs CMD in a new session (its own process group) and sets SPAWNED_PID,
# which is also the process group id. Requires a shell without job control (scripts have none).
spawn() {
  local logfile="$1" i sp
  shift
  printf '\n==== %s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$logfile"
  setsid "$@" >>"$logfile" 2>&1 </dev/null &
  SPAWNED_PID=$!
  disown "$SPAWNED_PID" 2>/dev/null || true   # no "Killed" job notices from this shell
  # setsid() runs in the child before exec; wait until it has.
  for (( i = 0; i < 50; i++ )); do
    sp=$(proc_state_pgrp "$SPAWNED_PID") || break
    [ "${sp##* }" = "$SPAWNED_PID" ] && return 0
    sleep 0.02
  done
  sp=$(proc_state_pgrp "$SPAWNED_PID") || { tail -n 30 "$logfile" >&2; die "$1 exited at once (log: $logfile)"; }
  die "$1 (pid $SPAWNED_PID) did not become its own process group leader ($sp)"
}

start_etcd() {
  { [ -n "$ETCD_BIN" ] && [ -x "$ETCD_BIN" ]; } || die "etcd not found (run scripts/kube/install.sh, or set ETCD_BIN)"
  wait_port_free "$ETCD_PORT" || die "etcd client port $ETCD_PORT on 127.0.0.1 is in use"
  wait_port_free "$ETCD_PEER_PORT" || die "etcd peer port $ETCD_PEER_PORT on 127.0.0.1 is in use"
  mkdir -p "$KDIR/etcd" "$KDIR/logs"
  chmod 700 "$KDIR/etcd"
  local t
  t=$(now_ms)
  spawn "$KDIR/logs/etcd.log" "$ETCD_BIN" \
    --name rayshift \
    --data-dir "$KDIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "rayshift=http://127.0.0.1:$ETCD_PEER_PORT" \
    --logger zap --log-outputs stderr
  ETCD_PID=$SPAWNED_PID
  local deadline=$(( t + READY_TIMEOUT * 1000 ))
  while [ "$(now_ms)" -lt "$deadline" ]; do
    is_ours "$ETCD_PID" || { tail -n 30 "$KDIR/logs/etcd.log" >&2; die "etcd exited (log: $KDIR/logs/etcd.log)"; }
    if curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'; then
      log "etcd ready on 127.0.0.1:$ETCD_PORT (pid $ETCD_PID) in $(( $(now_ms) - t )) ms"
      return 0
    fi
    sleep 0.1
  done
  tail -n 30 "$KDIR/logs/etcd.log" >&2
  die "etcd not healthy after ${READY_TIMEOUT}s (log: $KDIR/logs/etcd.log)"
}

# wait_readyz: bounded wait for https://127.0.0.1:$APISERVER_PORT/readyz == ok.
wait_readyz() {
  local t="$1" body=""
  local deadline=$(( t + READY_TIMEOUT * 1000 ))
  while [ "$(now_ms)" -lt "$deadline" ]; do
    if [ -n "${APISERVER_PID:-}" ] && ! is_ours "$APISERVER_PID"; then
      tail -n 40 "$KDIR/logs/kube-apiserver.log" >&2
      die "kube-apiserver exited (log: $KDIR/logs/kube-apiserver.log)"
    fi
    body=$(curl -sS --max-time 2 --cacert "$KDIR/pki/ca.crt" -H "Authorization: Bearer $APISERVER_TOKEN" \
      "https://127.0.0.1:$APISERVER_PORT/readyz" 2>/dev/null || true)
    if [ "$body" = "ok" ]; then
      log "kube-apiserver ready on https://127.0.0.1:$APISERVER_PORT (pid $APISERVER_PID) in $(( $(now_ms) - t )) ms"
      return 0
    fi
    sleep 0.2
  done
  tail -n 40 "$KDIR/logs/kube-apiserver.log" >&2
  die "kube-apiserver /readyz not ok after ${READY_TIMEOUT}s (last answer: ${body:-none}; log: $KDIR/logs/kube-apiserver.log)"
}

start_apiserver() {
  [ -x "$KUBE_APISERVER_BIN" ] || die "$KUBE_APISERVER_BIN not found: run scripts/kube/install.sh first (or set KUBE_APISERVER_BIN)"
  wait_port_free "$APISERVER_PORT" || die "kube-apiserver port $APISERVER_PORT on 127.0.0.1 is in use"
  mkdir -p "$KDIR/logs"
  local t
  t=$(now_ms)
  spawn "$KDIR/logs/kube-apiserver.log" "$KUBE_APISERVER_BIN" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 \
    --secure-port "$APISERVER_PORT" \
    --advertise-address 127.0.0.1 \
    --cert-dir "$KDIR/pki" \
    --tls-cert-file "$KDIR/pki/apiserver.crt" \
    --tls-private-key-file "$KDIR/pki/apiserver.key" \
    --token-auth-file "$KDIR/tokens.csv" \
    --authorization-mode RBAC \
    --service-account-key-file "$KDIR/pki/sa.pub" \
    --service-account-signing-key-file "$KDIR/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-cluster-ip-range 10.0.0.0/24 \
    --endpoint-reconciler-type none \
    --disable-admission-plugins ServiceAccount
  APISERVER_PID=$SPAWNED_PID
  wait_readyz "$t"
}

write_state() {
  local tmp="$KDIR/.env.tmp"
  cat >"$tmp" <<EOF
RAYSHIFT_KUBE_DIR=$KDIR
KUBECONFIG=$KDIR/kubeconfig
APISERVER_URL=https://127.0.0.1:$APISERVER_PORT
APISERVER_PORT=$APISERVER_PORT
APISERVER_TOKEN=$APISERVER_TOKEN
APISERVER_CA_FILE=$KDIR/pki/ca.crt
APISERVER_PID=$APISERVER_PID
ETCD_URL=http://127.0.0.1:$ETCD_PORT
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
ETCD_PID=$ETCD_PID
KUBE_APISERVER_BIN=$KUBE_APISERVER_BIN
KUBE_VERSION=$KUBE_VERSION
EOF
  chmod 600 "$tmp"
  mv -f "$tmp" "$KDIR/env"
  printf '%s\n%s\n' "$ETCD_PID" "$APISERVER_PID" >"$KDIR/.pids.tmp"
  mv -f "$KDIR/.pids.tmp" "$KDIR/pids"
}

load_state() {
  [ -f "$KDIR/env" ] || die "$KDIR/env not found: start the cluster with scripts/kube/start.sh $KDIR"
  APISERVER_PORT=$(env_get APISERVER_PORT)
  APISERVER_TOKEN=$(env_get APISERVER_TOKEN)
  APISERVER_PID=$(env_get APISERVER_PID)
  ETCD_PORT=$(env_get ETCD_PORT)
  ETCD_PEER_PORT=$(env_get ETCD_PEER_PORT)
  ETCD_PID=$(env_get ETCD_PID)
  { [ -n "$APISERVER_PORT" ] && [ -n "$APISERVER_TOKEN" ] && [ -n "$ETCD_PORT" ] && [ -n "$ETCD_PEER_PORT" ]; } \
    || die "$KDIR/env is incomplete"
}
