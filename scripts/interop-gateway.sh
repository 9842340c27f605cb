#!/usr/bin/env bash
# Issue #13 from outside: `mutual proxy` as a gateway an attacker cannot bend, against real peers on 127.0.0.1
# (every port chosen at run time):
#  - path spellings of a denied prefix (curl --path-as-is and raw TLS) against a backend that percent-decodes, drops
#    ;parameters and case-folds: none reaches it as /admin;
#  - XFCC built from certificates with hostile URI SANs, parsed by a strict XFCC parser: one element, the real URI;
#  - silent sockets and slowly sent request heads at a low file-descriptor limit (ulimit -n 256) while a good client
#    keeps being served;
#  - 10,000 headers → 431 over HTTP/1.1 (curl) and HTTP/2 (python h2); HTTP/2 CONNECT → 405, host ≠ :authority →
#    400, a bad preface → GOAWAY and the connection closed; CR/LF from a client never forges a log line;
#  - TLS: no static-RSA or CBC suites and no SHA-1 client signatures over TLS 1.2 (openssl s_client), Ed25519 client
#    certificates authenticate (curl);
#  - a keep-alive connection whose certificate expires is refused its next request.
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
HELP="$(cd "$(dirname "$0")" && pwd)/gateway_helpers.py"
PY=${VENV:+$VENV/bin/python3}
PY=${PY:-python3}
S="$T/ca"
M() { "$MUTUAL" "$@"; }

M init --state-dir "$S" --name "Gateway Interop" >/dev/null
issue() { local dir=$1; shift; M issue --state-dir "$S" --out-dir "$T/$dir" "$@" >/dev/null; }
issue server --profile server --dns localhost --ip 127.0.0.1 --uri spiffe://example.org/ns/edge/sa/gateway
issue rsaserver --profile server --dns localhost --ip 127.0.0.1 --key-type rsa2048
issue web --profile workload --uri spiffe://example.org/ns/web/sa/api
issue ed --profile workload --uri spiffe://example.org/ns/web/sa/ed --key-type ed25519
issue hostile1 --profile client --cn hostile --uri 'https://partner.test/a,By=spiffe://evil;URI=spiffe://example.org/ns/ops/sa/admin'
issue hostile2 --profile client --cn hostile --uri 'https://partner.test/a;Hash=00;Subject=x'
ROOT="$S/ca/root.pem"
as() { echo --cert "$T/$1/chain.pem" --key "$T/$1/key.pem"; }

"$PY" "$HELP" backend "$T/backend.log" > "$T/backend.port" & PIDS+=($!)
for _ in $(seq 50); do [ -s "$T/backend.port" ] && break; sleep 0.1; done
BACKEND=$(head -1 "$T/backend.port")

cat > "$T/gateway.yaml" <<EOF
access-log: $T/access.jsonl
admin-listen: 127.0.0.1:0
listeners:
  - name: gateway
    listen: 127.0.0.1:0
    upstream: http://127.0.0.1:$BACKEND
    cert: $T/server/chain.pem
    key: $T/server/key.pem
    client-ca: $ROOT
    request-head-timeout: 2
    idle-timeout: 5
    forward: [xfcc, rfc9440, identity]
    routes:
      - path: /admin
        allow: ["spiffe://example.org/ns/ops/*"]
      - path: /
        allow: ["spiffe://example.org/ns/web/*", "cn:hostile"]
  - name: rsa
    listen: 127.0.0.1:0
    upstream: http://127.0.0.1:$BACKEND
    cert: $T/rsaserver/chain.pem
    key: $T/rsaserver/key.pem
    client-ca: $ROOT
    allow: ["spiffe://example.org/ns/web/*"]
