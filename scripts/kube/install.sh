#!/usr/bin/env bash
# Installs what the real-Kubernetes integration tests need and builds kube-apiserver v1.20.2
# from Debian bookworm's `kubernetes` source package (no prebuilt binary exists in any registry
# reachable here). Idempotent: a second run finds everything in place and returns in about a second.
#
# Usage: scripts/kube/install.sh [--rebuild] [--clean]
#   --rebuild  build kube-apiserver even if the cached binary is fine
#   --clean    also delete the Go build cache (about 1.2 GB) and the downloaded source package
#              (34 MB); only the binary (106 MB) stays. A later rebuild is then a cold one.
#
# Environment:
#   RAYSHIFT_CACHE       cache root (default ~/.cache/rayshift); everything goes under $RAYSHIFT_CACHE/kube
#   RAYSHIFT_APT_UPDATE  "always" to run apt-get update even when nothing is missing
#
# Results:
#   $RAYSHIFT_CACHE/kube/bin/kube-apiserver-v1.20.2   the binary (what scripts/kube/start.sh runs)
#   /usr/bin/etcd (etcd-server 3.4), kubectl on PATH, openssl, curl, jq, python3
# See scripts/kube/README.md.
set -euo pipefail

KUBE_VERSION=v1.20.2
DEB_SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
SRC_DIRNAME=kubernetes-1.20.5+really1.20.2
# Bump when the build recipe changes: a cached binary built by an older recipe is rebuilt.
# 2: + go-openapi zero-value fix (empty strings in typed CRD fields were rejected)
BUILD_REV=2

REBUILD=0
CLEAN=0
for arg in "$@"; do
  case "$arg" in
    --rebuild) REBUILD=1 ;;
    --clean) CLEAN=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

export DEBIAN_FRONTEND=noninteractive
CACHE_ROOT="${RAYSHIFT_CACHE:-$HOME/.cache/rayshift}"
KUBE_CACHE="$CACHE_ROOT/kube"
BIN_DIR="$KUBE_CACHE/bin"
APISERVER_BIN="$BIN_DIR/kube-apiserver-$KUBE_VERSION"
APISERVER_STAMP="$APISERVER_BIN.build-rev"   # holds BUILD_REV of the cached binary
WORK_DIR="$KUBE_CACHE/build"          # apt-get source downloads + extracted tree
GO_CACHE_DIR="$KUBE_CACHE/gocache"    # Go build cache, kept so a rebuild takes ~2 min instead of 4-8
BUILD_HOME="$KUBE_CACHE/home"         # HOME for the build (keeps ~/go and ~/.config clean)
BUILD_LOG="$KUBE_CACHE/build.log"

HERE="$(cd "$(dirname "$0")" && pwd)"
T0=$(date +%s)
STEP="start"
log() { printf '[kube/install %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { printf 'install.sh: ERROR: %s\n' "$*" >&2; exit 1; }
step() { STEP="$*"; log "$*"; }
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    printf 'install.sh: FAILED (exit %s) during step: %s (after %ss)\n' "$rc" "$STEP" "$(( $(date +%s) - T0 ))" >&2
  fi
}
trap on_exit EXIT

mkdir -p "$KUBE_CACHE" "$BIN_DIR" || die "cannot create cache dir $KUBE_CACHE"

# One install at a time per cache dir (parallel CI jobs on one machine share the cache).
exec 9>"$KUBE_CACHE/.install.lock"
if ! flock -n 9; then
  log "another install.sh holds $KUBE_CACHE/.install.lock; waiting for it"
  flock 9
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
  else
    SUDO=(__need_root__)
  fi
fi
as_root() {
  if [ "${SUDO[0]:-}" = "__need_root__" ]; then
    die "need root (or password-less sudo) to run: $*"
  fi
  "${SUDO[@]}" "$@"
}

