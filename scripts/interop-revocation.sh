#!/usr/bin/env bash
# Revocation interop with real peers, against a real `mutual serve` on 127.0.0.1 (ports chosen at run time):
#  - openssl ocsp: good before, revoked after `mutual revoke`; "Response verify OK"; GET form with curl;
#  - openssl crl -verify accepts the CRL; openssl verify -crl_check rejects the revoked leaf;
#  - pkilint lint_crl / lint_ocsp_response report nothing at WARNING;
#  - python cryptography parses the CRL and OCSP responses and verifies their signatures;
#  - nginx with ssl_crl refuses the revoked client certificate and accepts a good one;
#  - mutual verify --ocsp and --crl agree; malformed OCSP requests get a malformedRequest answer;
#  - the event stream delivers the revocation.
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}" "${VENV:?}"
. "$(dirname "$0")/harness.sh"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

S="$T/state"
"$MUTUAL" init --state-dir "$S" --name "Revocation Interop" >/dev/null
"$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$T/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "CRL and OCSP on" "$T/serve.log" && break; sleep 0.1; done
HTTP=$(grep -o 'http://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
HTTPS=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
[ -n "$HTTP" ] && ok "mutual serve is up ($HTTPS, $HTTP)" || { bad "mutual serve did not start"; cat "$T/serve.log"; echo "revocation interop: $pass passed, $((fail)) failed"; exit 1; }

"$MUTUAL" issue --state-dir "$S" --profile client --cn victim --out-dir "$T/victim" >/dev/null
"$MUTUAL" issue --state-dir "$S" --profile client --cn bystander --out-dir "$T/good" >/dev/null
"$MUTUAL" issue --state-dir "$S" --profile server --dns localhost --ip 127.0.0.1 --out-dir "$T/server" >/dev/null
if openssl x509 -in "$T/victim/cert.pem" -noout -text | grep -q "URI:$HTTP/crl"; then ok "certificates carry the CRL distribution point"; else bad "no CRL DP"; fi
if openssl x509 -in "$T/victim/cert.pem" -noout -ocsp_uri | grep -q "$HTTP/ocsp"; then ok "certificates carry the OCSP URL in AIA"; else bad "no OCSP AIA"; fi

ocsp_status() {  # prints good|revoked|unknown from openssl ocsp's status line; checks the signature verified
  openssl ocsp -url "$HTTP/ocsp" -issuer "$S/ca/intermediate.pem" -cert "$1" -CAfile "$S/ca/root.pem" -respout "$T/resp.der" > "$T/ocsp.txt" 2>&1
  grep -q "Response verify OK" "$T/ocsp.txt" || { echo "noverify"; return; }
  awk -v f="$1: " 'index($0, f) == 1 { print substr($0, length(f) + 1) }' "$T/ocsp.txt"
}
[ "$(ocsp_status "$T/victim/cert.pem")" = good ] && ok "openssl ocsp: good before revocation (Response verify OK)" || { bad "openssl ocsp before: $(cat "$T/ocsp.txt")"; }
check "pkilint lint_ocsp_response (good)" "$VENV/bin/lint_ocsp_response" lint -s WARNING "$T/resp.der"
check "mutual verify --ocsp: good" "$MUTUAL" verify --roots "$S/ca/root.pem" --intermediates "$S/ca/intermediate.pem" --eku clientAuth --ocsp "$HTTP/ocsp" "$T/victim/cert.pem"

# Subscribe to the event stream before revoking.
curl -sN --max-time 6 --cacert "$S/ca/root.pem" "$HTTPS/v1/revocations/events" > "$T/events.txt" &
PIDS+=($!)
sleep 0.5
serial=$(openssl x509 -in "$T/victim/cert.pem" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f')
check "mutual revoke" "$MUTUAL" revoke --state-dir "$S" "$serial" --reason keyCompromise
sleep 0.3
[ "$(ocsp_status "$T/victim/cert.pem")" = revoked ] && ok "openssl ocsp: revoked after mutual revoke" || bad "openssl ocsp after: $(cat "$T/ocsp.txt")"
grep -q "Reason: keyCompromise" "$T/ocsp.txt" && ok "OCSP carries the revocation reason" || bad "no reason in OCSP"
check "pkilint lint_ocsp_response (revoked)" "$VENV/bin/lint_ocsp_response" lint -s WARNING "$T/resp.der"
cp "$T/resp.der" "$T/resp-revoked.der"
[ "$(ocsp_status "$T/good/cert.pem")" = good ] && ok "openssl ocsp: other certificate still good" || bad "bystander not good"
if "$MUTUAL" verify --roots "$S/ca/root.pem" --intermediates "$S/ca/intermediate.pem" --ocsp "$HTTP/ocsp" "$T/victim/cert.pem" > "$T/out" 2>&1; then
  bad "mutual verify --ocsp accepted a revoked certificate"; else grep -q revoked "$T/out" && ok "mutual verify --ocsp rejects the revoked certificate" || bad "wrong reason: $(cat "$T/out")"; fi

# GET form (RFC 6960 A.1) with curl.
openssl ocsp -issuer "$S/ca/intermediate.pem" -cert "$T/victim/cert.pem" -no_nonce -reqout "$T/req.der" >/dev/null 2>&1
b64=$(base64 -w0 < "$T/req.der" | python3 -c 'import sys,urllib.parse;print(urllib.parse.quote(sys.stdin.read().strip(), safe=""))')
curl -s -D "$T/get.h" "$HTTP/ocsp/$b64" -o "$T/get.der"
openssl ocsp -respin "$T/get.der" -issuer "$S/ca/intermediate.pem" -cert "$T/victim/cert.pem" -CAfile "$S/ca/root.pem" > "$T/get.txt" 2>&1
if grep -q ": revoked" "$T/get.txt"; then
  ok "OCSP over GET (curl) answers revoked"; else bad "OCSP GET"; fi
grep -qi "cache-control: public, max-age=" "$T/get.h" && ok "OCSP response has Cache-Control max-age" || bad "no Cache-Control: $(cat "$T/get.h")"

# Malformed requests get a malformedRequest OCSP answer, never a crash.
for body in "garbage" "$(head -c 20 "$T/req.der")"; do
  printf '%s' "$body" | curl -s -H 'Content-Type: application/ocsp-request' --data-binary @- "$HTTP/ocsp" -o "$T/mal.der"
  openssl ocsp -respin "$T/mal.der" > "$T/mal.txt" 2>&1
  if grep -q "malformedrequest" "$T/mal.txt"; then ok "malformed OCSP request -> malformedRequest"; else bad "malformed OCSP: $(cat "$T/mal.txt")"; fi
done
curl -s "$HTTP/ocsp/%%%not-base64" -o "$T/mal.der"
openssl ocsp -respin "$T/mal.der" > "$T/mal.txt" 2>&1
grep -q "malformedrequest" "$T/mal.txt" && ok "invalid base64 GET -> malformedRequest" || bad "bad GET path: $(cat "$T/mal.txt")"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$HTTP/v1/certificates")" = 404 ] && ok "plain HTTP serves nothing but CRL/OCSP/roots" || bad "plain HTTP exposes the API"

# CRL
curl -s "$HTTP/crl" -o "$T/crl.der"
curl -s "$HTTP/crl.pem" -o "$T/crl.pem"
check "openssl crl -verify accepts the CRL" sh -c "openssl crl -inform DER -in '$T/crl.der' -noout -CAfile '$S/ca/intermediate.pem' -verify 2>&1 | grep -q 'verify OK'"
if openssl verify -crl_check -CRLfile "$T/crl.pem" -CAfile "$S/ca/root.pem" -untrusted "$S/ca/intermediate.pem" "$T/victim/cert.pem" >/dev/null 2>&1; then
  bad "openssl verify -crl_check accepted the revoked leaf"; else ok "openssl verify -crl_check rejects the revoked leaf"; fi
check "openssl verify -crl_check accepts the good leaf" openssl verify -crl_check -CRLfile "$T/crl.pem" -CAfile "$S/ca/root.pem" -untrusted "$S/ca/intermediate.pem" "$T/good/cert.pem"
check "pkilint lint_crl" "$VENV/bin/lint_crl" lint -t CRL -p PKIX -s WARNING "$T/crl.der"
check "mutual verify --crl rejects the revoked leaf (exit 1)" sh -c "'$MUTUAL' verify --roots '$S/ca/root.pem' --intermediates '$S/ca/intermediate.pem' --crl '$T/crl.pem' '$T/victim/cert.pem'; [ \$? -eq 1 ]"

# python cryptography: a second parser, and signature checks done by hand.
check "python cryptography parses and verifies the CRL and OCSP responses" "$VENV/bin/python" - "$T/crl.der" "$T/resp-revoked.der" "$S/ca/intermediate.pem" "$serial" <<'PY'
import sys
from cryptography import x509
from cryptography.x509 import ocsp
from cryptography.hazmat.primitives.asymmetric import ec
crl = x509.load_der_x509_crl(open(sys.argv[1], "rb").read())
issuer = x509.load_pem_x509_certificate(open(sys.argv[3], "rb").read())
assert crl.is_signature_valid(issuer.public_key()), "CRL signature"
entry = crl.get_revoked_certificate_by_serial_number(int(sys.argv[4], 16))
assert entry is not None, "serial on CRL"
assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 2
resp = ocsp.load_der_ocsp_response(open(sys.argv[2], "rb").read())
assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED
signer = resp.certificates[0]
issuer.public_key().verify(signer.signature, signer.tbs_certificate_bytes, ec.ECDSA(signer.signature_hash_algorithm))
signer.public_key().verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))
assert x509.ExtendedKeyUsageOID.OCSP_SIGNING in signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
print("ok")
PY

