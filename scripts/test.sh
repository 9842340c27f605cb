#!/usr/bin/env bash
# The one test command. Installs what the tests need if it is missing (openssl from Debian, pkilint in a venv),
# builds, runs `swift test`, then the interop checks against real external programs and the x509-limbo suite.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SHARED=${MUTUAL_SHARED:-$ROOT/../shared}
VENV=${MUTUAL_VENV:-$ROOT/.venv}
log() { printf '\n==> %s\n' "$*"; }

# ---- install what is missing
need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v sqlite3 >/dev/null 2>&1 || need_apt+=(sqlite3)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
command -v lego >/dev/null 2>&1 || need_apt+=(lego)
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need_apt+=(dnsmasq-base)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need_apt+=(iproute2)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# PKCS#11: the header the build needs, SoftHSM2, pkcs11-tool, and a software TPM behind libtpm2_pkcs11.
[ -f /usr/include/p11-kit-1/p11-kit/pkcs11.h ] || need_apt+=(libp11-kit-dev)
[ -f /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
command -v pkcs11-tool >/dev/null 2>&1 || need_apt+=(opensc)
command -v swtpm >/dev/null 2>&1 || need_apt+=(swtpm swtpm-tools)
command -v tpm2-abrmd >/dev/null 2>&1 || [ -x /usr/sbin/tpm2-abrmd ] || need_apt+=(tpm2-abrmd libtss2-tcti-tabrmd0 dbus)
command -v tpm2_ptool >/dev/null 2>&1 || need_apt+=(libtpm2-pkcs11-1 libtpm2-pkcs11-tools tpm2-tools libtss2-tcti-swtpm0)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # Packages must not start services (nginx would listen on port 80): deny service starts while installing.
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created_policy=1; fi
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
  [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi
if [ ! -x "$VENV/bin/lint_pkix_cert" ] || [ ! -x "$VENV/bin/openapi-spec-validator" ] || [ ! -x "$VENV/bin/certbot" ] || ! "$VENV/bin/python3" -c 'import h2, selenium, OpenSSL, jwt, requests' 2>/dev/null; then
  log "installing pkilint, openapi-spec-validator, h2, certbot, selenium, pyjwt and requests into $VENV (pip)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check pkilint cryptography pyopenssl openapi-spec-validator h2 certbot selenium pyjwt requests
fi

# ---- a throwaway PostgreSQL cluster (127.0.0.1, free port, unprivileged user), removed on exit
PG_DIR=$(mktemp -d /tmp/mutual-pg-XXXXXX)
trap 'bash "$ROOT/scripts/pg.sh" stop "$PG_DIR"' EXIT
log "starting a throwaway PostgreSQL cluster"
eval "$(bash "$ROOT/scripts/pg.sh" start "$PG_DIR")"
export MUTUAL_TEST_POSTGRES_URL MUTUAL_TEST_PG_DIR

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
status=0
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" SHARED="$SHARED" bash "$ROOT/scripts/interop.sh" || status=1
log "interop: revocation (openssl ocsp/crl, pkilint, python cryptography, nginx ssl_crl)"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" bash "$ROOT/scripts/interop-revocation.sh" || status=1
log "documentation: README and docs examples run as written (private network namespace, documented host names and ports)"
MUTUAL="$ROOT/.build/debug/mutual" bash "$ROOT/scripts/docs-examples.sh" || status=1
log "clocks: agents 2 h behind and ahead (LD_PRELOAD wall-clock shim), 12 s / 10 min / 24 h certificates, authority restarted"
MUTUAL="$ROOT/.build/debug/mutual" CLOCK_SECONDS="${CLOCK_SECONDS:-40}" bash "$ROOT/scripts/interop-clock.sh" || status=1
log "readiness on a full disk (tmpfs in a private mount namespace)"
MUTUAL="$ROOT/.build/debug/mutual" bash "$ROOT/scripts/readiness.sh" || status=1
log "doctor: mutual doctor against misconfigured openssl s_server peers, a plain port, a closed port and a shifted clock"
MUTUAL="$ROOT/.build/debug/mutual" bash "$ROOT/scripts/interop-doctor.sh" || status=1
log "interop: docs/nginx.md as written (nginx ssl_crl kept fresh by the agent across CRL expiry, revocation, server certificate rotation)"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" bash "$ROOT/scripts/interop-nginx.sh" || status=1
log "interop: mutual proxy (curl, openssl s_client, nginx, PROXY v2, revocation, rotation under load; gateway attacks: path spellings, hostile SANs, header forgery, limits, siege at ulimit -n 256, TLS settings)"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" bash "$ROOT/scripts/interop-proxy.sh" || status=1
log "agent: enrollment, renewal, crash safety, revocation, and a sidecar proxy rotating under load for ${AGENT_SECONDS:-180}s"
MUTUAL="$ROOT/.build/debug/mutual" AGENT_SECONDS="${AGENT_SECONDS:-180}" bash "$ROOT/scripts/interop-agent.sh" || status=1
log "ACME: certbot (register, DNS name, IP address, renew, revoke, a refused validation) and lego against mutual serve --acme"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" bash "$ROOT/scripts/interop-acme.sh" || status=1
log "ML-DSA (RFC 9881): hierarchies, CLI, CRL and verify checked by python cryptography 50; TLS 1.3 with ML-DSA-65 and X25519MLKEM768 through mutual proxy against pyOpenSSL, both directions"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" bash "$ROOT/scripts/interop-pq.sh" || status=1
log "dashboard: headless Chromium (selenium) signs in with a link, searches, revokes with confirmation, reads revocations and the audit trail; read-only, cross-site forms, used and expired links refused; screenshots"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" bash "$ROOT/scripts/interop-dashboard.sh" || status=1
log "PKCS#11: CA keys generated in SoftHSM2 (pkcs11-tool: never extractable), serve signing certificates, CRL and OCSP through it (openssl verifies), wrong PIN / missing token / module / removal named; agent keys in a software TPM (swtpm + libtpm2_pkcs11) renewing over mTLS"
MUTUAL="$ROOT/.build/debug/mutual" bash "$ROOT/scripts/interop-pkcs11.sh" || status=1
log "CA rotation under load: the issuing CA then the root, prepare/activate/retire, while a client calls through mutual proxy (30 s certificates renewed by agents); openssl checks the cross-certificate, CRLs and OCSP of the replaced CA"
MUTUAL="$ROOT/.build/debug/mutual" ROTATION_SECONDS="${ROTATION_SECONDS:-200}" bash "$ROOT/scripts/interop-rotation.sh" || status=1
log "OAuth (RFC 8705): python requests client and stdlib-ssl + pyjwt resource server; mutual proxy refusing forged, foreign and expired tokens; signing-key rotation under steady calls"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" bash "$ROOT/scripts/interop-oauth.sh" || status=1
log "replicas: two authorities on one PostgreSQL under load, with revocations, a SIGKILL and a database restart"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" PG_DIR="$PG_DIR" DURATION="${REPLICA_SECONDS:-60}" bash "$ROOT/scripts/replicas.sh" || status=1
log "ACME on two replicas: 20 concurrent certbot and lego runs across them on one PostgreSQL, nonces shared"
MUTUAL="$ROOT/.build/debug/mutual" VENV="$VENV" PG_DIR="$PG_DIR" bash "$ROOT/scripts/acme-replicas.sh" || status=1
exit $status