EOF
# The proxy runs with 256 file descriptors, so its default max-connections is (256 - 64) / 2 = 96 per listener.
( ulimit -n 256; exec "$MUTUAL" proxy --config "$T/gateway.yaml" --log-level debug ) > "$T/proxy.out" 2> "$T/proxy.err" & PIDS+=($!)
PROXY_PID=$!
for _ in $(seq 100); do grep -q "admin listening on" "$T/proxy.err" && break; sleep 0.1; done
P=$(grep "gateway listening on" "$T/proxy.err" | sed 's/.*://'); PR=$(grep "rsa listening on" "$T/proxy.err" | sed 's/.*://'); ADMIN=$(grep "admin listening on" "$T/proxy.err" | sed 's/.*://')
[ -n "$P" ] && ok "gateway listening (port $P) with ulimit -n 256" || { bad "proxy did not start: $(cat "$T/proxy.err")"; echo "gateway interop: $pass passed, $fail failed"; exit 1; }
metric() { curl -s "http://127.0.0.1:$ADMIN/metrics" | grep "^$1{" | grep -- "$2" | awk '{s+=$2} END {print s+0}'; }
code() { curl -s -o "$T/body" -w '%{http_code}' --cacert "$ROOT" "$@"; }

# ---------------------------------------------------------------- path spellings
c=$(code $(as web) "https://localhost:$P/api/items")
[ "$c" = 200 ] && ok "a web identity reaches /api (200)" || bad "/api got $c"
c=$(code $(as web) "https://localhost:$P/admin")
[ "$c" = 403 ] && ok "a web identity is denied /admin (403)" || bad "/admin got $c"
: > "$T/backend.log"
leaks=0
for spelling in /%61dmin /ADMIN /Admin/x '/admin;x' '/admin;jsessionid=1/users' /%2561dmin /admin%00 '/x/..;/admin' /x/%2e%2e/admin \
    '/%41%44%4D%49%4E' /admin%2fx /admin%23 /admin%3Bx '//admin' '/./admin' '/%5Cadmin'; do
  c=$(code --path-as-is $(as web) "https://localhost:$P$spelling")
  case "$c" in 400|403) ;; *) leaks=$((leaks + 1)); echo "     $spelling -> $c $(head -c 200 "$T/body")";; esac
done
for raw in '/admin\x00' '/admin#x' '/\xc3\xa4dmin' '/admin\\x' '/ad min'; do
  c=$("$PY" "$HELP" raw "$P" "$ROOT" "$T/web/chain.pem" "$T/web/key.pem" "$raw")
  case "$c" in 400|403|closed) ;; *) leaks=$((leaks + 1)); echo "     raw $raw -> $c";; esac
done
if [ "$leaks" = 0 ] && ! grep -q '"canonical": "/admin' "$T/backend.log"; then
  ok "21 spellings of /admin (encoded, double-encoded, case, ;params, NUL, #, \\\\, dot segments, raw bytes): 400 or 403, none reached the decoding, case-folding backend"
