#!/usr/bin/env bash
# End-to-end check of the real API server set-up: start (in a temp DIR), apply the RayCluster CRD,
# create a RayCluster, patch and read its status through the API, restart the apiserver (same port,
# data kept) and etcd, delete, stop, and check that no server process is left. Exits non-zero on
# the first failure. Needs scripts/kube/install.sh to have run.
#
# Usage: scripts/kube/smoke.sh [DIR]   (default: a new mktemp dir, removed on success)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CRD="$REPO/deploy/kubernetes/crds/rayclusters.ray.io.yaml"

now_ms() { local t=${EPOCHREALTIME/./}; echo $(( t / 1000 )); }
T0=$(now_ms)
say() { printf '[kube/smoke %6sms] %s\n' "$(( $(now_ms) - T0 ))" "$*" >&2; }
fail() { printf 'smoke.sh: FAILED: %s\n' "$*" >&2; exit 1; }

OWN_DIR=0
if [ $# -ge 1 ]; then D="$1"; else D=$(mktemp -d /tmp/rayshift-kube-smoke.XXXXXX); OWN_DIR=1; fi
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  "$HERE/stop.sh" "$D" >/dev/null 2>&1 || true
  if [ "$rc" -eq 0 ] && [ "$OWN_DIR" -eq 1 ]; then rm -rf "$D"; fi
  [ "$rc" -eq 0 ] || printf 'smoke.sh: logs kept in %s/logs\n' "$D" >&2
}
trap cleanup EXIT

say "start.sh $D"
t=$(now_ms); "$HERE/start.sh" "$D" >/dev/null; say "started in $(( $(now_ms) - t )) ms"
# shellcheck disable=SC1091
. "$D/env"
export KUBECONFIG
PORT0=$APISERVER_PORT
api() { # api METHOD PATH [BODY] [CONTENT-TYPE]
  curl -sS --fail-with-body --cacert "$APISERVER_CA_FILE" -H "Authorization: Bearer $APISERVER_TOKEN" \
    -X "$1" ${3:+-H "Content-Type: ${4:-application/json}"} ${3:+--data-binary "$3"} "$APISERVER_URL$2"
}
RC=/apis/ray.io/v1/namespaces/default/rayclusters

kubectl apply -f "$CRD" >/dev/null
kubectl wait --for condition=established --timeout=60s crd/rayclusters.ray.io >/dev/null
say "CRD established"

api POST "$RC" '{"apiVersion":"ray.io/v1","kind":"RayCluster","metadata":{"name":"smoke","labels":{"rayshift.io/test":"smoke"},"annotations":{"ray.io/enable-serve-service":"true"}},"spec":{"rayVersion":"2.60.0","headGroupSpec":{"rayStartParams":{}},"workerGroupSpecs":[{"groupName":"small","replicas":1}]}}' >/dev/null
say "RayCluster created"

STATUS='{"status":{"state":"ready","conditions":[{"type":"HeadPodReady","status":"True","reason":"HeadPodRunningAndReady","message":"","lastTransitionTime":"2025-01-01T00:00:00Z"}],"head":{"podIP":"10.1.2.3","serviceIP":"10.0.0.42","podName":"smoke-head-x","serviceName":"smoke-head-svc"},"endpoints":{"serve":"8000","dashboard":"8265"},"readyWorkerReplicas":1,"availableWorkerReplicas":1,"desiredWorkerReplicas":1,"observedGeneration":1,"desiredCPU":"2"}}'
api PATCH "$RC/smoke/status" "$STATUS" application/merge-patch+json >/dev/null
got=$(api GET "$RC/smoke" | jq -c '[.status.state, .status.head.podIP, .status.endpoints.serve, .status.conditions[0].message, .status.readyWorkerReplicas, .status.desiredCPU, .metadata.labels["rayshift.io/test"]]')
[ "$got" = '["ready","10.1.2.3","8000","",1,"2","smoke"]' ] || fail "status read back as $got"
say "status patched (merge-patch on /status) and read back"
if api PATCH "$RC/smoke/status" '{"status":{"state":5}}' application/merge-patch+json >/dev/null 2>&1; then
  fail "a number in status.state was accepted (schema not enforced?)"
fi

say "restart.sh apiserver"
t=$(now_ms); "$HERE/restart.sh" "$D" apiserver >/dev/null; say "apiserver restarted in $(( $(now_ms) - t )) ms"
# shellcheck disable=SC1091
. "$D/env"
[ "$APISERVER_PORT" = "$PORT0" ] || fail "apiserver came back on port $APISERVER_PORT, not $PORT0"
[ "$(api GET "$RC/smoke" | jq -r .status.state)" = ready ] || fail "data lost over the apiserver restart"

say "restart.sh etcd --kill"
t=$(now_ms); "$HERE/restart.sh" "$D" etcd --kill >/dev/null; say "etcd restarted in $(( $(now_ms) - t )) ms"
# shellcheck disable=SC1091
. "$D/env"
[ "$(kubectl get raycluster smoke -o jsonpath='{.status.head.serviceIP}')" = 10.0.0.42 ] || fail "data lost over the etcd restart"

api DELETE "$RC/smoke" >/dev/null
if api GET "$RC/smoke" >/dev/null 2>&1; then fail "RayCluster still there after delete"; fi
say "RayCluster deleted"

PIDS=$(cat "$D/pids")
"$HERE/stop.sh" "$D" 2>/dev/null
"$HERE/stop.sh" "$D" 2>/dev/null   # idempotent
for p in $PIDS; do
  if [ -e "/proc/$p" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null; then
    fail "process $p still running after stop.sh"
  fi
done
if ps -eo stat=,args= | awk '$1 !~ /^Z/' | grep -F -- "$D/" | grep -v grep >/dev/null; then
  fail "a process naming $D is still running after stop.sh"
fi
say "stopped; no process left; all checks passed"
