#!/usr/bin/env bash
# ML-DSA (RFC 9881) end to end, checked by independent code:
#  1. the Swift tests build ML-DSA-65/87 hierarchies, CSRs, key files and a CRL by hand; python `cryptography` 50
#     parses each, verifies every signature and builds the chains (scripts/pq_verify.py);
#  2. `mutual init --key-type ml-dsa-65`, `mutual issue`, `mutual sign` (an ML-DSA CSR made by python), `mutual serve`
#     (`/pq/crl`, `/pq/roots.pem`) and `mutual revoke`: python cryptography's PolicyBuilder verifies the chains, the
#     key files and the ML-DSA-signed CRL; `mutual verify` agrees, and refuses the revoked certificate by its code;
#  3. `mutual proxy` with an ML-DSA-65 server certificate: pyOpenSSL (OpenSSL 4 from the cryptography wheel) connects
#     with an ML-DSA-65 client certificate over X25519MLKEM768 and the backend sees its SPIFFE ID; a P-256 client of
#     the classical hierarchy is accepted through the same mixed bundle; /metrics counts both by group and key;
#  4. outbound: `mutual proxy --outbound` presents an ML-DSA-65 client certificate to a pyOpenSSL ML-DSA server that
#     requires one, over X25519MLKEM768;
#  5. the migration: `mutual agent` enrolls a P-256 identity (30 s certificates), a pyOpenSSL client calls through the
#     proxy as that identity without pause, `mutual pq migrate` moves it, and the agent's next renewals are ML-DSA-65
#     (the first over classical mTLS, the next with its ML-DSA certificate): zero failed requests.
# Prints "N passed, N failed".
set -uo pipefail
: "${VENV:?}" "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="$VENV/bin/python3"
PEERS="$ROOT/scripts/pq_peers.py"

# ---- 1. hand-built structures (Swift) checked by python cryptography
mkdir -p "$T/pq"
(cd "$ROOT" && MUTUAL_PQ_OUT="$T/pq" swift test --skip-build --filter MLDSATests > "$T/swift.log" 2>&1) || { bad "the ML-DSA Swift tests: $(grep -E '✘' "$T/swift.log" | head -5)"; }
"$PY" "$ROOT/scripts/pq_verify.py" "$T/pq" > "$T/py.log" 2>&1
grep -E '^(ok|FAIL) ' "$T/py.log"
pass=$((pass + $(grep -c '^ok ' "$T/py.log")))
fail=$((fail + $(grep -c '^FAIL ' "$T/py.log")))
grep -q '^ML-DSA' "$T/py.log" || bad "the python checker did not finish: $(tail -5 "$T/py.log")"

