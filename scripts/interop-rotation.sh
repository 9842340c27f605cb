#!/usr/bin/env bash
# CA rotation under load, with zero failed requests: `mutual serve`, a sidecar `mutual proxy` whose identity (30 s
# certificates) renews in-process, and a client identity renewed by `mutual agent` (30 s certificates) calling through
# the proxy without pause (python ssl, reloading its credentials every 20 requests), while
#   the issuing CA rotates prepare -> activate -> retire, then the root prepare -> activate -> retire.
# Checked on the way with openssl: chains verify against the old root alone (through the cross-certificate) and the new
# root alone; the replaced CA's CRL and OCSP answers (signed by it) still cover its certificates; /roots.pem carries
# both roots during the root rotation and the new one alone after; retire refuses with ca-still-in-use while old
# certificates are valid. At the end: zero failed requests, every delivered certificate in the inventory, the audit
# chain intact with every stage in it. Prints "N passed, N failed".
set -uo pipefail
: "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
HELP="$(cd "$(dirname "$0")" && pwd)/proxy_helpers.py"
S="$T/state"
M() { "$MUTUAL" "$@"; }
wait_for() { for _ in $(seq 150); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
token() { M token create --state-dir "$S" --scope "$1" --max-validity 30s --uses 1 --ttl 1h --json | python3 -c "import json,sys;print(json.load(sys.stdin)['token'])"; }
stage() { # kind stage
  if M ca rotate "$1" --stage "$2" --state-dir "$S" > "$T/stage.out" 2>&1; then ok "ca rotate $1 --stage $2"; else bad "ca rotate $1 --stage $2: $(tail -3 "$T/stage.out")"; fi
}
retire() { # kind: retries while old certificates are still valid (each refusal must carry ca-still-in-use)
  local refused=0
  for _ in $(seq 40); do
    if M ca rotate "$1" --stage retire --state-dir "$S" > "$T/retire.out" 2>&1; then
      ok "ca rotate $1 --stage retire (after $refused refusal(s) naming ca-still-in-use while old certificates were valid)"; return
    fi
    grep -q "\[ca-still-in-use\]" "$T/retire.out" || { bad "retire $1 refused without ca-still-in-use: $(tail -2 "$T/retire.out")"; return; }
    refused=$((refused + 1)); sleep 2
  done
  bad "retire $1: old certificates still valid after 80 s: $(tail -2 "$T/retire.out")"
}

M init --state-dir "$S" --name "Rotation Test" > /dev/null || { bad "init"; echo "CA rotation: $pass passed, $fail failed"; exit 1; }
M serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$T/serve.log" 2>&1 & PIDS+=($!)
wait_for "$T/serve.log" "CRL and OCSP on" || { bad "serve did not start: $(tail -3 "$T/serve.log")"; echo "CA rotation: $pass passed, $fail failed"; exit 1; }
A=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
H=$(grep -o 'http://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
FP=$(openssl x509 -in "$S/ca/root.pem" -outform DER | sha256sum | cut -d' ' -f1)
cp "$S/ca/root.pem" "$T/r1.pem"; cp "$S/ca/intermediate.pem" "$T/g1.pem"

python3 "$HELP" echo > "$T/echo.port" & PIDS+=($!)
for _ in $(seq 50); do [ -s "$T/echo.port" ] && break; sleep 0.1; done
cat > "$T/sidecar.yaml" <<YAML
access-log: off
admin-listen: 127.0.0.1:0
identity:
  authority: $A
  root-fingerprint: $FP
  token: $(token 'spiffe://example.org/ns/edge/*')
  identity: spiffe://example.org/ns/edge/sa/front
  validity: 30s
  out-dir: sidecar-identity
listeners:
  - name: front
    listen: 127.0.0.1:0
    upstream: http://127.0.0.1:$(head -1 "$T/echo.port")
    allow: ["spiffe://example.org/ns/web/*"]
YAML
(cd "$T" && exec "$MUTUAL" proxy --config "$T/sidecar.yaml" > "$T/sidecar.out" 2> "$T/sidecar.err") & PIDS+=($!)
wait_for "$T/sidecar.err" "front listening on" || bad "sidecar proxy: $(tail -3 "$T/sidecar.err")"
SP=$(grep "front listening on" "$T/sidecar.err" | sed 's/.*://')
M agent --authority "$A" --root-fingerprint "$FP" --token "$(token 'spiffe://example.org/ns/web/*')" --identity spiffe://example.org/ns/web/sa/client \
  --out-dir "$T/client" --validity 30s --crl-out "$T/client-crls.pem" --crl-refresh 5s > "$T/client-agent.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do [ -e "$T/client/key.pem" ] && break; sleep 0.1; done
TOTAL=${ROTATION_SECONDS:-200}
python3 "$HELP" load "$SP" "$T/client/bundle.pem" "$T/client/chain.pem" "$T/client/key.pem" "$TOTAL" "$T/load.json" & LOAD=$!; PIDS+=($LOAD)
STARTED=$SECONDS

# A certificate of the first issuing CA that outlives the rotation, to revoke once that CA is replaced.
M issue --state-dir "$S" --profile workload --uri spiffe://example.org/ns/batch/sa/job --validity 1h --out-dir "$T/spare" > /dev/null
M issue --state-dir "$S" --profile workload --uri spiffe://example.org/ns/batch/sa/report --validity 1h --owner team-batch --out-dir "$T/spare2" > /dev/null
sleep 3

# ---- the issuing CA
stage intermediate prepare
sleep 1.5  # serve reloads within a second
curl -sf --cacert "$T/r1.pem" "$A/bundle.pem" | grep -c "BEGIN CERTIFICATE" | grep -qx 3 && ok "/bundle.pem carries the root, the current and the prepared issuing CA" || bad "/bundle.pem after prepare"
sleep 22
stage intermediate activate
sleep 2
cp "$S/ca/intermediate.pem" "$T/g2.pem"
openssl x509 -in "$T/g2.pem" -noout -subject | grep -q "Issuing CA G2" && ok "ca/intermediate.pem is the new issuing CA (G2)" || bad "ca/intermediate.pem after activate"
SPARE=$(openssl x509 -in "$T/spare/cert.pem" -noout -serial | cut -d= -f2)
M revoke --state-dir "$S" "$SPARE" --reason keyCompromise > /dev/null && sleep 1.5
curl -sf "$H/crl" -o "$T/g1.crl" && openssl crl -inform DER -in "$T/g1.crl" -CAfile "$T/g1.pem" -noout 2>&1 | grep -q "verify OK" \
  && openssl crl -inform DER -in "$T/g1.crl" -noout -text | grep -qi "$SPARE" && ok "/crl is still the replaced CA's CRL, signed by it, listing its revoked certificate" || bad "the replaced CA's CRL"
openssl ocsp -issuer "$T/g1.pem" -cert "$T/spare/cert.pem" -url "$H/ocsp" -CAfile "$T/r1.pem" > "$T/ocsp.txt" 2>&1
grep -q "Response verify OK" "$T/ocsp.txt" && grep -q ": revoked" "$T/ocsp.txt" && ok "OCSP about the replaced CA's certificate: revoked, answer signed by that CA (openssl verifies)" || bad "OCSP for the replaced CA: $(cat "$T/ocsp.txt")"
curl -sf "$H/crl/g2" -o "$T/g2.crl" && openssl crl -inform DER -in "$T/g2.crl" -CAfile "$T/g2.pem" -noout 2>&1 | grep -q "verify OK" && ok "/crl/g2 is the new CA's CRL" || bad "/crl/g2"
curl -sf --cacert "$T/r1.pem" "$A/crls.pem" | grep -c "BEGIN X509 CRL" | grep -qx 3 && ok "/crls.pem: the root's CRL and both issuing CAs'" || bad "/crls.pem during the rotation: $(curl -s --cacert "$T/r1.pem" "$A/crls.pem" | grep -c 'BEGIN X509 CRL')"
sleep 24
openssl x509 -in "$T/client/cert.pem" -noout -issuer | grep -q "Issuing CA G2" && ok "the client agent renewed onto G2 at its normal schedule" || bad "client issuer: $(openssl x509 -in "$T/client/cert.pem" -noout -issuer)"
# A certificate of the old CA that is still valid and not renewed keeps it from retiring, named with its owner.
M ca rotate intermediate --stage retire --state-dir "$S" > "$T/refused.out" 2>&1
[ $? = 1 ] && grep -q "\[ca-still-in-use\]" "$T/refused.out" && grep -q "team-batch: 1" "$T/refused.out" \
  && ok "retire refused while a certificate of the old CA is valid: [ca-still-in-use], naming its owner" || bad "retire with a valid old certificate: $(cat "$T/refused.out")"
M revoke --state-dir "$S" "$(openssl x509 -in "$T/spare2/cert.pem" -noout -serial | cut -d= -f2)" --reason superseded > /dev/null
retire intermediate
M ca status --state-dir "$S" --json > "$T/status1.json"
python3 -c '
import json,sys
s = json.load(open(sys.argv[1]))
stages = {(c["kind"], c["generation"]): c["stage"] for c in s}
assert stages[("intermediate", 1)] == "retired" and stages[("intermediate", 2)] == "active", stages' "$T/status1.json" \
  && ok "ca status: g1 retired, g2 active" || bad "ca status: $(cat "$T/status1.json")"

# ---- the root
stage root prepare
sleep 1.5
curl -sf "$H/roots.pem" | grep -c "BEGIN CERTIFICATE" | grep -qx 2 && ok "/roots.pem carries the current and the new root" || bad "/roots.pem after root prepare"
sleep 22
grep -c "BEGIN CERTIFICATE" "$T/client/bundle.pem" | grep -qx 2 && ok "the client agent's bundle.pem has both roots after its renewal" || bad "client bundle: $(grep -c 'BEGIN CERTIFICATE' "$T/client/bundle.pem") certificates"
stage root activate
sleep 24
cp "$S/ca/root.pem" "$T/r2.pem"
openssl x509 -in "$T/client/cert.pem" -noout -issuer | grep -q "Issuing CA G3" && ok "the client renewed onto the new root's issuing CA (G3)" || bad "client issuer after root activate: $(openssl x509 -in "$T/client/cert.pem" -noout -issuer)"
openssl verify -CAfile "$T/r1.pem" -untrusted "$T/client/chain.pem" "$T/client/cert.pem" > /dev/null 2>&1 \
  && ok "a relying party trusting only the old root accepts the new chain (cross-certificate in chain.pem)" || bad "old-root-only verification of the new chain"
openssl verify -CAfile "$T/r2.pem" -untrusted "$T/client/chain.pem" "$T/client/cert.pem" > /dev/null 2>&1 && ok "the new root alone verifies it too" || bad "new-root verification"
sleep 8
retire root
sleep 1.5
[ "$(curl -sf "$H/roots.pem" | grep -c 'BEGIN CERTIFICATE')" = 1 ] && curl -sf "$H/roots.pem" | openssl x509 -noout -subject | grep -q "Root CA G2" \
  && ok "/roots.pem carries the new root alone after retire" || bad "/roots.pem after retire"

wait $LOAD
python3 - "$T/load.json" <<'PY' && ok "the client called through the proxy for the whole rotation: zero failed requests ($(python3 -c "import json;print(json.load(open('$T/load.json'))['ok'])") ok)" || bad "load: $(cat "$T/load.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["failed"] == 0 and r["ok"] > 500, r
PY
# Every certificate the agents delivered is in the inventory, under the issuer it names.
M list --state-dir "$S" --json > "$T/list.json"
for f in "$T"/client/.gen-*/cert.pem "$T"/sidecar-identity/.gen-*/cert.pem; do
  [ -f "$f" ] || continue
  serial=$(openssl x509 -in "$f" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f')
  grep -q "\"$serial\"" "$T/list.json" || bad "delivered certificate $serial is not in the inventory"
done
python3 - "$T/list.json" <<'PY' && ok "the inventory holds certificates of all three issuing CAs (g1, g2, g3)" || bad "inventory issuers"
import json, sys
issuers = {c["issuer"] for c in json.load(open(sys.argv[1]))}
assert any("G2" in i for i in issuers) and any("G3" in i for i in issuers) and any(i.endswith("Issuing CA") or "Issuing CA," in i for i in issuers), issuers
PY
! grep -q "CRL refresh failed" "$T/client-agent.log" && [ "$(grep -c 'CRLs written' "$T/client-agent.log")" -ge 3 ] \
  && ok "the agent's --crl-out file (nginx ssl_crl) stayed valid through both rotations ($(grep -c 'CRLs written' "$T/client-agent.log") writes, no failed refresh)" \
  || bad "agent CRL refresh: $(grep 'CRL refresh failed' "$T/client-agent.log" | head -2)"
check "mutual audit verify: the chain is intact" M audit verify --state-dir "$S"
[ "$(M audit list --state-dir "$S" | grep -c 'ca-rotate')" = 6 ] && ok "the audit trail has all six rotation stages" || bad "ca-rotate events: $(M audit list --state-dir "$S" | grep -c 'ca-rotate')"
echo "CA rotation: $pass passed, $fail failed ($((SECONDS - STARTED)) s under load)"
[ "$fail" -eq 0 ]
