#!/usr/bin/env bash
# docs/nginx.md, run as written against a real nginx (ports chosen at run time, 127.0.0.1):
#  - the server { } block is extracted from docs/nginx.md, only paths and the port substituted;
#  - one agent keeps nginx's server certificate (profile server, renewed by proof of possession) and crls.pem fresh,
#    reloading nginx; 10-second CRLs make several nextUpdate times pass during the run;
#  - good clients (leaf only, and leaf + chain) get 200 on every request across the CRL expiries and the certificate
#    rotation; the app behind nginx reads the SPIFFE ID from the forwarded certificate;
#  - a client revoked mid-run is refused within the refresh interval;
#  - control: the same block with a CRL file nobody refreshes refuses every client once the CRL expires.
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${VENV:+$VENV/bin/python3}; PY=${PY:-python3}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
S="$T/ca"; W="$T/web"
[ -x "$NGINX" ] || { bad "nginx is not installed"; echo "nginx interop: $pass passed, $fail failed"; exit 1; }

"$MUTUAL" init --state-dir "$S" --name "nginx recipe" --json > "$T/init.json"
FP=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['root_fingerprint'])" "$T/init.json")
"$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen off --crl-validity 10s > "$T/serve.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$T/serve.log" && break; sleep 0.1; done
A=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
[ -n "$A" ] && ok "authority up at $A (10 s CRLs)" || { bad "serve did not start: $(cat "$T/serve.log")"; echo "nginx interop: $pass passed, $fail failed"; exit 1; }
token() { "$MUTUAL" token create --state-dir "$S" --scope "$1" --profile "$2" --max-validity "$3" --uses 1 --json | python3 -c "import json,sys;print(json.load(sys.stdin)['token'])"; }

# ---- the nginx configuration: docs/nginx.md's block, paths and port substituted
NP=$(free_port); NC=$(free_port); UP=$(free_port)
recipe=$(awk '/<!-- nginx-recipe/{f=1;next} f&&/^```nginx/{g=1;next} g&&/^```/{exit} g{print}' "$ROOT/docs/nginx.md")
[ -n "$recipe" ] && ok "the nginx block is extracted from docs/nginx.md" || bad "no nginx-recipe block in docs/nginx.md"
block() {  # port crl-file
  printf '%s\n' "$recipe" | sed -e "s#listen 443 ssl;#listen 127.0.0.1:$1 ssl;#" -e "s#/etc/mutual/web/crls.pem#$2#" \
    -e "s#/etc/mutual/web#$W#g" -e "s#http://127.0.0.1:8080#http://127.0.0.1:$UP#"
}
CONF="$T/nginx.conf"; mkdir -p "$T/ngx"
{
  echo "daemon off; worker_processes 1; pid $T/ngx/nginx.pid; error_log $T/ngx/error.log info;"
  echo "events { worker_connections 64; }"
  echo "http { access_log off; client_body_temp_path $T/ngx; proxy_temp_path $T/ngx; fastcgi_temp_path $T/ngx; uwsgi_temp_path $T/ngx; scgi_temp_path $T/ngx;"
  block "$NP" "$W/crls.pem"
  block "$NC" "$T/static-crls.pem"     # control: a CRL file nobody refreshes
  echo "}"
} > "$CONF"

# ---- the agent, as docs/nginx.md runs it (30 s server certificates: a rotation during the run)
AGENT=("$MUTUAL" agent --authority "$A" --root-fingerprint "$FP" --profile server --identity web.test --out-dir "$W"
       --crl-out "$W/crls.pem" --crl-refresh 2s --validity 30s --exec "$NGINX -c $CONF -s reload")
"${AGENT[@]}" --token "$(token web.test server 30s)" --once > "$T/out" 2>&1
grep -q "^enrolled" "$T/out" && grep -q "CRLs written to" "$T/out" && ok "agent --once: server certificate and crls.pem delivered" || bad "agent once: $(cat "$T/out")"
[ "$(grep -c 'BEGIN X509 CRL' "$W/crls.pem" 2>/dev/null)" = 2 ] && ok "crls.pem holds a CRL for every CA level" || bad "crls.pem: $(head -c 300 "$W/crls.pem" 2>/dev/null)"
curl -s --cacert "$W/bundle.pem" "$A/bundle.pem" -o "$W/client-cas.pem"
[ "$(grep -c 'BEGIN CERTIFICATE' "$W/client-cas.pem")" = 2 ] && ok "client-cas.pem: root and issuing intermediate" || bad "client-cas.pem"
cp "$W/crls.pem" "$T/static-crls.pem"; static_at=$(date +%s)

# The app behind nginx: reads the client's SPIFFE ID from the forwarded certificate.
cat > "$T/app.py" <<'PY'
import sys, urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from cryptography import x509
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        pem = urllib.parse.unquote(self.headers.get("X-Client-Cert", ""))
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
            who = uris[0] if uris else "-"
        except Exception as e:
            who = "unreadable"
        body = f"{self.headers.get('X-Client-Verify')} {who}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
