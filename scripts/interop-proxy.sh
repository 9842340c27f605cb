#!/usr/bin/env bash
# The mTLS proxy against real peers on 127.0.0.1 (every port chosen at run time):
#  - curl and openssl s_client with good, expired, wrong-CA, wrong-EKU, revoked, disallowed certificates and none;
#  - a forged x-forwarded-client-cert / Client-Cert from the client never reaches the echo backend;
#  - optional mTLS: open /healthz, 401 without a certificate, 403 for a denied identity, 400 for dot segments;
#  - TLS session resumption (1.2 and 1.3) keeps the verified identity;
#  - revocation: a CRL file rewritten -> refused on new handshakes and the open connection closed; the authority's
#    event stream (real `mutual serve`) -> the same within 1 s of `mutual revoke`;
#  - reload: broken PEM and a key that does not match keep the old state; rotation of the server certificate and the
#    client-CA bundle under steady load: zero failed requests;
#  - tcp mode with a PROXY v2 header; outbound mode to nginx with ssl_verify_client; nginx as the backend;
#  - YAML config, bad input exits 2 with a reason, /metrics, SIGHUP, SIGTERM drain;
#  - then scripts/interop-gateway.sh: the attacks of issue #13 (path spellings, hostile SANs, forged identity headers,
#    header limits, HTTP/2 framing, TLS settings, a siege at a low descriptor limit, expiry on open connections).
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
HELP="$(cd "$(dirname "$0")" && pwd)/proxy_helpers.py"
S="$T/ca"
M() { "$MUTUAL" "$@"; }

M init --state-dir "$S" --name "Proxy Interop" >/dev/null
M init --state-dir "$T/other-ca" --name "Someone Else" >/dev/null
issue() { local dir=$1; shift; M issue --state-dir "$S" --out-dir "$T/$dir" "$@" >/dev/null; }
issue server --profile server --dns localhost --ip 127.0.0.1 --uri spiffe://example.org/ns/edge/sa/proxy
issue web --profile workload --uri spiffe://example.org/ns/web/sa/api
issue other --profile workload --uri spiffe://example.org/ns/batch/sa/job
issue victim --profile workload --uri spiffe://example.org/ns/web/sa/victim
issue victim2 --profile workload --uri spiffe://example.org/ns/web/sa/victim2
issue serveronly --profile server --dns web.example.org
issue short --profile workload --uri spiffe://example.org/ns/web/sa/short --validity 2s
M issue --state-dir "$T/other-ca" --out-dir "$T/stranger" --profile workload --uri spiffe://example.org/ns/web/sa/api >/dev/null
ROOT_PEM="$S/ca/root.pem"

# Backends.
python3 "$HELP" echo > "$T/echo.port" & PIDS+=($!)
python3 "$HELP" proxyv2 > "$T/pv2.port" & PIDS+=($!)
for _ in $(seq 50); do [ -s "$T/echo.port" ] && [ -s "$T/pv2.port" ] && break; sleep 0.1; done
ECHO=$(head -1 "$T/echo.port"); PV2=$(head -1 "$T/pv2.port")

# start_proxy NAME ARGS...: runs `mutual proxy` with port-0 listeners; waits until it prints its listeners.
start_proxy() {
  local name=$1; shift
  "$MUTUAL" proxy "$@" > "$T/$name.access" 2> "$T/$name.err" &
  local pid=$!; PIDS+=($pid); eval "${name}_PID=$pid"
  for _ in $(seq 100); do grep -q "listening on" "$T/$name.err" && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  sleep 0.2
}
port_of() { grep "mutual proxy: $2 listening on" "$T/$1.err" | head -1 | sed 's/.*://'; }
code() { curl -s -o "$T/body" -w '%{http_code}' --cacert "$ROOT_PEM" "$@"; }
as() { echo --cert "$T/$1/chain.pem" --key "$T/$1/key.pem"; }

# ---------------------------------------------------------------- inbound http, required client certificates
start_proxy main --listen 127.0.0.1:0 --upstream "http://127.0.0.1:$ECHO" --cert "$T/server/chain.pem" --key "$T/server/key.pem" \
  --client-ca "$ROOT_PEM" --allow 'spiffe://example.org/ns/web/*' --admin-listen 127.0.0.1:0
P=$(port_of main inbound); ADMIN=$(port_of main admin)
[ -n "$P" ] && ok "mutual proxy is listening (port $P, admin $ADMIN)" || { bad "proxy did not start: $(cat "$T/main.err")"; echo "proxy interop: $pass passed, $fail failed"; exit 1; }

c=$(code $(as web) -H 'x-forwarded-client-cert: By=evil;URI=spiffe://example.org/ns/admin' -H 'Client-Cert: :Zm9yZ2Vk:' "https://localhost:$P/api/x?q=1")
[ "$c" = 200 ] && ok "curl with an allowed SPIFFE identity: 200" || bad "allowed identity got $c $(cat "$T/body")"
python3 - "$T/body" <<'PY' && ok "backend saw Envoy XFCC (By, Hash, Cert, Chain, Subject, URI) and RFC 9440 Client-Cert; forged copies removed" || bad "forwarded headers wrong: $(head -c 600 "$T/body")"
import json, sys, base64, urllib.parse
seen = json.load(open(sys.argv[1]))
h = seen["headers"]; all_h = seen["all_headers"]
x = h["x-forwarded-client-cert"]
assert x.startswith("By=spiffe://example.org/ns/edge/sa/proxy;Hash="), x[:80]
assert ';URI=spiffe://example.org/ns/web/sa/api' in x and ';Cert="' in x and ';Chain="' in x and ';Subject="' in x
assert "evil" not in x and "ns/admin" not in x
assert [k for k, _ in all_h].count("x-forwarded-client-cert") == 1 and [k for k, _ in all_h].count("client-cert") == 1
cert = h["client-cert"]; assert cert.startswith(":") and cert.endswith(":") and cert != ":Zm9yZ2Vk:"
base64.b64decode(cert[1:-1])
pem = urllib.parse.unquote(x.split(';Cert="')[1].split('"')[0]); assert pem.startswith("-----BEGIN CERTIFICATE-----")
assert h["x-forwarded-proto"] == "https" and seen["path"] == "/api/x?q=1"
PY
fp=$(openssl x509 -in "$T/web/cert.pem" -outform DER | sha256sum | cut -d' ' -f1)
grep -q "Hash=$fp" "$T/body" && ok "XFCC Hash is the SHA-256 of the client certificate's DER" || bad "XFCC hash mismatch"