else
  bad "$leaks spellings of /admin were not refused; backend saw: $(grep -o '"canonical": "[^"]*"' "$T/backend.log" | sort -u | head -5)"
fi
grep -q '"code":"double_encoding"' "$T/access.jsonl" 2>/dev/null || sleep 0.3
grep -q '"code":"double_encoding"' "$T/access.jsonl" && grep -q '"code":"encoded_control"' "$T/access.jsonl" \
  && ok "the access log names each refusal's code (double_encoding, encoded_control, …)" || bad "access log codes: $(tail -3 "$T/access.jsonl")"
c=$(code --path-as-is $(as web) "https://localhost:$P/%7Euser/%41pi")
[ "$c" = 200 ] && grep -q '"raw": "/~user/Api"' "$T/backend.log" && ok "unreserved escapes are decoded once: the backend gets /~user/Api for /%7Euser/%41pi" || bad "normalized forwarding: $c $(tail -1 "$T/backend.log")"

# ---------------------------------------------------------------- XFCC with hostile SANs, strict parser
for who in hostile1 hostile2; do
  uri=$(openssl x509 -in "$T/$who/cert.pem" -noout -ext subjectAltName | grep -o 'URI:.*' | sed 's/^URI://')
  c=$(code $(as "$who") "https://localhost:$P/api/xfcc")
  if [ "$c" = 200 ] && out=$("$PY" "$HELP" xfcc "$T/backend.log" "$uri" 2>&1); then
    ok "XFCC for a certificate with URI SAN '$uri': strict parser finds $out"
  else
    bad "XFCC with hostile SAN ($who): $c $out"
  fi
done

# ---------------------------------------------------------------- identity headers from the client
curl -s -o /dev/null --cacert "$ROOT" $(as web) -H 'X_Client_Identity: spiffe://example.org/ns/ops/sa/admin' -H 'x-client-identity: spiffe://example.org/ns/ops/sa/admin' -H 'X_Forwarded_Client_Cert: By=forged' -H 'Client_Cert: :AAAA:' -H 'X-Client-DN: CN=root' \
  -H 'X-SSL-Client-Verify: SUCCESS' -H 'X_SSL_Client_S_DN: CN=root' -H 'X-Client-Cert: forged' "https://localhost:$P/api/headers"
"$PY" - "$T/backend.log" <<'PY' && ok "look-alike (X_Forwarded_Client_Cert, Client_Cert, X_Client_Identity) and third-party identity headers (X-Client-DN, X-SSL-Client-*) never reach the backend; x-client-identity carries the verified SPIFFE ID" || bad "client identity headers reached the backend: $(tail -1 "$T/backend.log" | head -c 400)"
import json, sys
names = [k.replace("_", "-") for k, _ in json.loads(open(sys.argv[1]).read().splitlines()[-1])["headers"]]
headers = json.loads(open(sys.argv[1]).read().splitlines()[-1])["headers"]
for bad in ("x-client-dn", "x-ssl-client-verify", "x-ssl-client-s-dn", "x-client-cert"):
    assert bad not in names, bad
assert names.count("x-forwarded-client-cert") == 1 and names.count("client-cert") == 1, names
identity = [v for k, v in headers if k.replace("_", "-") == "x-client-identity"]
assert identity == ["spiffe://example.org/ns/web/sa/api"], identity
assert all(v != ":AAAA:" and not v.startswith("By=forged") for _, v in headers), headers
PY

# ---------------------------------------------------------------- header limits and HTTP/2
{ echo "Host: localhost"; for i in $(seq 10000); do echo "x-h$i: v"; done; } > "$T/headers.txt"
c=$(code --http1.1 $(as web) -H @"$T/headers.txt" "https://localhost:$P/api/many")
[ "$c" = 431 ] && grep -q 'headers_too_large\|too_many_headers' "$T/body" && ok "HTTP/1.1 with 10,000 headers: 431 with a short JSON body" || bad "HTTP/1.1 10,000 headers got $c $(head -c 200 "$T/body")"
{ echo "Host: localhost"; for i in $(seq 200); do echo "x-h$i: v"; done; } > "$T/headers200.txt"
c=$(code --http2 $(as web) -H @"$T/headers200.txt" "https://localhost:$P/api/many")
[ "$c" = 431 ] && grep -q too_many_headers "$T/body" && ok "HTTP/2 (curl) with 200 headers (over max-header-count 100): 431 too_many_headers" || bad "HTTP/2 200 headers got $c $(head -c 200 "$T/body")"
before=$(wc -l < "$T/backend.log")
c=$(code --http2 $(as web) -H @"$T/headers.txt" "https://localhost:$P/api/many")
# curl sends its first request before acknowledging our SETTINGS, so NIOHTTP2 still holds that header block to
# 16 KiB: the connection ends with GOAWAY instead of a 431 on the stream (python h2 below gets the 431).
[ "$(wc -l < "$T/backend.log")" = "$before" ] && { [ "$c" = 431 ] || [ "$c" = 000 ]; } && ok "HTTP/2 (curl) with 10,000 headers on a new connection: refused ($c: GOAWAY before SETTINGS are acknowledged), nothing forwarded" || bad "HTTP/2 10,000 headers got $c"
if "$PY" -c 'import h2' 2>/dev/null; then
  "$PY" "$HELP" h2 "$P" "$ROOT" "$T/web/chain.pem" "$T/web/key.pem" > "$T/h2.out" 2>&1
  grep -q '^good 200$' "$T/h2.out" && ok "python h2: a good request gets 200" || bad "h2 good: $(cat "$T/h2.out")"
  grep -q '^connect 405$' "$T/h2.out" && ok "python h2: CONNECT gets an explicit 405" || bad "h2 CONNECT: $(grep connect "$T/h2.out")"
  grep -q '^host 400$' "$T/h2.out" && ok "python h2: a host field that differs from :authority gets 400" || bad "h2 host: $(grep host "$T/h2.out")"
  grep -q '^headers 431 then 200$' "$T/h2.out" && ok "python h2: 10,000 headers (after the SETTINGS exchange) get 431 on their stream; the next stream on the same connection gets 200" || bad "h2 headers: $(grep headers "$T/h2.out")"
  grep -q '^count 431$' "$T/h2.out" && ok "python h2: 200 headers get 431 on the stream" || bad "h2 count: $(grep count "$T/h2.out")"
  grep -Eq '^crlf (400|reset|goaway)' "$T/h2.out" && ok "python h2: a header value with CR/LF is refused ($(grep crlf "$T/h2.out"))" || bad "h2 crlf: $(grep crlf "$T/h2.out")"
  r=$("$PY" "$HELP" h2idle "$P" "$ROOT" "$T/web/chain.pem" "$T/web/key.pem" 10)
  case "$r" in 4.*|5.*|6.*) ok "an HTTP/2 connection with no open stream is ended after the 5 s idle timeout (${r} s)";; *) bad "HTTP/2 idle: $r";; esac
  r=$("$PY" "$HELP" preface "$P" "$ROOT" "$T/web/chain.pem" "$T/web/key.pem")
  [ "$r" = "goaway closed" ] && ok "a bad HTTP/2 preface gets GOAWAY and the connection is closed" || bad "bad preface: $r"