# ---- 2. the CLI and the authority
D="$T/cli"; S="$D/state"; mkdir -p "$D"
check "mutual init --key-type ml-dsa-65 makes both hierarchies" "$MUTUAL" init --state-dir "$S" --name "PQ Interop" --key-type ml-dsa-65
"$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$T/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "CRL and OCSP on" "$T/serve.log" && break; sleep 0.1; done
HTTP=$(grep -o 'http://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
[ -n "$HTTP" ] && ok "mutual serve is up with the ML-DSA hierarchy ($HTTP)" || { bad "mutual serve did not start: $(tail -3 "$T/serve.log")"; echo "ML-DSA interop: $pass passed, $fail failed"; exit 1; }
check "issue an ML-DSA-65 workload certificate" "$MUTUAL" issue --state-dir "$S" --key-type ml-dsa-65 --profile workload --uri spiffe://example.org/ns/web/sa/client --out-dir "$D/client"
check "issue an ML-DSA-65 server certificate" "$MUTUAL" issue --state-dir "$S" --key-type ml-dsa-65 --profile server --dns localhost --ip 127.0.0.1 --out-dir "$D/server"
check "issue an ML-DSA-87 server certificate" "$MUTUAL" issue --state-dir "$S" --key-type ml-dsa-87 --profile server --dns pq87.example.org --out-dir "$D/server87"
check "issue a P-256 workload certificate from the classical hierarchy" "$MUTUAL" issue --state-dir "$S" --profile workload --uri spiffe://example.org/ns/web/sa/legacy --out-dir "$D/legacy"
"$PY" "$PEERS" make-csr "$D"
check "mutual sign an ML-DSA-65 CSR made by python cryptography" "$MUTUAL" sign --state-dir "$S" --profile server --out "$D/signed.pem" "$D/csr.pem"
SERIAL87=$("$MUTUAL" list --state-dir "$S" --json | "$PY" -c 'import json,sys; print([c["serial"] for c in json.load(sys.stdin) if c["identity"] == "pq87.example.org"][0])')
check "mutual revoke the ML-DSA-87 certificate" "$MUTUAL" revoke --state-dir "$S" "$SERIAL87" --reason keyCompromise
curl -sf "$HTTP/pq/crl" -o "$D/pq.crl" && curl -sf "$HTTP/crl" -o "$D/classical.crl" && curl -sf "$HTTP/pq/roots.pem" -o "$D/pq-roots.pem" && curl -sf "$HTTP/roots.pem" -o "$D/roots.pem" \
  && ok "GET /pq/crl, /crl, /pq/roots.pem and /roots.pem over plain HTTP" || bad "the CRL and bundle endpoints"
# pkilint does not know the ML-DSA OIDs (it says so at NOTICE: "unsupported public key algorithm") and lints the rest.
for f in state/ca/pq-root.pem state/ca/pq-intermediate.pem client/cert.pem server/cert.pem server87/cert.pem signed.pem; do
  check "pkilint: nothing at WARNING or above for ML-DSA $f" lint lint_pkix_cert "$D/$f"
done
"$PY" "$PEERS" check "$D" "$HTTP" > "$T/check.log" 2>&1
grep -E '^(ok|FAIL) ' "$T/check.log"
pass=$((pass + $(grep -c '^ok ' "$T/check.log")))
fail=$((fail + $(grep -c '^FAIL ' "$T/check.log")))
grep -q '^ML-DSA CLI' "$T/check.log" || bad "the CLI-output checker did not finish: $(tail -5 "$T/check.log")"

out=$("$MUTUAL" verify --roots "$D/pq-roots.pem" --intermediates "$D/client/chain.pem" --eku clientAuth --uri spiffe://example.org/ns/web/sa/client --json "$D/client/cert.pem")
[ "$(jq -r .result <<<"$out")" = accepted ] && [ "$(jq -r .algorithm <<<"$out")" = ml-dsa-65 ] && ok "mutual verify accepts the ML-DSA-65 workload chain against the mixed bundle" || bad "mutual verify (ML-DSA): $out"
out=$("$MUTUAL" verify --roots "$D/pq-roots.pem" --intermediates "$D/server87/chain.pem" --crl "$D/pq.crl" --json "$D/server87/cert.pem"); rc=$?
[ $rc = 1 ] && [ "$(jq -r .code <<<"$out")" = revoked ] && ok "mutual verify --crl /pq/crl: the revoked ML-DSA-87 certificate is refused as revoked (exit 1)" || bad "mutual verify --crl: rc=$rc $out"
out=$("$MUTUAL" verify --roots "$D/pq-roots.pem" --intermediates "$D/client/chain.pem" --check-revocation --json "$D/client/cert.pem"); rc=$?
[ $rc = 0 ] && [ "$(jq -r .revocation <<<"$out")" = "good (OCSP $HTTP/ocsp)" ] && ok "mutual verify --check-revocation: the ML-DSA issuing CA's OCSP answer (ML-DSA signed) says good" || bad "mutual verify --check-revocation (ML-DSA, good): rc=$rc $out"
out=$("$MUTUAL" verify --roots "$D/pq-roots.pem" --intermediates "$D/server87/chain.pem" --check-revocation --json "$D/server87/cert.pem"); rc=$?
[ $rc = 1 ] && [ "$(jq -r .code <<<"$out")" = revoked ] && ok "mutual verify --check-revocation: the revoked ML-DSA-87 certificate is refused as revoked by OCSP" || bad "mutual verify --check-revocation (ML-DSA, revoked): rc=$rc $out"
out=$("$MUTUAL" verify --roots "$D/roots.pem" --intermediates "$D/client/chain.pem" --json "$D/client/cert.pem"); rc=$?
[ $rc = 1 ] && [ "$(jq -r .code <<<"$out")" = unknown_issuer ] && ok "mutual verify: the ML-DSA chain against the classical root alone is unknown_issuer" || bad "mutual verify (wrong root): rc=$rc $out"
out=$("$MUTUAL" verify --roots "$D/pq-roots.pem" --json "$D/legacy/cert.pem" --intermediates "$D/legacy/chain.pem"); rc=$?
[ $rc = 0 ] && ok "mutual verify: the P-256 chain against the mixed bundle is accepted" || bad "mutual verify (classical, mixed bundle): rc=$rc $out"

# ---- 3. inbound: pyOpenSSL ML-DSA client → mutual proxy (ML-DSA server certificate) → backend
"$PY" - "$T/backend.port" <<'PY' > "$T/backend.log" 2>&1 &
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Echo(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
server = HTTPServer(("127.0.0.1", 0), Echo)
open(sys.argv[1], "w").write(str(server.server_address[1]))
server.serve_forever()
PY
PIDS+=($!)
for _ in $(seq 50); do [ -s "$T/backend.port" ] && break; sleep 0.1; done
"$MUTUAL" proxy --listen 127.0.0.1:0 --upstream "http://127.0.0.1:$(cat "$T/backend.port")" --cert "$D/server/chain.pem" --key "$D/server/key.pem" \
  --client-ca "$D/pq-roots.pem" --allow 'spiffe://example.org/ns/web/*' --admin-listen 127.0.0.1:0 --access-log off > "$T/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "inbound listening on" "$T/proxy.log" && grep -q "admin listening on" "$T/proxy.log" && break; sleep 0.1; done
PPORT=$(grep -o 'inbound listening on 127.0.0.1:[0-9]*' "$T/proxy.log" | grep -o '[0-9]*$')
APORT=$(grep -o 'admin listening on 127.0.0.1:[0-9]*' "$T/proxy.log" | grep -o '[0-9]*$')
[ -n "$PPORT" ] && ok "mutual proxy listens with an ML-DSA-65 server certificate" || bad "mutual proxy did not start: $(tail -3 "$T/proxy.log")"
cat "$D/client/cert.pem" "$D/client/chain.pem" > /dev/null
out=$(timeout 30 "$PY" "$PEERS" client 127.0.0.1 "$PPORT" "$D/client/chain.pem" "$D/client/key.pem" "$D/server/root.pem" /whoami 2>&1)
echo "$out" | "$PY" -c '
import json, sys
s = json.loads(sys.stdin.read())
assert s["version"] == "TLSv1.3" and s["group"] == "X25519MLKEM768", s
assert s["server_signature"] == "2.16.840.1.101.3.4.3.18" and s["server_key"] == "MLDSA65PublicKey", s
assert s["status"] == 200, s
headers = json.loads(s["body"])
xfcc = headers.get("x-forwarded-client-cert", "")
assert "URI=spiffe://example.org/ns/web/sa/client" in xfcc, xfcc[:200]
print("TLS 1.3, X25519MLKEM768, ML-DSA-65 both ways, the backend saw URI=spiffe://example.org/ns/web/sa/client")
' > "$T/inbound.out" 2>&1 && ok "pyOpenSSL (ML-DSA-65 client) → mutual proxy: $(cat "$T/inbound.out")" || bad "inbound ML-DSA handshake: $out $(cat "$T/inbound.out")"
out=$(timeout 30 "$PY" "$PEERS" client 127.0.0.1 "$PPORT" "$D/legacy/chain.pem" "$D/legacy/key.pem" "$D/server/root.pem" /whoami 2>&1)
echo "$out" | "$PY" -c '
import json, sys
s = json.loads(sys.stdin.read()); assert s["status"] == 200 and "sa/legacy" in json.loads(s["body"]).get("x-forwarded-client-cert", ""), s
' 2>/dev/null && ok "a P-256 client of the classical hierarchy passes through the same listener (mixed client-CA bundle)" || bad "classical client through the ML-DSA proxy: $out"
# An ML-DSA client certificate of another hierarchy is refused in the handshake.
"$MUTUAL" init --state-dir "$D/other" --key-type ml-dsa-65 >/dev/null 2>&1
"$MUTUAL" issue --state-dir "$D/other" --key-type ml-dsa-65 --profile workload --uri spiffe://example.org/ns/web/sa/intruder --out-dir "$D/intruder" >/dev/null 2>&1
out=$(timeout 30 "$PY" "$PEERS" client 127.0.0.1 "$PPORT" "$D/intruder/chain.pem" "$D/intruder/key.pem" "$D/server/root.pem" /whoami 2>&1)
echo "$out" | grep -q '"status": 200' && bad "an ML-DSA client of another CA was let through: $out" || ok "an ML-DSA-65 client of another CA is refused in the handshake"
metrics=$(curl -sf "http://127.0.0.1:$APORT/metrics")
grep 'mutual_proxy_tls_handshakes_total{' <<<"$metrics" | grep 'group="X25519MLKEM768"' | grep 'server_key="ML-DSA-65"' | grep -q 'client_key="ML-DSA-65"' \
  && grep 'mutual_proxy_tls_handshakes_total{' <<<"$metrics" | grep -q 'client_key="P-256"' \
  && grep -q 'mutual_proxy_handshakes_total{.*reason="unknown_ca"' <<<"$metrics" \
  && ok "/metrics counts handshakes by group and certificate key (ML-DSA-65 and P-256 clients) and the refusal as unknown_ca" \
  || bad "proxy metrics: $(grep -E 'tls_handshakes|handshakes_total' <<<"$metrics" | head -8)"

# ---- 4. outbound: mutual proxy --outbound (ML-DSA-65 client certificate) → pyOpenSSL ML-DSA server
check "issue the upstream's ML-DSA-65 server certificate" "$MUTUAL" issue --state-dir "$S" --key-type ml-dsa-65 --profile server --dns localhost --ip 127.0.0.1 --out-dir "$D/upstream"
UPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
"$PY" "$PEERS" server "$UPORT" "$D/upstream/chain.pem" "$D/upstream/key.pem" "$D/upstream/root.pem" "$T/upstream.ready" > "$T/upstream.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -s "$T/upstream.ready" ] && break; sleep 0.1; done
"$MUTUAL" proxy --outbound --listen 127.0.0.1:0 --upstream "https://127.0.0.1:$UPORT" --cert "$D/client/chain.pem" --key "$D/client/key.pem" \
  --server-ca "$D/pq-roots.pem" --expect dns:localhost --access-log off > "$T/outbound.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$T/outbound.log" && break; sleep 0.1; done
OPORT=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$T/outbound.log" | head -1 | grep -o '[0-9]*$')
out=$(curl -s "http://127.0.0.1:$OPORT/hello")
echo "$out" | "$PY" -c '
import json, sys
s = json.loads(sys.stdin.read())
assert s["group"] == "X25519MLKEM768", s
assert s["client_uri"] == ["spiffe://example.org/ns/web/sa/client"] and s["client_key"] == "MLDSA65PublicKey", s
print("X25519MLKEM768, the upstream verified the ML-DSA-65 client certificate spiffe://example.org/ns/web/sa/client")
' > "$T/outbound.out" 2>&1 && ok "mutual proxy --outbound → pyOpenSSL ML-DSA server: $(cat "$T/outbound.out")" || bad "outbound ML-DSA: $out $(cat "$T/outbound.out") $(tail -3 "$T/outbound.log")"
# The outbound proxy refuses an upstream whose ML-DSA certificate names another host.
"$MUTUAL" proxy --outbound --listen 127.0.0.1:0 --upstream "https://127.0.0.1:$UPORT" --cert "$D/client/chain.pem" --key "$D/client/key.pem" \
  --server-ca "$D/pq-roots.pem" --expect dns:db.example.org --access-log off > "$T/outbound2.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$T/outbound2.log" && break; sleep 0.1; done
O2=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$T/outbound2.log" | head -1 | grep -o '[0-9]*$')
out=$(curl -s "http://127.0.0.1:$O2/hello"); sleep 0.3
# The outbound default is tcp mode: a refused upstream closes the local connection, and the log says why.
[ -z "$out" ] && grep -q "upstream_identity" "$T/outbound2.log" && grep -q "expected dns:db.example.org" "$T/outbound2.log" \
  && ok "an ML-DSA upstream that is not the expected identity is refused (connection closed, reason upstream_identity logged)" \
  || bad "outbound identity check: '$out' $(tail -3 "$T/outbound2.log")"

# ---- 5. an identity moves from P-256 to ML-DSA-65 at renewal while it calls through the proxy
A=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
FP=$(openssl x509 -in "$S/ca/root.pem" -outform DER | sha256sum | cut -d' ' -f1)
TOK=$("$MUTUAL" token create --state-dir "$S" --scope 'spiffe://example.org/ns/web/*' --max-validity 1h --uses 1 --ttl 1h --json | jq -r .token)
"$MUTUAL" agent --authority "$A" --root-fingerprint "$FP" --token "$TOK" --identity spiffe://example.org/ns/web/sa/mover \
  --out-dir "$D/mover" --validity 30s --log-level notice > "$T/agent.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -e "$D/mover/current" ] && break; sleep 0.1; done
[ "$(openssl x509 -in "$D/mover/cert.pem" -noout -text 2>/dev/null | grep -c 'id-ecPublicKey')" = 1 ] && ok "mutual agent enrolled spiffe://example.org/ns/web/sa/mover with P-256 (30 s certificates)" || bad "agent enrollment: $(tail -3 "$T/agent.log")"
LOOP_SECONDS=${PQ_LOOP_SECONDS:-45}
"$PY" "$PEERS" loop 127.0.0.1 "$PPORT" "$D/mover" "$D/server/root.pem" "$LOOP_SECONDS" "$T/loop.json" > "$T/loop.log" 2>&1 &
LOOP=$!
PIDS+=($LOOP)
sleep 3
check "mutual pq migrate 'spiffe://example.org/ns/web/sa/mover'" "$MUTUAL" pq migrate --state-dir "$S" 'spiffe://example.org/ns/web/sa/mover'
wait "$LOOP"
summary=$(cat "$T/loop.json" 2>/dev/null)
"$PY" - "$summary" <<'PY' > "$T/loop.out" 2>&1 && ok "$(cat "$T/loop.out")" || bad "migration under load: $summary $(cat "$T/loop.out") $(tail -5 "$T/agent.log")"
import json, sys
s = json.loads(sys.argv[1])
assert s["failures"] == 0, s
assert s["by_key"].get("ECPublicKey", 0) > 0 and s["by_key"].get("MLDSA65PublicKey", 0) > 0, s
print(f"{s['total']} requests through the proxy while the identity moved: {s['by_key']['ECPublicKey']} as P-256, {s['by_key']['MLDSA65PublicKey']} as ML-DSA-65, 0 failed")
PY
status=$("$MUTUAL" agent status --out-dir "$D/mover" --json)
renewals=$(jq -r .status.renewals <<<"$status")
[ "$(jq -r .status.state <<<"$status")" = ok ] && [ "${renewals:-0}" -ge 2 ] && openssl x509 -in "$D/mover/cert.pem" -noout -text 2>/dev/null | grep -q 'ML-DSA-65\|2.16.840.1.101.3.4.3.18' \
  && ok "the agent renewed $renewals times, now on ML-DSA-65 (the later renewals over mTLS with its ML-DSA certificate)" || bad "agent after the move: $status"
grep -q "key-type-required" <<<"$("$MUTUAL" audit list --state-dir "$S" --json)" \
  && ok "the audit trail holds the key-type-required refusal that moved it" || bad "no key-type-required in the audit trail"
report=$("$MUTUAL" pq report --state-dir "$S" --proxy-metrics "http://127.0.0.1:$APORT/metrics" --json)
"$PY" - "$report" <<'PY' > "$T/report.out" 2>&1 && ok "mutual pq report: $(cat "$T/report.out")" || bad "pq report: $report $(cat "$T/report.out")"
import json, sys
r = json.loads(sys.argv[1])
inventory = r["inventory"]
assert inventory["hierarchy"] == "ml-dsa-65", inventory
assert all(c["identity"] != "spiffe://example.org/ns/web/sa/mover" for c in inventory["classicalIdentities"]), "the mover is still listed as classical"
pq = sum(p["count"] for p in r["proxies"] if p["clientKey"] == "ML-DSA-65" and p["group"] == "X25519MLKEM768" and p["serverKey"] == "ML-DSA-65")
assert pq > 0 and not r["proxyErrors"], r
print(f"{inventory['postQuantumIdentities']} of {inventory['identities']} identities on ML-DSA, the mover among them; {int(pq)} proxy handshakes post-quantum on both axes")
PY

echo "ML-DSA interop: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