v=$(curl -s --http2 -o "$T/body" -o "$T/body2" -w '%{http_version} %{http_code} %{num_connects};' --cacert "$ROOT_PEM" $(as web) "https://localhost:$P/h2/x" "https://localhost:$P/h2/y")
[ "$v" = "2 200 1;2 200 0;" ] && grep -q 'URI=spiffe://example.org/ns/web/sa/api' "$T/body" && ok "HTTP/2 from the client (ALPN h2): two streams on one connection, identity forwarded upstream over HTTP/1.1" || bad "http2: '$v' $(head -c 300 "$T/body")"
v=$(curl -s --http2 -o "$T/body" -w '%{http_version} %{http_code}' --cacert "$ROOT_PEM" $(as other) "https://localhost:$P/h2/x")
[ "$v" = "2 403" ] && ok "HTTP/2: a disallowed identity gets 403 on its stream" || bad "http2 deny: '$v'"
# Many streams at once (curl -Z multiplexes them over one HTTP/2 connection): every one answered, none reset. Each
# response must end on its last frame; a separate END_STREAM frame made curl reset streams until NIOHTTP2 sent GOAWAY.
curl -s -Z --parallel-max 50 --http2 --cacert "$ROOT_PEM" $(as web) -o /dev/null -w '%{http_version} %{http_code}\n' \
  "https://localhost:$P/h2/p?[1-2000]" > "$T/par" 2>/dev/null
n=$(grep -c '^2 200$' "$T/par")
[ "$n" = 2000 ] && ! grep -q "HTTP/2 connection error" "$T/main.err" \
  && ok "HTTP/2 under load: 2,000 requests multiplexed by curl -Z, all 200, no connection error logged" \
  || bad "h2 parallel: $n of 2000 ok: $(sort "$T/par" | uniq -c | tr '\n' ' ') $(grep 'HTTP/2 connection error' "$T/main.err" | head -2)"
# A large response to a slow client is relayed as it arrives, with back-pressure on the upstream: 32 MiB read at
# 16 MiB/s over HTTP/1.1 and over HTTP/2; the proxy's peak RSS (VmHWM, reset first) must not grow by the body's size.
for proto in --http1.1 --http2; do
  echo 5 > /proc/$main_PID/clear_refs 2>/dev/null
  rss0=$(awk '/^VmRSS/{print $2}' /proc/$main_PID/status)
  v=$(curl -s $proto --limit-rate 16M --max-time 30 --cacert "$ROOT_PEM" $(as web) -o "$T/big" -w '%{http_code} %{size_download}' "https://localhost:$P/api/big/33554432")
  hwm=$(awk '/^VmHWM/{print $2}' /proc/$main_PID/status)
  grown=$(( (hwm - rss0) / 1024 ))
  [ "$v" = "200 33554432" ] && [ "$grown" -lt 12 ] \
    && ok "large response ($proto, slow client): 32 MiB relayed, peak RSS grew ${grown} MiB (streamed with back-pressure)" \
    || bad "large response ($proto): '$v', peak RSS grew ${grown} MiB"
done
# A large request body to a slow upstream streams through with back-pressure on the client: 16 MiB uploaded to a
# backend reading at ~16 MiB/s; the body arrives whole and the proxy's peak RSS does not grow by its size.
head -c 16777216 /dev/zero > "$T/upload"
for proto in --http1.1 --http2; do
  echo 5 > /proc/$main_PID/clear_refs 2>/dev/null
  rss0=$(awk '/^VmRSS/{print $2}' /proc/$main_PID/status)
  v=$(curl -s $proto --max-time 60 --cacert "$ROOT_PEM" $(as web) --data-binary @"$T/upload" -H 'content-type: application/octet-stream' \
        -o "$T/body" -w '%{http_code}' "https://localhost:$P/api/slow-upload")
  hwm=$(awk '/^VmHWM/{print $2}' /proc/$main_PID/status)
  grown=$(( (hwm - rss0) / 1024 ))
  [ "$v" = 200 ] && grep -q '"body_bytes": 16777216' "$T/body" && [ "$grown" -lt 12 ] \
    && ok "large upload ($proto) to a slow upstream: 16 MiB delivered, peak RSS grew ${grown} MiB (streamed with back-pressure)" \
    || bad "large upload ($proto): '$v' $(head -c 200 "$T/body"), peak RSS grew ${grown} MiB"