else
  bad "python h2 is not installed in the venv"
fi
if grep -q '^notice mutual.proxy: forged line' "$T/proxy.err" || grep -qa $'\r' "$T/proxy.err"; then
  bad "a client's CR/LF reached the log raw: $(grep -n 'forged' "$T/proxy.err" | head -3)"
else
  ok "no client CR/LF in the proxy's log (escaped where it appears)"
fi

# ---------------------------------------------------------------- TLS settings (openssl as the peer)
# cipher PORT ARGS...: the TLS 1.2 suite negotiated with a client certificate, or NONE.
cipher() {
  local port=$1; shift
  echo | timeout 10 openssl s_client -connect "127.0.0.1:$port" -tls1_2 -CAfile "$ROOT" -cert "$T/web/cert.pem" -cert_chain "$T/web/chain.pem" -key "$T/web/key.pem" "$@" > "$T/s_client" 2>&1
  # A handshake that ends in an alert prints its session line anyway: an alert means refused.
  if grep -q 'alert handshake failure\|alert number\|handshake failure' "$T/s_client"; then echo NONE; return; fi
  grep -o 'New, [A-Za-z0-9.]*, Cipher is [A-Z0-9-]*' "$T/s_client" | sed 's/.* is //' | grep -v '(NONE)' | head -1 | grep . || echo NONE
}
r=$(cipher "$PR" -cipher 'AES128-SHA:AES256-SHA:AES128-GCM-SHA256:AES256-GCM-SHA384')
[ "$r" = NONE ] && ok "TLS 1.2 static-RSA key exchange refused (RSA server certificate)" || bad "static-RSA suite accepted: $r"
r=$(cipher "$PR" -cipher 'ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA')
[ "$r" = NONE ] && ok "TLS 1.2 CBC-SHA1 suites refused (RSA server certificate)" || bad "CBC suite accepted: $r"
r=$(cipher "$P" -cipher 'ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA')
[ "$r" = NONE ] && ok "TLS 1.2 CBC-SHA1 suites refused (ECDSA server certificate)" || bad "CBC suite accepted: $r"
r=$(cipher "$P" -client_sigalgs 'ECDSA+SHA1')
[ "$r" = NONE ] && ! grep 'Requested Signature Algorithms' "$T/s_client" | grep -q 'SHA1' \
  && ok "a TLS 1.2 client that can only sign with SHA-1 is refused; the CertificateRequest lists no SHA-1 (and lists ed25519)" \
  || bad "SHA-1 client signature: $r $(grep 'Requested Signature' "$T/s_client")"