# Events
sleep 1
grep -q "\"serial\":\"$serial\"" "$T/events.txt" && ok "the event stream delivered the revocation" || bad "no event: $(cat "$T/events.txt")"
last=$(grep '^id:' "$T/events.txt" | tail -1 | cut -d' ' -f2)
curl -s --cacert "$S/ca/root.pem" "$HTTPS/v1/revocations?since=1" | grep -q "$serial" && ok "GET /v1/revocations?since=1 lists it" || bad "catch-up"

# Every level of the chain has a CRL: the root's (made by `mutual init`, re-signed by `mutual root-crl`) and the
# issuing CA's. /crls.pem serves both, as nginx's ssl_crl (which checks every level) wants them.
curl -s --cacert "$S/ca/root.pem" "$HTTPS/crls.pem" -o "$T/all-crls.pem"
[ "$(grep -c 'BEGIN X509 CRL' "$T/all-crls.pem")" = 2 ] && ok "/crls.pem holds the root CRL and the issuing CA's CRL" || bad "crls.pem: $(head -c 200 "$T/all-crls.pem")"
openssl crl -in "$S/ca/root-crl.pem" -outform DER -out "$T/root-crl.der"
check "pkilint lint_crl (root CRL)" "$VENV/bin/lint_crl" lint -t CRL -p PKIX -s WARNING "$T/root-crl.der"
check "openssl verify -crl_check_all accepts the good leaf with /crls.pem" openssl verify -crl_check_all -CRLfile "$T/all-crls.pem" -CAfile "$S/ca/root.pem" -untrusted "$S/ca/intermediate.pem" "$T/good/cert.pem"
if openssl verify -crl_check_all -CRLfile "$T/all-crls.pem" -CAfile "$S/ca/root.pem" -untrusted "$S/ca/intermediate.pem" "$T/victim/cert.pem" >/dev/null 2>&1; then
  bad "openssl verify -crl_check_all accepted the revoked leaf"; else ok "openssl verify -crl_check_all rejects the revoked leaf"; fi
