#!/usr/bin/env bash
# Stops the kube-apiserver and etcd started by scripts/kube/start.sh DIR: SIGTERM to each whole
# process group, SIGKILL after RAYSHIFT_KUBE_STOP_TIMEOUT (default 15) seconds. Keeps DIR's data
# (start.sh DIR starts it again; rm -rf DIR to throw it away). Idempotent: stopping a stopped or
# never-started DIR succeeds.
#
# Usage: scripts/kube/stop.sh DIR
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

[ $# -eq 1 ] || die "usage: $SCRIPT_NAME DIR"
if [ ! -d "$1" ]; then
  log "$1 does not exist; nothing to stop"
  exit 0
fi
resolve_dir "$1"
if [ ! -f "$KDIR/env" ] && [ ! -f "$KDIR/pids" ]; then
  log "no $KDIR/env; nothing to stop"
  exit 0
fi

APISERVER_PID=$(env_get APISERVER_PID)
ETCD_PID=$(env_get ETCD_PID)
# DIR/pids is written last by start/restart; prefer it when both exist.
if [ -f "$KDIR/pids" ]; then
  mapfile -t P <"$KDIR/pids"
  ETCD_PID=${P[0]:-$ETCD_PID}
  APISERVER_PID=${P[1]:-$APISERVER_PID}
fi

stop_group kube-apiserver "$APISERVER_PID"
stop_group etcd "$ETCD_PID"
rm -f "$KDIR/pids"
log "stopped (data kept in $KDIR)"