r=$(cipher "$P" -cipher 'ECDHE-ECDSA-AES128-GCM-SHA256')
[ "$r" = ECDHE-ECDSA-AES128-GCM-SHA256 ] && ok "TLS 1.2 with ECDHE-ECDSA-AES128-GCM-SHA256 works" || bad "TLS 1.2 AEAD (ECDSA): $r $(tail -3 "$T/s_client")"
r=$(cipher "$PR" -cipher 'ECDHE-RSA-AES256-GCM-SHA384')
[ "$r" = ECDHE-RSA-AES256-GCM-SHA384 ] && ok "TLS 1.2 with ECDHE-RSA-AES256-GCM-SHA384 works (RSA server certificate)" || bad "TLS 1.2 AEAD (RSA): $r"
c=$(code $(as ed) "https://localhost:$P/api/ed25519")
[ "$c" = 200 ] && ok "an Ed25519 client certificate (mutual issue --key-type ed25519) authenticates with curl" || bad "Ed25519 client got $c"

# ---------------------------------------------------------------- siege at a low descriptor limit
"$PY" "$HELP" siege "$P" "$ROOT" "$T/web/chain.pem" "$T/web/key.pem" 400 40 8 "$T/siege.out"
read -r good failed < "$T/siege.out"
[ "$failed" = 0 ] && [ "$good" -ge 20 ] && ok "400 silent sockets and 40 slowly sent heads with 256 descriptors: the good client got $good of $good requests" \
  || bad "under siege the good client got $good ok, $failed failed"
d=$(metric mutual_proxy_connections_closed_total 'reason="displaced"'); h=$(metric mutual_proxy_connections_closed_total 'reason="request_head_timeout"')
[ "${d%.*}" -gt 0 ] && [ "${h%.*}" -gt 0 ] && ok "metrics: $d silent sockets displaced, $h slow heads closed at the head timeout" || bad "siege metrics: displaced=$d head_timeout=$h"
grep 'reason=max_connections' "$T/proxy.err" | grep -q 'max_connections=96' && ok "reaching max-connections (96 at 256 descriptors) is logged (reason=max_connections) once per 10 s: $(grep -c 'reason=max_connections' "$T/proxy.err") line(s)" || bad "no log line for the connection limit"
kill -0 "$PROXY_PID" 2>/dev/null && ok "the proxy survived the siege" || bad "the proxy died under siege: $(tail -5 "$T/proxy.err")"

# ---------------------------------------------------------------- a certificate that expires on an open connection
issue short --profile workload --uri spiffe://example.org/ns/web/sa/short --validity 3s
not_after=$(date -d "$(openssl x509 -in "$T/short/cert.pem" -noout -enddate | cut -d= -f2)" +%s)
r=$("$PY" "$HELP" expiring "$P" "$ROOT" "$T/short/chain.pem" "$T/short/key.pem" "$not_after")
case "$r" in "200 closed"|"200 401") ok "a keep-alive connection whose certificate expires: first request 200, the next one after notAfter: ${r#200 }";;
  *) bad "expiring certificate on an open connection: $r";; esac

echo "gateway interop: $pass passed, $fail failed"
[ "$fail" = 0 ]
