#!/usr/bin/env bash
# Restarts one part (or both) of the cluster started by scripts/kube/start.sh DIR, keeping the
# data, certificates, token and the same ports; waits for /readyz; rewrites DIR/env and DIR/pids
# with the new pids. Works too when the part has already died (it is then just started).
#
# Usage: scripts/kube/restart.sh DIR apiserver|etcd|all [--kill]
#   --kill  stop with SIGKILL (a crash) instead of SIGTERM (a graceful shutdown)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

{ [ $# -ge 2 ] && [ $# -le 3 ]; } || die "usage: $SCRIPT_NAME DIR apiserver|etcd|all [--kill]"
WHAT="$2"
SIG=TERM
if [ $# -eq 3 ]; then
  [ "$3" = "--kill" ] || die "unknown option $3 (usage: $SCRIPT_NAME DIR apiserver|etcd|all [--kill])"
  SIG=KILL
fi
resolve_dir "$1"
load_state
# Whatever happens next, DIR/env and DIR/pids name the processes now running (a part that started
# but never became ready included), so stop.sh stops them and not the old pids.
trap write_state EXIT

etcd_healthy() {
  curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'
}

case "$WHAT" in
  apiserver|kube-apiserver)
    etcd_healthy || die "etcd on 127.0.0.1:$ETCD_PORT is not healthy; use: $SCRIPT_NAME $KDIR all"
    stop_group kube-apiserver "$APISERVER_PID" "$SIG"
    start_apiserver
    ;;
  etcd)
    stop_group etcd "$ETCD_PID" "$SIG"
    start_etcd
    if is_ours "$APISERVER_PID"; then
      # the apiserver reconnects by itself; report ready only once it has
      wait_readyz "$(now_ms)"
    else
      log "kube-apiserver is not running (use: $SCRIPT_NAME $KDIR apiserver)"
    fi
    ;;
  all)
    stop_group kube-apiserver "$APISERVER_PID" "$SIG"
    stop_group etcd "$ETCD_PID" "$SIG"
    start_etcd
    start_apiserver
    ;;
  *) die "unknown part '$WHAT' (apiserver|etcd|all)" ;;
esac

trap - EXIT
write_state
log "restarted $WHAT (total $(elapsed)s)"
cat "$KDIR/env"