done
# The byte-level relay: chunked, length-less and HEAD responses from the backend, chunked uploads, and a response
# that cannot be framed without guessing. HTTP/1.1 clients get the backend's chunked bytes as they are; HTTP/2 and
# HTTP/1.0 clients get the content de-chunked.
expected=$(python3 -c 'print("".join("chunk-%d;" % i for i in range(300)), end="")')
for proto in --http1.1 --http2 --http1.0; do
  v=$(curl -s $proto -D "$T/hdr" -o "$T/body" -w '%{http_code}' --cacert "$ROOT_PEM" $(as web) "https://localhost:$P/api/chunked/300")
  te=$(grep -ci '^transfer-encoding: chunked' "$T/hdr")
  want_te=0; [ "$proto" = --http1.1 ] && want_te=1
  [ "$v" = 200 ] && [ "$(cat "$T/body")" = "$expected" ] && [ "$te" = "$want_te" ] \
    && ok "chunked response from the backend ($proto): 300 chunks arrive whole (transfer-encoding relayed: $te)" \
    || bad "chunked response ($proto): '$v' te=$te $(head -c 200 "$T/body")"
done
v=$(curl -s --http1.1 -o "$T/body" -o "$T/body2" -w '%{http_code} %{num_connects};' --cacert "$ROOT_PEM" $(as web) "https://localhost:$P/api/chunked/3" "https://localhost:$P/api/after-chunked")
[ "$v" = "200 1;200 0;" ] && grep -q '"path": "/api/after-chunked"' "$T/body2" \
  && ok "after a chunked response the client connection is reused for the next request" || bad "reuse after chunked: '$v'"
v=$(curl -s --http1.1 -o "$T/body" -o "$T/body2" -w '%{http_code} %{num_connects};' --cacert "$ROOT_PEM" $(as web) "https://localhost:$P/api/close-delimited" "https://localhost:$P/api/next")
[ "$v" = "200 1;200 1;" ] && [ "$(cat "$T/body")" = "until the backend closes" ] \
  && ok "a response that ends when the backend closes is relayed whole, and the client connection closes after it" || bad "close-delimited: '$v' $(head -c 100 "$T/body")"
v=$(curl -s --http1.1 --head --max-time 5 -o "$T/hdr" -w '%{http_code}' --cacert "$ROOT_PEM" $(as web) "https://localhost:$P/api/head")
[ "$v" = 200 ] && grep -qi '^content-length: [1-9]' "$T/hdr" && ok "HEAD: the backend's head relayed (content-length kept), no body waited for" || bad "HEAD: '$v' $(cat "$T/hdr")"
c=$(code $(as web) "https://localhost:$P/api/malformed")
[ "$c" = 502 ] && python3 -c 'import json,sys; assert json.load(open(sys.argv[1]))["error"] == "upstream_malformed_response"' "$T/body" \
  && ok "a backend response with both Content-Length and Transfer-Encoding: 502 upstream_malformed_response" || bad "malformed backend response: $c $(cat "$T/body")"
head -c 300000 /dev/urandom > "$T/chunky"
for proto in --http1.1 --http2; do
  v=$(curl -s $proto -H 'transfer-encoding: chunked' --data-binary @"$T/chunky" -o "$T/body" -w '%{http_code}' --cacert "$ROOT_PEM" $(as web) "https://localhost:$P/api/chunked-upload")
  [ "$v" = 200 ] && grep -q '"body_bytes": 300000' "$T/body" && ok "chunked upload ($proto): the backend reads all 300,000 bytes" || bad "chunked upload ($proto): '$v' $(head -c 200 "$T/body")"
