#!/usr/bin/env bash
# Starts a real etcd 3.4 + kube-apiserver v1.20.2 on free 127.0.0.1 ports with all state in DIR,
# waits for /readyz, and writes DIR/kubeconfig, DIR/env and DIR/pids. Prints DIR/env on stdout.
#
# Usage: scripts/kube/start.sh DIR
# Stop with scripts/kube/stop.sh DIR; restart one part with scripts/kube/restart.sh DIR apiserver|etcd|all.
# Needs scripts/kube/install.sh to have run once. See scripts/kube/README.md for DIR's layout.
#
# Environment: RAYSHIFT_CACHE, KUBE_APISERVER_BIN, ETCD_BIN, RAYSHIFT_KUBE_READY_TIMEOUT (s, default 60).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

[ $# -eq 1 ] || die "usage: $SCRIPT_NAME DIR"
resolve_dir "$1" create

for c in openssl curl python3 setsid base64; do
  command -v "$c" >/dev/null 2>&1 || die "'$c' not found on PATH (run scripts/kube/install.sh)"
done
[ -x "$KUBE_APISERVER_BIN" ] || die "$KUBE_APISERVER_BIN not found: run scripts/kube/install.sh first (or set KUBE_APISERVER_BIN)"
{ [ -n "$ETCD_BIN" ] && [ -x "$ETCD_BIN" ]; } || die "etcd not found on PATH: run scripts/kube/install.sh first (or set ETCD_BIN)"

if [ -f "$KDIR/env" ]; then
  old_etcd=$(env_get ETCD_PID)
  old_api=$(env_get APISERVER_PID)
  if is_ours "$old_etcd" || is_ours "$old_api"; then
    die "already running in $KDIR (etcd pid ${old_etcd:-?}, kube-apiserver pid ${old_api:-?}); use stop.sh or restart.sh"
  fi
fi

umask 077
mkdir -p "$KDIR/pki" "$KDIR/logs"

# --- credentials (kept when DIR is reused, so a stopped cluster can be started again) -------
if [ ! -s "$KDIR/tokens.csv" ]; then
  printf '%s,admin,admin-uid,system:masters\n' "$(openssl rand -hex 32)" >"$KDIR/tokens.csv"
fi
APISERVER_TOKEN=$(head -n 1 "$KDIR/tokens.csv" | cut -d, -f1)
[[ "$APISERVER_TOKEN" =~ ^[0-9a-f]{64}$ ]] || die "$KDIR/tokens.csv: unexpected first line"

PKI="$KDIR/pki"
if [ ! -s "$PKI/ca.crt" ] || [ ! -s "$PKI/apiserver.crt" ] || [ ! -s "$PKI/apiserver.key" ]; then
  log "generating CA and serving certificate in $PKI"
  cat >"$PKI/openssl.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = rayshift-test-kube-ca
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1
EOF
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/ca.key" 2>/dev/null
  openssl req -x509 -new -config "$PKI/openssl.cnf" -extensions v3_ca -key "$PKI/ca.key" \
    -sha256 -days 3650 -out "$PKI/ca.crt"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$PKI/apiserver.key" 2>/dev/null
  openssl req -new -config "$PKI/openssl.cnf" -key "$PKI/apiserver.key" -subj /CN=kube-apiserver \
    -out "$PKI/apiserver.csr"
  openssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -sha256 -days 3650 \
    -extfile "$PKI/openssl.cnf" -extensions v3_server -out "$PKI/apiserver.crt" 2>/dev/null
  rm -f "$PKI/apiserver.csr"
  openssl verify -CAfile "$PKI/ca.crt" "$PKI/apiserver.crt" >/dev/null || die "generated certificate does not verify"
fi
if [ ! -s "$PKI/sa.key" ] || [ ! -s "$PKI/sa.pub" ]; then
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
fi

# --- ports: reuse the previous run's if all are still free, else pick new ones ---------------
APISERVER_PORT=""
if [ -f "$KDIR/env" ]; then
  p_api=$(env_get APISERVER_PORT); p_etcd=$(env_get ETCD_PORT); p_peer=$(env_get ETCD_PEER_PORT)
  if [ -n "$p_api" ] && [ -n "$p_etcd" ] && [ -n "$p_peer" ] \
    && port_free "$p_api" && port_free "$p_etcd" && port_free "$p_peer"; then
    APISERVER_PORT=$p_api; ETCD_PORT=$p_etcd; ETCD_PEER_PORT=$p_peer
    log "reusing ports from $KDIR/env"
  fi
fi
if [ -z "$APISERVER_PORT" ]; then
  read -r APISERVER_PORT ETCD_PORT ETCD_PEER_PORT < <(free_ports 3) || die "could not find free ports"
fi
log "ports: kube-apiserver $APISERVER_PORT, etcd client $ETCD_PORT, etcd peer $ETCD_PEER_PORT"

# --- start; on any failure stop what was started --------------------------------------------
ETCD_PID=""
APISERVER_PID=""
cleanup_on_failure() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    printf '%s: failed; stopping what was started\n' "$SCRIPT_NAME" >&2
    [ -z "$APISERVER_PID" ] || stop_group kube-apiserver "$APISERVER_PID" KILL || true
    [ -z "$ETCD_PID" ] || stop_group etcd "$ETCD_PID" KILL || true
    rm -f "$KDIR/pids"
  fi
}
trap cleanup_on_failure EXIT

start_etcd
start_apiserver

# --- kubeconfig, env, pids -------------------------------------------------------------------
cat >"$KDIR/.kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: rayshift-test
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: admin
  user:
    token: $APISERVER_TOKEN
contexts:
- name: rayshift-test
  context:
    cluster: rayshift-test
    user: admin
    namespace: default
current-context: rayshift-test
EOF
mv -f "$KDIR/.kubeconfig.tmp" "$KDIR/kubeconfig"
write_state
trap - EXIT
log "up: KUBECONFIG=$KDIR/kubeconfig (total $(elapsed)s)"
cat "$KDIR/env"
