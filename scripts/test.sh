#!/usr/bin/env bash
# The one test command. Installs what the tests need if it is missing (openssl from Debian, pkilint in a venv),
# builds, runs `swift test`, then the interop checks against real external programs and the x509-limbo suite.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SHARED=${MUTUAL_SHARED:-$ROOT/../shared}
VENV=${MUTUAL_VENV:-$ROOT/.venv}
log() { printf '\n==> %s\n' "$*"; }

# ---- install what is missing
need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/lint_pkix_cert" ] || [ ! -x "$VENV/bin/openapi-spec-validator" ]; then
  log "installing pkilint and openapi-spec-validator into $VENV (pip)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check pkilint cryptography openapi-spec-validator
fi
command -v curl >/dev/null 2>&1 || { export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq curl >/dev/null; }

# ---- build and unit/integration tests (Swift Testing)
log "swift build"
swift build --build-tests 2>&1 | tail -n 3
log "swift test"
swift test 2>&1 | tee "$ROOT/.build/swift-test.log" | grep -E '✘|error:|Test run|passed after .* seconds\.$' | grep -v '^✔ Test "' || true
if ! grep -qE 'Test run with [0-9]+ tests? .*passed' "$ROOT/.build/swift-test.log"; then
  grep -E '✘|error' "$ROOT/.build/swift-test.log" | head -50
  echo "swift test failed"
  exit 1
fi

# ---- interop with real external peers
log "interop: openssl, pkilint, x509-limbo"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" SHARED="$SHARED" bash "$ROOT/scripts/interop.sh"