done
python3 - "$P" "$ROOT_PEM" "$T/web/chain.pem" "$T/web/key.pem" > "$T/trailers.out" 2>&1 <<'PY' && ok "chunked upload with trailers: the backend gets x-checksum, never a forged x-forwarded-client-cert trailer" || bad "request trailers: $(tail -c 400 "$T/trailers.out")"
import json, socket, ssl, sys
port, ca, cert, key = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca); ctx.load_cert_chain(cert, key)
with ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(port))), server_hostname="localhost") as tls:
    tls.sendall(b"POST /api/trailers HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"5\r\nhello\r\n0\r\nx-checksum: 42\r\nX-Forwarded-Client-Cert: By=evil;URI=spiffe://example.org/ns/admin\r\n\r\n")
    data = b""
    while True:
        chunk = tls.recv(65536)
        if not chunk: break
        data += chunk
head, _, body = data.partition(b"\r\n\r\n")
assert head.startswith(b"HTTP/1.1 200"), head
seen = json.loads(body)
assert seen["body_bytes"] == 5, seen
assert seen["trailers"] == [["x-checksum", "42"]], seen["trailers"]
PY
c=$(code $(as other) "https://localhost:$P/api")
[ "$c" = 403 ] && grep -q 'ns/batch/sa/job is not allowed' "$T/body" && ok "disallowed identity: 403 naming the identity and the allow list" || bad "disallowed got $c $(cat "$T/body")"
c=$(code "https://localhost:$P/api"); [ "$c" = 000 ] && ok "no client certificate: handshake refused" || bad "no cert got $c"
c=$(code $(as serveronly) "https://localhost:$P/api"); [ "$c" = 000 ] && ok "serverAuth-only certificate (wrong EKU): refused" || bad "wrong EKU got $c"
c=$(code $(as stranger) "https://localhost:$P/api"); [ "$c" = 000 ] && ok "certificate from another CA: refused" || bad "wrong CA got $c"
for _ in $(seq 50); do openssl x509 -in "$T/short/cert.pem" -noout -checkend 0 >/dev/null || break; sleep 0.1; done; sleep 1
c=$(code $(as short) "https://localhost:$P/api"); [ "$c" = 000 ] && ok "expired client certificate: refused" || bad "expired got $c"

echo -e "GET /api/s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" | timeout 5 openssl s_client -connect 127.0.0.1:$P -CAfile "$ROOT_PEM" -cert "$T/web/cert.pem" -cert_chain "$T/web/chain.pem" -key "$T/web/key.pem" -quiet > "$T/sclient.out" 2>&1
grep -q '"x-forwarded-client-cert"' "$T/sclient.out" && ok "openssl s_client with a good certificate: request forwarded" || bad "s_client good: $(head -5 "$T/sclient.out")"
echo -e "GET / HTTP/1.1\r\nHost: x\r\n\r\n" | timeout 5 openssl s_client -connect 127.0.0.1:$P -CAfile "$ROOT_PEM" -ign_eof > "$T/sclient.out" 2>&1
grep -qi "alert" "$T/sclient.out" && ! grep -q '"headers"' "$T/sclient.out" && ok "openssl s_client without a certificate: TLS alert, nothing forwarded" || bad "s_client no cert: $(tail -5 "$T/sclient.out")"
echo -e "GET / HTTP/1.1\r\nHost: x\r\n\r\n" | timeout 5 openssl s_client -connect 127.0.0.1:$P -CAfile "$ROOT_PEM" -cert "$T/stranger/cert.pem" -cert_chain "$T/stranger/chain.pem" -key "$T/stranger/key.pem" > "$T/sclient.out" 2>&1
! grep -q '"headers"' "$T/sclient.out" && ok "openssl s_client with a foreign CA's certificate: nothing forwarded" || bad "s_client stranger forwarded"

sleep 0.3
grep -q 'reason=expired' "$T/main.err" && grep -q 'client certificate expired [0-9]*s ago (notAfter' "$T/main.err" && ok "log names the reason: 'client certificate expired Ns ago (notAfter …)'" || bad "expired reason not logged: $(grep refused "$T/main.err" | tail -3)"
curl -s "http://127.0.0.1:$ADMIN/metrics" > "$T/metrics"
for reason in no_certificate eku unknown_ca expired; do
  grep -q "mutual_proxy_handshakes_total{listener=\"inbound\",outcome=\"failed\",reason=\"$reason\"}" "$T/metrics" && ok "metric: handshakes failed with reason $reason" || bad "no $reason metric"
done
grep -q 'mutual_proxy_requests_total{listener="inbound",route="/",status="200"}' "$T/metrics" && grep -q 'mutual_proxy_certificate_expiry_seconds{listener="inbound"}' "$T/metrics" \
  && grep -q 'mutual_proxy_request_duration_seconds_bucket' "$T/metrics" && grep -q 'mutual_proxy_open_connections' "$T/metrics" \
  && ok "metrics: requests by route and status, latency histogram, open connections, certificate expiry" || bad "metrics missing: $(grep -v '^#' "$T/metrics" | head)"
python3 - "$T/main.access" <<'PY' && ok "access log: JSON lines with time, identity, serial, route, decision, reason, status, bytes, latency" || bad "access log: $(head -3 "$T/main.access")"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
allowed = [l for l in lines if l["decision"] == "allow"]
denied = [l for l in lines if l["decision"] == "deny"]
refused = [l for l in lines if l["decision"] == "refused"]
assert allowed and denied and refused, (len(allowed), len(denied), len(refused))
a = allowed[0]
for key in ("time", "client", "serial", "route", "decision", "reason", "status", "bytes_in", "bytes_out", "latency_ms"):
    assert key in a, key
assert a["client"] == "spiffe://example.org/ns/web/sa/api" and a["status"] == 200
assert "not allowed" in denied[0]["reason"]
PY

# Session resumption: the resumed session must carry the identity (TLS 1.3 tickets and TLS 1.2 sessions).
for v in tls1_3 tls1_2; do
  echo -e "GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" | timeout 5 openssl s_client -$v -connect 127.0.0.1:$P -CAfile "$ROOT_PEM" \
    -cert "$T/web/cert.pem" -cert_chain "$T/web/chain.pem" -key "$T/web/key.pem" -sess_out "$T/sess.$v" -ign_eof > "$T/first.out" 2>&1
  echo -e "GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" | timeout 5 openssl s_client -$v -connect 127.0.0.1:$P -CAfile "$ROOT_PEM" \
    -sess_in "$T/sess.$v" -ign_eof > "$T/resumed.out" 2>&1
  if grep -q "^Reused" "$T/resumed.out"; then
    grep -q 'URI=spiffe://example.org/ns/web/sa/api' "$T/resumed.out" && ok "$v: resumed session forwarded with the verified identity" || bad "$v: resumed session lost the identity: $(grep -a 'HTTP/1.1' "$T/resumed.out")"
  else
    grep -q '"x-forwarded-client-cert"' "$T/resumed.out" && ok "$v: no resumption offered; full handshake forwarded with identity" || bad "$v: second connection failed: $(tail -3 "$T/resumed.out")"
  fi
done

# ---------------------------------------------------------------- optional mTLS listener with an open route
cat > "$T/gateway.yaml" <<YAML
admin-listen: 127.0.0.1:0
access-log: $T/gateway.access
listeners:
  - name: gateway
    listen: 127.0.0.1:0
    upstream: http://127.0.0.1:$ECHO
    cert: server/chain.pem
    key: server/key.pem
    client-ca: ca/ca/root.pem
    client-certificate: optional
    routes:
      - path: /healthz
        open: true
      - path: /admin
        methods: [POST]
        allow: ["spiffe://example.org/ns/ops/sa/admin"]
      - path: /
        allow: ["spiffe://example.org/ns/web/*", "dns:*.partner.example"]
  - name: tcp
    listen: 127.0.0.1:0
    mode: tcp
    upstream: 127.0.0.1:$PV2
    proxy-protocol: true
    cert: server/chain.pem
    key: server/key.pem
    client-ca: ca/ca/root.pem
    allow: ["spiffe://example.org/ns/web/sa/api"]
YAML
start_proxy gw --config "$T/gateway.yaml"
G=$(port_of gw gateway); TCP=$(port_of gw tcp)
c=$(code "https://localhost:$G/healthz"); [ "$c" = 200 ] && ok "open route /healthz without a certificate: 200" || bad "healthz got $c"
c=$(code "https://localhost:$G/api"); [ "$c" = 401 ] && grep -q 'requires a client certificate' "$T/body" && ok "protected route without a certificate: 401 with reason" || bad "401 expected, got $c $(cat "$T/body")"
c=$(code $(as other) "https://localhost:$G/api"); [ "$c" = 403 ] && ok "protected route, denied identity: 403" || bad "403 expected, got $c"
c=$(code $(as web) "https://localhost:$G/api"); [ "$c" = 200 ] && ok "protected route, allowed identity: 200" || bad "200 expected, got $c"
c=$(code $(as web) -X POST "https://localhost:$G/admin/users"); [ "$c" = 403 ] && ok "per-route rule: /admin POST only for the ops identity (403 for web)" || bad "admin got $c"
c=$(code $(as web) "https://localhost:$G/admin/users"); [ "$c" = 200 ] && ok "method-scoped route: GET /admin falls through to the / route" || bad "GET admin got $c"
c=$(code --path-as-is "https://localhost:$G/healthz/../admin"); [ "$c" = 400 ] && ok "dot segments in the path: 400 (no route confusion)" || bad "dot segments got $c"
c=$(code --path-as-is "https://localhost:$G/healthz/%2e%2e/admin"); [ "$c" = 400 ] && ok "encoded dot segments: 400" || bad "encoded dots got $c"

# Policy reload: the allow list changes in the file; a broken file keeps the current policy.
sed 's#allow: \["spiffe://example.org/ns/web/\*", "dns:\*.partner.example"\]#allow: ["spiffe://example.org/ns/batch/*"]#' "$T/gateway.yaml" > "$T/gateway.tmp" && mv "$T/gateway.tmp" "$T/gateway.yaml"
sleep 1.5
c1=$(code $(as other) "https://localhost:$G/api"); c2=$(code $(as web) "https://localhost:$G/api")
[ "$c1" = 200 ] && [ "$c2" = 403 ] && ok "policy reloaded from the edited YAML: batch now allowed, web now denied" || bad "policy reload: other=$c1 web=$c2 $(grep -i reload "$T/gw.err" | tail -2)"
echo "listeners: [ {broken" > "$T/gateway.tmp" && mv "$T/gateway.tmp" "$T/gateway.yaml"; sleep 1.5
c1=$(code $(as other) "https://localhost:$G/api")
[ "$c1" = 200 ] && grep -q "configuration reload failed; keeping the current configuration" "$T/gw.err" && ok "a broken configuration file is refused; the running policy stays" || bad "broken config reload: $c1"

# tcp mode with PROXY v2.
python3 - "$TCP" "$ROOT_PEM" "$T/web/chain.pem" "$T/web/key.pem" <<'PY' && ok "tcp mode: PROXY v2 header carries source, SSL TLV (verified, version, client cert) and the identity; stream relayed" || bad "tcp/PROXY v2 failed"
import json, socket, ssl, sys
port, ca, cert, key = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False; ctx.load_cert_chain(cert, key)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(port))))
s.sendall(b"ping")
data = b""
while data.count(b"\n") < 1 or not data.endswith(b"ping"):
    chunk = s.recv(65536)
    if not chunk: break
    data += chunk