[ -r /etc/os-release ] || die "/etc/os-release missing; this script supports Debian 12 (bookworm)"
# shellcheck disable=SC1091
. /etc/os-release
if [ "${ID:-}" != "debian" ] || [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
  die "this script supports Debian 12 (bookworm) only (found ${PRETTY_NAME:-unknown})"
fi

cached_binary_ok() {
  [ -x "$APISERVER_BIN" ] || return 1
  local v
  v=$("$APISERVER_BIN" --version 2>/dev/null) || return 1
  [ "$v" = "Kubernetes $KUBE_VERSION" ] || return 1
  [ "$(cat "$APISERVER_STAMP" 2>/dev/null)" = "$BUILD_REV" ]
}

NEED_BUILD=1
if [ "$REBUILD" -eq 0 ] && cached_binary_ok; then
  NEED_BUILD=0
elif [ "$REBUILD" -eq 0 ] && [ -e "$APISERVER_BIN" ]; then
  log "cached $APISERVER_BIN is not usable or was built by an older recipe (want build rev $BUILD_REV); rebuilding"
fi

# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------
# python3-venv: scripts/ray/install.sh (run next by scripts/test) makes Ray's virtualenv with it.
RUNTIME_PKGS=(etcd-server openssl curl ca-certificates jq python3 python3-venv util-linux procps)
BUILD_PKGS=(golang-go dpkg-dev make rsync
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
PKGS=("${RUNTIME_PKGS[@]}")
if [ "$NEED_BUILD" -eq 1 ]; then
  PKGS+=("${BUILD_PKGS[@]}")   # only needed to build; a cached binary needs none of them
fi
if ! command -v kubectl >/dev/null 2>&1; then
  PKGS+=(kubernetes-client)
fi

missing_pkgs() {
  local p st
  for p in "$@"; do
    st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = "installed" ] || printf '%s\n' "$p"
  done
}

APT_UPDATED=0
apt_update() {
  step "apt-get update"
  as_root apt-get update -q >/dev/null || die "apt-get update failed"
  APT_UPDATED=1
}

# deb-src entries: the source package is only needed for a build.
DEB_SRC_FILE=/etc/apt/sources.list.d/rayshift-deb-src.sources
ensure_deb_src() {
  if grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  step "enable Debian source packages ($DEB_SRC_FILE)"
  local tmp
  tmp=$(mktemp)
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    # deb822 format (Debian 12 images): same repositories, Types: deb-src.
    sed -E 's/^Types:.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$tmp"
  elif grep -qsE '^deb .*debian' /etc/apt/sources.list; then
    # one-line format: turn each Debian `deb` line into a `deb-src` line.
    DEB_SRC_FILE=/etc/apt/sources.list.d/rayshift-deb-src.list
    grep -E '^deb .*debian' /etc/apt/sources.list | sed -E 's/^deb /deb-src /' >"$tmp"
  else
    rm -f "$tmp"
    die "no Debian apt source found (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list) to derive deb-src from"
  fi
  as_root install -m 0644 "$tmp" "$DEB_SRC_FILE"
  rm -f "$tmp"
  DEB_SRC_ADDED=1
}

DEB_SRC_ADDED=0
if [ "$NEED_BUILD" -eq 1 ]; then
  ensure_deb_src
fi

mapfile -t MISSING < <(missing_pkgs "${PKGS[@]}")
if [ "${#MISSING[@]}" -gt 0 ] || [ "$DEB_SRC_ADDED" -eq 1 ] || [ "${RAYSHIFT_APT_UPDATE:-}" = "always" ]; then
  apt_update
fi
if [ "${#MISSING[@]}" -gt 0 ]; then
  step "apt-get install ${MISSING[*]}"
  # etcd-server's own etcd service neither starts nor stays enabled: the tests run their own.
  "$HERE/../apt-install.sh" "${MISSING[@]}" || die "apt-get install ${MISSING[*]} failed"
  mapfile -t STILL < <(missing_pkgs "${PKGS[@]}")
  [ "${#STILL[@]}" -eq 0 ] || die "packages still not installed after apt-get install: ${STILL[*]}"
else
  log "packages already installed: ${PKGS[*]}"
fi

for c in etcd openssl curl jq python3 setsid flock kubectl; do
  command -v "$c" >/dev/null 2>&1 || die "'$c' is not on PATH after installing packages"
done

# ---------------------------------------------------------------------------------------------
# kube-apiserver build
# ---------------------------------------------------------------------------------------------
if [ "$NEED_BUILD" -eq 0 ]; then
  log "cached $APISERVER_BIN ($("$APISERVER_BIN" --version)); skipping build"
else
  T_BUILD=$(date +%s)
  GO=/usr/lib/go/bin/go   # Debian's Go (1.19 on bookworm), what the recipe was tested with
  [ -x "$GO" ] || die "Debian's Go not found at $GO (package golang-go)"
  for d in /usr/share/gocode/src/github.com/modern-go/reflect2 /usr/share/gocode/src/github.com/json-iterator/go; do
    [ -d "$d" ] || die "missing $d (packages golang-github-modern-go-reflect2-dev, golang-github-json-iterator-go-dev)"
  done

  if [ "$APT_UPDATED" -eq 0 ] && ! apt-cache showsrc kubernetes 2>/dev/null | grep -qx "Version: $DEB_SRC_VERSION"; then
    apt_update
  fi
  apt-cache showsrc kubernetes 2>/dev/null | grep -qx "Version: $DEB_SRC_VERSION" \
    || die "source package kubernetes=$DEB_SRC_VERSION not found by apt-cache showsrc (are deb-src entries enabled? see $DEB_SRC_FILE)"

  mkdir -p "$WORK_DIR" "$GO_CACHE_DIR" "$BUILD_HOME"
  cd "$WORK_DIR"
  # Always start from a pristine tree: a tree left by an interrupted build may be half patched.
  rm -rf "${WORK_DIR:?}/$SRC_DIRNAME"
  step "apt-get source kubernetes=$DEB_SRC_VERSION (into $WORK_DIR)"
  # Already downloaded files are verified and reused by apt-get source.
  apt-get source -q "kubernetes=$DEB_SRC_VERSION" >"$KUBE_CACHE/apt-source.log" 2>&1 \
    || { tail -n 30 "$KUBE_CACHE/apt-source.log" >&2; die "apt-get source kubernetes=$DEB_SRC_VERSION failed (log: $KUBE_CACHE/apt-source.log)"; }
  SRC="$WORK_DIR/$SRC_DIRNAME"
  [ -f "$SRC/Makefile" ] || die "extracted source tree not found at $SRC"

  step "replace vendored reflect2 and json-iterator with Debian's copies (vendored reflect2 1.0.1 crashes on Go >= 1.18)"
  for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    [ -d "$SRC/vendor/$pkg" ] || die "expected vendored $pkg in $SRC/vendor"
    rm -rf "${SRC:?}/vendor/$pkg"
    cp -rL "/usr/share/gocode/src/$pkg" "$SRC/vendor/$pkg"
    find "$SRC/vendor/$pkg" -name '*_test.go' -delete
  done

  # hack/lib/golang.sh forces GOCACHE=_output/local/go/cache (ignoring ours); point that at the
  # cache dir so the build cache outlives the deleted source tree and a rebuild is quick.
  mkdir -p "$SRC/_output/local/go"
  ln -sfn "$GO_CACHE_DIR" "$SRC/_output/local/go/cache"

  # Go >= 1.16 made reflect.Zero share one pointer, which turned go-openapi's typeValidator
  # check `reflect.DeepEqual(reflect.Zero(T), reflect.ValueOf(data))` true for "" and so
  # rejected empty strings in `type: string` CRD fields ("must be of type string: null").
  # Kubernetes 1.21 removed the check (kube-openapi PR #230, go-openapi/validate PR #138);
  # do the same in both vendored copies.
  step "patch vendored go-openapi typeValidator zero-value check (needed with Go >= 1.16)"
  ZERO_CHECK='if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {'
  for f in vendor/github.com/go-openapi/validate/type.go vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go; do
    [ "$(grep -cF "$ZERO_CHECK" "$SRC/$f")" = 1 ] || die "$f: expected the zero-value check exactly once; source changed?"
    sed -i 's/if data == nil || reflect\.DeepEqual(reflect\.Zero(reflect\.TypeOf(data)), reflect\.ValueOf(data)) {/if data == nil {/' "$SRC/$f"
    ! grep -qF "$ZERO_CHECK" "$SRC/$f" || die "$f: patch did not apply"
  done

  step "make WHAT=cmd/kube-apiserver (cold: about 4 min on 2 cores; log: $BUILD_LOG)"
  if ! (
    cd "$SRC"
    env PATH="/usr/lib/go/bin:$PATH" HOME="$BUILD_HOME" GOCACHE="$GO_CACHE_DIR" \
      GOPROXY=off GOFLAGS= CGO_ENABLED=0 GOTOOLCHAIN=local \
      KUBE_GIT_VERSION="$KUBE_VERSION" KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 KUBE_GIT_TREE_STATE=clean \
      make WHAT=cmd/kube-apiserver
  ) >"$BUILD_LOG" 2>&1; then
    tail -n 40 "$BUILD_LOG" >&2
    die "kube-apiserver build failed (full log: $BUILD_LOG; source tree kept at $SRC)"
  fi
  OUT="$SRC/_output/bin/kube-apiserver"
  [ -x "$OUT" ] || die "build finished but $OUT is missing (log: $BUILD_LOG)"
  V=$("$OUT" --version) || die "built $OUT does not run"
  [ "$V" = "Kubernetes $KUBE_VERSION" ] || die "built binary reports '$V', expected 'Kubernetes $KUBE_VERSION'"

  step "cache binary at $APISERVER_BIN"
  cp -L "$OUT" "$APISERVER_BIN.tmp.$$"
  chmod 0755 "$APISERVER_BIN.tmp.$$"
  mv -f "$APISERVER_BIN.tmp.$$" "$APISERVER_BIN"
  echo "$BUILD_REV" >"$APISERVER_STAMP"
  cached_binary_ok || die "cached binary $APISERVER_BIN does not report Kubernetes $KUBE_VERSION (or $APISERVER_STAMP is wrong)"

  step "delete the extracted source tree (about 1.8 GB with _output)"
  rm -rf "${SRC:?}"
  log "build took $(( $(date +%s) - T_BUILD ))s"
fi

if [ "$CLEAN" -eq 1 ]; then
  step "--clean: delete Go build cache and downloaded sources"
  rm -rf "${GO_CACHE_DIR:?}" "${WORK_DIR:?}" "${BUILD_HOME:?}"
fi

log "etcd: $(etcd --version 2>/dev/null | head -n 1)"
log "kube-apiserver: $APISERVER_BIN ($("$APISERVER_BIN" --version))"
log "kubectl: $(command -v kubectl) ($(kubectl version --client 2>/dev/null | head -n 1))"
log "done in $(( $(date +%s) - T0 ))s"
STEP="done"