check "mutual root-crl re-signs the root CRL with the next number" sh -c "'$MUTUAL' root-crl --state-dir '$S' | grep -q 'root CRL #2'"

# nginx with ssl_crl
if command -v nginx >/dev/null 2>&1; then
  cat "$S/ca/root.pem" "$S/ca/intermediate.pem" > "$T/client-cas.pem"
  NP=$(free_port)
  mkdir -p "$T/nginx"
  cat > "$T/nginx/nginx.conf" <<NGX
daemon off;
worker_processes 1;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log;
events { worker_connections 64; }
http {
  access_log off;
  client_body_temp_path $T/nginx; proxy_temp_path $T/nginx; fastcgi_temp_path $T/nginx; uwsgi_temp_path $T/nginx; scgi_temp_path $T/nginx;
  server {
    listen 127.0.0.1:$NP ssl;
    ssl_certificate $T/server/chain.pem;
    ssl_certificate_key $T/server/key.pem;
    ssl_client_certificate $T/client-cas.pem;
    ssl_verify_client on;
    ssl_verify_depth 3;
    ssl_crl $T/all-crls.pem;
    location / { return 200 "hello \$ssl_client_s_dn\n"; }
  }
}
NGX
  nginx -c "$T/nginx/nginx.conf" &
  PIDS+=($!)
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$NP) 2>/dev/null && break; sleep 0.1; done
  code_good=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$S/ca/root.pem" --cert "$T/good/chain.pem" --key "$T/good/key.pem" "https://127.0.0.1:$NP/")
  code_bad=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$S/ca/root.pem" --cert "$T/victim/chain.pem" --key "$T/victim/key.pem" "https://127.0.0.1:$NP/")
  [ "$code_good" = 200 ] && ok "nginx (ssl_crl) accepts a good client certificate" || bad "nginx good: $code_good $(tail -3 "$T/nginx/error.log")"
  [ "$code_bad" = 400 ] && ok "nginx (ssl_crl) refuses the revoked client certificate" || bad "nginx revoked: $code_bad"
else
  bad "nginx is not installed"
fi

# Graceful stop
kill -TERM "${PIDS[0]}"
for _ in $(seq 100); do kill -0 "${PIDS[0]}" 2>/dev/null || break; sleep 0.1; done
kill -0 "${PIDS[0]}" 2>/dev/null && bad "mutual serve did not stop on SIGTERM" || ok "mutual serve stopped on SIGTERM with an event stream open"

echo
echo "revocation interop: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