line, rest = data.split(b"\n", 1)
info = json.loads(line)
assert info["version_command"] == 0x21 and info["family"] == 0x11, info
assert info["source"].startswith("127.0.0.1:")
ssl_tlv = info["tlvs"]["ssl"]
assert ssl_tlv["client"] & 0x03 == 0x03 and ssl_tlv["verify"] == 0 and ssl_tlv["0x21"].startswith("TLSv1."), ssl_tlv
assert info["tlvs"]["0xe1"] == "spiffe://example.org/ns/web/sa/api" and info["tlvs"]["client_cert_der_bytes"] > 300
assert rest == b"ping", rest
PY
python3 - "$TCP" "$ROOT_PEM" "$T/other/chain.pem" "$T/other/key.pem" <<'PY' && ok "tcp mode: a disallowed identity is disconnected before reaching the upstream" || bad "tcp allowed a denied identity"
import socket, ssl, sys
port, ca, cert, key = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False; ctx.load_cert_chain(cert, key)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(port))))
try:
    s.sendall(b"ping"); data = s.recv(100)
except (ssl.SSLError, OSError):
    data = b""
assert data == b"", data
PY

# ---------------------------------------------------------------- revocation from a CRL file
"$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$T/serve.log" 2>&1 & SERVE_PID=$!; PIDS+=($SERVE_PID)
for _ in $(seq 100); do grep -q "CRL and OCSP on" "$T/serve.log" && break; sleep 0.1; done
HTTP=$(grep -o 'http://127.0.0.1:[0-9]*' "$T/serve.log" | head -1); HTTPS=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
fetch_crls() { curl -s --cacert "$ROOT_PEM" "$HTTPS/crls.pem" -o "$T/crls.tmp" && mv "$T/crls.tmp" "$T/crls.pem"; }
fetch_crls
start_proxy crlp --listen 127.0.0.1:0 --upstream "http://127.0.0.1:$ECHO" --cert "$T/server/chain.pem" --key "$T/server/key.pem" \
  --client-ca "$ROOT_PEM" --allow 'spiffe://example.org/ns/web/*' --crl "$T/crls.pem" --admin-listen 127.0.0.1:0