"$PY" "$T/app.py" "$UP" & PIDS+=($!)
"$NGINX" -c "$CONF" & PIDS+=($!)
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$NP) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/$UP) 2>/dev/null && break; sleep 0.1; done
"${AGENT[@]}" > "$T/agent.log" 2>&1 & PIDS+=($!)

# ---- clients: two workload identities enrolled by their own agents
for who in good victim; do
  "$MUTUAL" agent --authority "$A" --root-fingerprint "$FP" --token "$(token "spiffe://example.org/ns/app/*" workload 1h)" \
    --identity "spiffe://example.org/ns/app/sa/$who" --out-dir "$T/$who" --validity 1h --once > "$T/out" 2>&1 || bad "client $who: $(cat "$T/out")"
done
served_serial() { echo | openssl s_client -connect "127.0.0.1:$NP" -servername web.test 2>/dev/null | openssl x509 -noout -serial 2>/dev/null; }
first_serial=$(served_serial)
call() {  # port client [chain] -> http code; body in $T/body
  local cert="$T/$2/cert.pem"; [ "${3:-}" = chain ] && cert="$T/$2/chain.pem"
  curl -s -o "$T/body" -w '%{http_code}' --max-time 5 --resolve "web.test:$1:127.0.0.1" --cacert "$T/good/bundle.pem" \
    --cert "$cert" --key "$T/$2/key.pem" "https://web.test:$1/"
}
code=$(call "$NP" good); [ "$code" = 200 ] && grep -q "^SUCCESS spiffe://example.org/ns/app/sa/good$" "$T/body" \
  && ok "a leaf-only client gets in; the app reads its SPIFFE ID from X-Client-Cert" || bad "first call: $code $(cat "$T/body") $(tail -3 "$T/ngx/error.log")"
code=$(call "$NP" victim chain); [ "$code" = 200 ] && ok "a client sending its chain gets in" || bad "victim before revocation: $code"

# ---- 36 s of traffic: several CRL nextUpdate times pass; the victim is revoked after 10 s
failures=0; calls=0; revoked_at=""; refused_after=""
victim_serial=$(openssl x509 -in "$T/victim/cert.pem" -noout -serial | cut -d= -f2)
start=$(date +%s.%N)
while :; do
  now=$(date +%s.%N); elapsed=$(python3 -c "print($now-$start)")
  python3 -c "import sys; sys.exit(0 if $elapsed < 36 else 1)" || break
  mode=""; [ $((calls % 2)) = 1 ] && mode=chain
  code=$(call "$NP" good $mode); calls=$((calls + 1))
  [ "$code" = 200 ] || { failures=$((failures + 1)); echo "  good client refused at ${elapsed}s: $code" >&2; }
  if [ -z "$revoked_at" ] && python3 -c "import sys; sys.exit(0 if $elapsed >= 10 else 1)"; then
    "$MUTUAL" revoke --state-dir "$S" --reason keyCompromise "$victim_serial" > /dev/null && revoked_at=$(date +%s.%N)
  fi
  if [ -n "$revoked_at" ] && [ -z "$refused_after" ] && [ "$(call "$NP" victim)" = 400 ]; then
    refused_after=$(python3 -c "print(round($(date +%s.%N)-$revoked_at, 1))")
  fi
  sleep 0.4
done
[ "$failures" = 0 ] && [ "$calls" -ge 20 ] && ok "good clients: $calls requests over 36 s, none refused, across 3+ CRL expiry times" || bad "good clients refused $failures of $calls times: $(grep -i 'crl\|verify' "$T/ngx/error.log" | tail -3)"
[ -n "$refused_after" ] && python3 -c "import sys; sys.exit(0 if $refused_after <= 6 else 1)" \
  && ok "the revoked client is refused ${refused_after}s after the revocation (refresh every 2 s)" || bad "revoked client still accepted: '${refused_after}' $(tail -5 "$T/agent.log")"
grep -q "certificate revoked" "$T/ngx/error.log" && ok "nginx's log names the reason: certificate revoked" || bad "no revocation reason in nginx's log"
last_serial=$(served_serial)
[ -n "$first_serial" ] && [ -n "$last_serial" ] && [ "$first_serial" != "$last_serial" ] \
  && ok "nginx's server certificate was renewed by proof of possession and reloaded ($first_serial -> $last_serial)" || bad "server certificate not rotated: $first_serial / $last_serial; $(grep -i 'renewal' "$T/agent.log" | tail -3)"
grep -q "method.*proof\|\"method\":\"proof\"" <("$MUTUAL" audit list --state-dir "$S" --json 2>/dev/null) \
  && ok "the audit trail records the renewal method: proof" || bad "no proof renewal in the audit trail"

# ---- control: the CRL file nobody refreshed has expired, and nginx now refuses every client
age=$(( $(date +%s) - static_at ))
code=$(call "$NC" good)
[ "$age" -gt 10 ] && [ "$code" = 400 ] && grep -q "CRL has expired" "$T/ngx/error.log" \
  && ok "control: with a CRL file nobody refreshes, nginx refuses a good client once it expires (CRL has expired)" || bad "control: age ${age}s code $code"
echo "nginx interop: $pass passed, $fail failed"
[ "$fail" = 0 ]