CP=$(port_of crlp inbound)
c=$(code $(as victim) "https://localhost:$CP/"); [ "$c" = 200 ] && ok "CRL file loaded; unrevoked certificate accepted" || bad "victim before revocation got $c $(tail -3 "$T/crlp.err")"
python3 "$HELP" hold "$CP" "$ROOT_PEM" "$T/victim/chain.pem" "$T/victim/key.pem" "$T/hold1.out" > "$T/hold1.ready" & PIDS+=($!)
for _ in $(seq 50); do grep -q ready "$T/hold1.ready" && break; sleep 0.1; done
serial=$(openssl x509 -in "$T/victim/cert.pem" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f')
M revoke --state-dir "$S" "$serial" --reason keyCompromise >/dev/null
fetch_crls; t0=$(date +%s.%N)
for _ in $(seq 50); do [ -s "$T/hold1.out" ] && break; sleep 0.1; done
c=$(code $(as victim) "https://localhost:$CP/")
[ "$c" = 000 ] && ok "CRL file rewritten: the revoked certificate is refused on a new handshake" || bad "revoked via CRL got $c"
held=$(cat "$T/hold1.out" 2>/dev/null)
python3 -c "import sys; d=float(sys.argv[1])-float(sys.argv[2]); sys.exit(0 if -1 < d < 3 else 1)" "${held:-0}" "$t0" 2>/dev/null \
  && ok "CRL file rewritten: the revoked certificate's open connection was closed" || bad "open connection not closed: '$held'"
grep -q "reason=revoked" "$T/crlp.err" && grep -q "was revoked" "$T/crlp.err" && ok "refusal logged with reason revoked" || bad "revoked reason not logged"
c=$(code $(as web) "https://localhost:$CP/"); [ "$c" = 200 ] && ok "other certificates still accepted after the CRL update" || bad "bystander got $c"
echo "not a crl" > "$T/crls.tmp" && mv "$T/crls.tmp" "$T/crls.pem"; sleep 1.5
c=$(code $(as victim) "https://localhost:$CP/"); [ "$c" = 000 ] && grep -q "CRL reload failed" "$T/crlp.err" && ok "a garbage CRL file is rejected and the last good CRL kept" || bad "garbage CRL: $c"

# ---------------------------------------------------------------- revocation pushed by the authority's event stream
start_proxy evp --listen 127.0.0.1:0 --upstream "http://127.0.0.1:$ECHO" --cert "$T/server/chain.pem" --key "$T/server/key.pem" \
  --client-ca "$ROOT_PEM" --allow 'spiffe://example.org/ns/web/*' --authority "$HTTPS" --authority-ca "$ROOT_PEM" --admin-listen 127.0.0.1:0
EP=$(port_of evp inbound); EA=$(port_of evp admin)
for _ in $(seq 50); do grep -q "following revocation events" "$T/evp.err" && break; sleep 0.1; done
c=$(code $(as victim2) "https://localhost:$EP/"); [ "$c" = 200 ] && ok "authority mode: CRL from /crls.pem and event stream followed" || bad "victim2 before got $c $(tail -3 "$T/evp.err")"
python3 "$HELP" hold "$EP" "$ROOT_PEM" "$T/victim2/chain.pem" "$T/victim2/key.pem" "$T/hold2.out" > "$T/hold2.ready" & PIDS+=($!)
for _ in $(seq 50); do grep -q ready "$T/hold2.ready" && break; sleep 0.1; done
serial2=$(openssl x509 -in "$T/victim2/cert.pem" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f')
t0=$(date +%s.%N)
M revoke --state-dir "$S" "$serial2" --reason superseded >/dev/null
t1=$(date +%s.%N)
refused_at=""
for _ in $(seq 40); do
  c=$(code $(as victim2) "https://localhost:$EP/")
  [ "$c" = 000 ] && { refused_at=$(date +%s.%N); break; }
  sleep 0.05
done
for _ in $(seq 30); do [ -s "$T/hold2.out" ] && break; sleep 0.1; done
python3 - "$t1" "${refused_at:-0}" "$(cat "$T/hold2.out" 2>/dev/null || echo 0)" <<'PY' && ok "event stream: refused on new handshakes and open connection closed within 1 s of mutual revoke returning" || bad "event-stream revocation too slow or missing: t1=$t1 refused=$refused_at held=$(cat "$T/hold2.out" 2>/dev/null)"
import sys
t1, refused, closed = (float(x) if x not in ("", "open") else 0 for x in sys.argv[1:4])
assert refused and closed, (refused, closed)
assert refused - t1 < 1.0 and closed - t1 < 1.0, (refused - t1, closed - t1)
print("refused after %.3f s, connection closed after %.3f s" % (refused - t1, closed - t1))
PY
curl -s "http://127.0.0.1:$EA/metrics" | grep -q 'mutual_proxy_revoked_connections_closed_total' && ok "metric: revoked connections closed" || bad "no revoked-closed metric"
kill $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null

# ---------------------------------------------------------------- reload: failures keep the old state; rotation under load
mkdir -p "$T/live"; cp "$T/server/chain.pem" "$T/live/cert.pem"; cp "$T/server/key.pem" "$T/live/key.pem"; cp "$ROOT_PEM" "$T/live/bundle.pem"
start_proxy live --listen 127.0.0.1:0 --upstream "http://127.0.0.1:$ECHO" --cert "$T/live/cert.pem" --key "$T/live/key.pem" \
  --client-ca "$T/live/bundle.pem" --allow 'spiffe://example.org/ns/web/*' --access-log off
LP=$(port_of live inbound)
echo "-----BEGIN CERTIFICATE-----garbage" > "$T/live/cert.tmp" && mv "$T/live/cert.tmp" "$T/live/cert.pem"; sleep 1.5
c=$(code $(as web) "https://localhost:$LP/"); [ "$c" = 200 ] && grep -q "reload failed; keeping" "$T/live.err" && ok "reload of a broken certificate file fails, old state kept, reason logged" || bad "broken cert reload: $c"
cp "$T/other/chain.pem" "$T/live/cert.tmp" && mv "$T/live/cert.tmp" "$T/live/cert.pem"; sleep 1.5
c=$(code $(as web) "https://localhost:$LP/"); [ "$c" = 200 ] && grep -q "does not match the certificate" "$T/live.err" && ok "a key that does not match the new certificate: old state kept" || bad "mismatch reload: $c $(grep reload "$T/live.err" | tail -2)"
cp "$T/server/chain.pem" "$T/live/cert.tmp" && mv "$T/live/cert.tmp" "$T/live/cert.pem"; sleep 1.5

python3 "$HELP" load "$LP" "$ROOT_PEM" "$T/web/chain.pem" "$T/web/key.pem" 14 "$T/load.json" & LOAD=$!; PIDS+=($LOAD)
cat "$ROOT_PEM" "$T/other-ca/ca/root.pem" > "$T/bundle-a.pem"; cat "$T/other-ca/ca/root.pem" "$ROOT_PEM" > "$T/bundle-b.pem"
for i in 1 2 3 4 5; do
  sleep 2
  M issue --state-dir "$S" --profile server --dns localhost --ip 127.0.0.1 --out-dir "$T/rot$i" >/dev/null
  # Key first then certificate, each renamed into place: a reader sees a mismatched pair for a moment, which the
  # reload refuses (old state kept) until both are new.
  cp "$T/rot$i/key.pem" "$T/live/key.tmp"; cp "$T/rot$i/chain.pem" "$T/live/cert.tmp"
  mv "$T/live/key.tmp" "$T/live/key.pem"; mv "$T/live/cert.tmp" "$T/live/cert.pem"
  if [ $((i % 2)) = 1 ]; then cp "$T/bundle-a.pem" "$T/live/bundle.tmp"; else cp "$T/bundle-b.pem" "$T/live/bundle.tmp"; fi
  mv "$T/live/bundle.tmp" "$T/live/bundle.pem"
done
wait $LOAD
python3 - "$T/load.json" <<'PY' && ok "rotation under load: 5 server-certificate and 5 bundle rotations, zero failed requests ($(python3 -c "import json;print(json.load(open('$T/load.json'))['ok'])") ok)" || bad "rotation under load: $(cat "$T/load.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["failed"] == 0 and r["ok"] > 100, r
PY
served=$(echo | timeout 5 openssl s_client -connect 127.0.0.1:$LP -CAfile "$ROOT_PEM" -cert "$T/web/cert.pem" -cert_chain "$T/web/chain.pem" -key "$T/web/key.pem" 2>/dev/null | openssl x509 -noout -serial | cut -d= -f2)
[ "$served" = "$(openssl x509 -in "$T/rot5/cert.pem" -noout -serial | cut -d= -f2)" ] && ok "new handshakes get the last rotated certificate" || bad "served serial $served"
[ "$(grep -c '"reloaded"\|reloaded' "$T/live.err")" -ge 5 ] && ok "each rotation logged as a reload" || bad "reloads: $(grep -c reloaded "$T/live.err")"
kill -HUP "$live_PID"; sleep 0.5
grep -q "SIGHUP: reloading" "$T/live.err" && ok "SIGHUP reloads" || bad "SIGHUP not handled"

# ---------------------------------------------------------------- nginx: as the backend, and as the mTLS upstream of the outbound mode
if command -v nginx >/dev/null 2>&1; then
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
  NB=$(free_port); NS=$(free_port)
  mkdir -p "$T/nginx"
  cat "$ROOT_PEM" > "$T/nginx/clients.pem"
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
    listen 127.0.0.1:$NB;
    location / { return 200 "nginx backend saw: \$http_x_forwarded_client_cert\n"; }
  }
  server {
    listen 127.0.0.1:$NS ssl;
    ssl_certificate $T/server/chain.pem;
    ssl_certificate_key $T/server/key.pem;
    ssl_client_certificate $T/nginx/clients.pem;
    ssl_verify_client on;
    ssl_verify_depth 3;
    location / { return 200 "nginx mTLS server saw client \$ssl_client_s_dn verify=\$ssl_client_verify conn=\$connection\n"; }
  }
}
NGX
  nginx -c "$T/nginx/nginx.conf" & PIDS+=($!)
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$NS) 2>/dev/null && break; sleep 0.1; done
  start_proxy ngxb --listen 127.0.0.1:0 --upstream "http://127.0.0.1:$NB" --cert "$T/server/chain.pem" --key "$T/server/key.pem" \
    --client-ca "$ROOT_PEM" --allow 'spiffe://example.org/ns/web/*' --access-log off
  c=$(code $(as web) "https://localhost:$(port_of ngxb inbound)/")
  [ "$c" = 200 ] && grep -q 'nginx backend saw: By=spiffe://example.org/ns/edge/sa/proxy;Hash=' "$T/body" && ok "nginx as the backend receives the forwarded identity" || bad "nginx backend: $c $(cat "$T/body")"
  start_proxy outp --outbound --listen 127.0.0.1:0 --upstream "127.0.0.1:$NS" --cert "$T/web/chain.pem" --key "$T/web/key.pem" \
    --server-ca "$ROOT_PEM" --expect dns:localhost
  OP=$(port_of outp outbound)
  out=$(curl -s "http://127.0.0.1:$OP/")
  echo "$out" | grep -q "verify=SUCCESS" && ok "outbound: plaintext in, mTLS to nginx (ssl_verify_client on) with the proxy's certificate" || bad "outbound to nginx: '$out' $(tail -3 "$T/outp.err")"
  start_proxy outh --outbound --mode http --listen 127.0.0.1:0 --upstream "https://localhost:$NS" --cert "$T/web/chain.pem" --key "$T/web/key.pem" \
    --server-ca "$ROOT_PEM" --expect dns:localhost --access-log off --threads 1
  OH=$(port_of outh outbound)
  curl -s "http://127.0.0.1:$OH/a" > "$T/oh1"; curl -s "http://127.0.0.1:$OH/b" > "$T/oh2"
  c1=$(sed -n 's/.*conn=\([0-9]*\).*/\1/p' "$T/oh1"); c2=$(sed -n 's/.*conn=\([0-9]*\).*/\1/p' "$T/oh2")
  grep -q "verify=SUCCESS" "$T/oh1" && [ -n "$c1" ] && [ "$c1" = "$c2" ] \
    && ok "outbound http: two separate local requests reuse one pooled mTLS connection to nginx (connection $c1)" || bad "outbound http pooling: '$(cat "$T/oh1")' '$(cat "$T/oh2")'"
  start_proxy outbad --outbound --listen 127.0.0.1:0 --upstream "127.0.0.1:$NS" --cert "$T/web/chain.pem" --key "$T/web/key.pem" \
    --server-ca "$ROOT_PEM" --expect spiffe://example.org/ns/db/sa/pg
  out=$(curl -s "http://127.0.0.1:$(port_of outbad outbound)/"); sleep 0.3
  [ -z "$out" ] && grep -q "upstream_identity" "$T/outbad.err" && grep -q "expected spiffe://example.org/ns/db/sa/pg" "$T/outbad.err" \
    && ok "outbound: an upstream with the wrong identity is refused, reason logged" || bad "outbound wrong identity: '$out' $(tail -3 "$T/outbad.err")"
else
  bad "nginx is not installed"
fi

# ---------------------------------------------------------------- bad input: exits 2 with a reason, nothing started
badrun() { local what=$1; local expect=$2; shift 2; "$MUTUAL" proxy "$@" > "$T/bad.out" 2>&1; local rc=$?
  [ $rc = 2 ] && grep -q "$expect" "$T/bad.out" && ok "bad input ($what): exit 2, '$expect'" || bad "bad input ($what): rc=$rc $(head -3 "$T/bad.out")"; }
badrun "missing --client-ca" "missing --client-ca" --listen 127.0.0.1:0 --upstream http://127.0.0.1:1 --cert "$T/server/chain.pem" --key "$T/server/key.pem" --allow spiffe://example.org/x
badrun "no allow list" "everything would be denied" --listen 127.0.0.1:0 --upstream http://127.0.0.1:1 --cert "$T/server/chain.pem" --key "$T/server/key.pem" --client-ca "$ROOT_PEM"
badrun "bad principal" "invalid principal" --listen 127.0.0.1:0 --upstream http://127.0.0.1:1 --cert "$T/server/chain.pem" --key "$T/server/key.pem" --client-ca "$ROOT_PEM" --allow 'spiffe://*'
badrun "bad listen" "expected host:port" --listen nonsense --upstream http://127.0.0.1:1 --cert "$T/server/chain.pem" --key "$T/server/key.pem" --client-ca "$ROOT_PEM" --allow spiffe://example.org/x
badrun "key mismatch" "does not match the certificate" --listen 127.0.0.1:0 --upstream http://127.0.0.1:1 --cert "$T/server/chain.pem" --key "$T/web/key.pem" --client-ca "$ROOT_PEM" --allow spiffe://example.org/x
head -c 2000 /dev/urandom > "$T/garbage.pem"
badrun "garbage cert file" "not valid PEM\|no PEM CERTIFICATE\|neither PEM" --listen 127.0.0.1:0 --upstream http://127.0.0.1:1 --cert "$T/garbage.pem" --key "$T/web/key.pem" --client-ca "$ROOT_PEM" --allow spiffe://example.org/x
head -c 3000 /dev/urandom > "$T/garbage.yaml"
badrun "garbage YAML" "proxy configuration" --config "$T/garbage.yaml"
printf 'listeners:\n  - listen: 127.0.0.1:0\n    upstream: http://x:1\n' > "$T/short.yaml"
badrun "YAML missing keys" "missing 'cert'" --config "$T/short.yaml"
badrun "missing CRL file" "cannot read CRL" --listen 127.0.0.1:0 --upstream http://127.0.0.1:1 --cert "$T/server/chain.pem" --key "$T/server/key.pem" --client-ca "$ROOT_PEM" --allow spiffe://example.org/x --crl "$T/nope.pem"

# ---------------------------------------------------------------- graceful stop
kill -TERM "$main_PID"; for _ in $(seq 100); do kill -0 "$main_PID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$main_PID" 2>/dev/null; then bad "SIGTERM did not stop the proxy"; else wait "$main_PID"; rc=$?; [ $rc = 0 ] && ok "SIGTERM: drained and exited 0" || bad "SIGTERM exit $rc"; fi

# ---------------------------------------------------------------- the proxy as an attacker tries it (issue #13)
# Its own processes and directory; its checks count here too.
if bash "$(dirname "$0")/interop-gateway.sh" > "$T/gateway.out" 2>&1; then :; fi
cat "$T/gateway.out"
pass=$((pass + $(grep -c '^ok ' "$T/gateway.out"))); fail=$((fail + $(grep -c '^FAIL ' "$T/gateway.out")))
grep -q '^gateway interop: [0-9]* passed' "$T/gateway.out" || bad "interop-gateway.sh did not finish: $(tail -3 "$T/gateway.out")"

echo "proxy interop: $pass passed, $fail failed"
[ "$fail" = 0 ]
