#!/usr/bin/env bash
# `mutual doctor` against real misconfigured peers on 127.0.0.1 (ports chosen at run time): openssl s_server and nginx
# set up wrong in one way at a time, a real authority for CRLs and the clock, and a refused port. For each: doctor exits 1 and names
# the right code — and the healthy server gets exit 0 with no finding.
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
M() { "$MUTUAL" "$@"; }
M init --state-dir "$T/ca" --name "Doctor" > /dev/null
M init --state-dir "$T/other" --name "Foreign" > /dev/null
M issue --state-dir "$T/ca" --profile server --dns web.test --out-dir "$T/web" > /dev/null 2>&1
M issue --state-dir "$T/ca" --profile client --cn alice --out-dir "$T/alice" > /dev/null 2>&1
M issue --state-dir "$T/other" --profile client --cn mallory --out-dir "$T/mallory" > /dev/null 2>&1
ROOTCA="$T/ca/ca/root.pem"

server() {  # port, then s_server arguments
  local port=$1; shift
  openssl s_server -accept "127.0.0.1:$port" -www -quiet "$@" > "$T/s_server-$port.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
doctor() {  # `files` takes no --no-revocation
  if [ "$1" = files ]; then "$MUTUAL" doctor "$@" --json > "$T/doctor.json" 2> "$T/doctor.err"
  else "$MUTUAL" doctor "$@" --json --no-revocation > "$T/doctor.json" 2> "$T/doctor.err"; fi
}
codes() { python3 -c "import json,sys; print(' '.join(f['code'] for f in json.load(open(sys.argv[1]))['findings'] if f['severity'] != 'info'))" "$T/doctor.json" 2>/dev/null; }
expect() {  # what, expected exit, expected codes (space separated, order-free), doctor arguments…
  local what=$1 want_rc=$2 want=$3; shift 3
  doctor "$@"; local rc=$?
  local got; got=$(codes)
  if [ "$rc" = "$want_rc" ] && [ "$(echo $got | tr ' ' '\n' | sort | xargs)" = "$(echo $want | tr ' ' '\n' | sort | xargs)" ]; then
    ok "$what: exit $rc${want:+, $want}"
  else
    bad "$what: exit $rc (want $want_rc), codes '$got' (want '$want') $(head -c 300 "$T/doctor.err")"
  fi
}

P=$(free_port); server "$P" -cert "$T/web/cert.pem" -key "$T/web/key.pem" -cert_chain "$T/ca/ca/intermediate.pem"
start=$(date +%s.%N)
expect "healthy server (leaf + intermediate, right name, trusted root)" 0 "" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA"
took=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
python3 -c "import sys; sys.exit(0 if $took < 2 else 1)" && ok "a live endpoint diagnosed in ${took}s (under 2 s)" || bad "took ${took}s"

P=$(free_port); server "$P" -cert "$T/web/cert.pem" -key "$T/web/key.pem"
expect "server sends only its leaf" 1 "missing-intermediate" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA"

cat "$T/other/ca/intermediate.pem" "$T/ca/ca/intermediate.pem" > "$T/wrong-order.pem"
P=$(free_port); server "$P" -cert "$T/web/cert.pem" -key "$T/web/key.pem" -cert_chain "$T/wrong-order.pem"
expect "chain with an unrelated certificate first" 1 "chain-order" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA"

P=$(free_port); server "$P" -cert "$T/web/cert.pem" -key "$T/web/key.pem" -cert_chain "$T/ca/ca/intermediate.pem"
expect "server from a CA we do not trust" 1 "unknown-ca" "https://127.0.0.1:$P" --servername web.test --ca "$T/other/ca/root.pem"
expect "wrong name (SNI other.test vs SAN web.test)" 1 "name-mismatch" "https://127.0.0.1:$P" --servername other.test --ca "$ROOTCA"
expect "expected identity not presented" 1 "identity-mismatch" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA" --expect-identity spiffe://example.org/ns/web/sa/api

P=$(free_port); server "$P" -cert "$T/web/cert.pem" -key "$T/web/key.pem" -cert_chain "$T/ca/ca/intermediate.pem" -Verify 2 -CAfile "$ROOTCA" -verify_return_error
expect "client certificate required, none sent" 1 "client-cert-required" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA"
expect "client certificate from a CA the server does not trust" 1 "client-ca-mismatch" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA" \
  --cert "$T/mallory/chain.pem" --key "$T/mallory/key.pem"
cat "$ROOTCA" "$T/ca/ca/intermediate.pem" > "$T/client-cas.pem"
P=$(free_port); server "$P" -cert "$T/web/cert.pem" -key "$T/web/key.pem" -cert_chain "$T/ca/ca/intermediate.pem" -Verify 2 -CAfile "$T/client-cas.pem" -verify_return_error
expect "a good client certificate: healthy" 0 "" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA" --cert "$T/alice/chain.pem" --key "$T/alice/key.pem"
expect "a server certificate used as a client certificate" 1 "wrong-eku" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA" --cert "$T/web/chain.pem" --key "$T/web/key.pem"

P=$(free_port); server "$P" -cert "$T/web/cert.pem" -key "$T/web/key.pem" -cert_chain "$T/ca/ca/intermediate.pem" -tls1_2 -cipher AES128-SHA
expect "TLS 1.2 only with no suite in common" 1 "no-common-protocol" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA"

P=$(free_port); python3 -m http.server --bind 127.0.0.1 "$P" > /dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.1; done
expect "a plain HTTP port" 1 "not-tls" "https://127.0.0.1:$P"
expect "nothing listening" 1 "unreachable" "https://127.0.0.1:$(free_port)"
P=$(free_port)
python3 -c "import socket,time; s=socket.socket(); s.bind(('127.0.0.1',$P)); s.listen(); c,_=s.accept(); time.sleep(30)" & PIDS+=($!)
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.1; done
sleep 0.2
start=$(date +%s.%N)
expect "a port that accepts and never answers, --timeout 2s" 1 "timeout" "https://127.0.0.1:$P" --timeout 2s
took=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
python3 -c "import sys; sys.exit(0 if $took <= 4 else 1)" && ok "bounded by --timeout: gave up after ${took}s" || bad "took ${took}s with --timeout 2s"

# The other side: mutual proxy decodes the alert a client sends into words (openssl s_client that trusts another CA).
PP=$(free_port); UP=$(free_port)
python3 -m http.server --bind 127.0.0.1 "$UP" > /dev/null 2>&1 & PIDS+=($!)
cp "$T/web/chain.pem" "$T/proxy-cert.pem"
"$MUTUAL" proxy --listen "127.0.0.1:$PP" --upstream "http://127.0.0.1:$UP" --cert "$T/proxy-cert.pem" --key "$T/web/key.pem" \
  --client-ca "$ROOTCA" --allow 'spiffe://example.org/*' > "$T/proxy.log" 2>&1 & PIDS+=($!); PROXY_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$T/proxy.log" && break; sleep 0.1; done
echo | openssl s_client -connect "127.0.0.1:$PP" -servername web.test -CAfile "$T/other/ca/root.pem" -verify_return_error > /dev/null 2>&1
sleep 0.5
grep -q "reason=client_aborted" "$T/proxy.log" && grep -q "detail=client aborted: .*does not trust our certificate" "$T/proxy.log" \
  && ok "mutual proxy explains a client that refused its certificate in words (reason=client_aborted), not as BAD_PACKET_LENGTH" || bad "proxy log: $(grep -i 'handshake refused' "$T/proxy.log" | tail -2)"

# The authority of the CA above, publishing 3-second CRLs (for a CRL file that goes stale) and its clock.
M serve --state-dir "$T/ca" --listen 127.0.0.1:0 --http-listen off --crl-validity 3s > "$T/serve.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$T/serve.log" && break; sleep 0.1; done
A=$(grep -o '127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
curl -sf --cacert "$ROOTCA" "https://$A/crls.pem" -o "$T/stale-crls.pem" && ok "CRLs fetched from the authority (3 s lifetime)" || bad "no /crls.pem from $A"

# nginx, set up wrong in one way at a time (each its own nginx on its own port).
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
nginx_with() {  # name, port, directives of the server block
  local name=$1 port=$2 d="$T/ngx-$1"; shift 2
  mkdir -p "$d"
  {
    echo "daemon off; worker_processes 1; pid $d/nginx.pid; error_log $d/error.log info;"
    echo "events { worker_connections 16; }"
    echo "http { access_log off; client_body_temp_path $d; proxy_temp_path $d; fastcgi_temp_path $d; uwsgi_temp_path $d; scgi_temp_path $d;"
    echo "  server { listen 127.0.0.1:$port ssl; server_name web.test; ssl_certificate_key $T/web/key.pem; $*"
    echo "    location / { return 200 'ok'; } } }"
  } > "$d/nginx.conf"
  "$NGINX" -c "$d/nginx.conf" -p "$d" > "$d/out.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && return 0; sleep 0.1; done
  bad "nginx $name did not start: $(tail -3 "$d/error.log" "$d/out.log")"; return 1
}
cat "$T/other/ca/root.pem" "$T/other/ca/intermediate.pem" > "$T/foreign-client-cas.pem"
MTLS="ssl_client_certificate $T/client-cas.pem; ssl_verify_client on; ssl_verify_depth 2;"
if [ -x "$NGINX" ]; then
  P=$(free_port); nginx_with leaf-only "$P" "ssl_certificate $T/web/cert.pem;"
  expect "nginx: ssl_certificate is the leaf only" 1 "missing-intermediate" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA"
  P=$(free_port); nginx_with mtls "$P" "ssl_certificate $T/web/chain.pem; $MTLS"
  expect "nginx with mTLS, a good client certificate: healthy" 0 "" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA" --cert "$T/alice/chain.pem" --key "$T/alice/key.pem"
  expect "nginx with mTLS, no client certificate (nginx answers 400)" 1 "client-cert-required" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA"
  P=$(free_port); nginx_with foreign-ca "$P" "ssl_certificate $T/web/chain.pem; ssl_client_certificate $T/foreign-client-cas.pem; ssl_verify_client on; ssl_verify_depth 2;"
  expect "nginx whose ssl_client_certificate is another CA (read from its CertificateRequest)" 1 "client-ca-mismatch" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA" \
    --cert "$T/alice/chain.pem" --key "$T/alice/key.pem"
  # A CRL file nobody refreshes: wait until it is past nextUpdate, then nginx refuses every client of the CA.
  for _ in $(seq 40); do
    "$MUTUAL" doctor files --cert "$T/alice/chain.pem" --ca "$ROOTCA" --crl "$T/stale-crls.pem" --json 2>/dev/null | grep -q '"crl-stale"' && break
    sleep 0.5
  done
  P=$(free_port); nginx_with stale-crl "$P" "ssl_certificate $T/web/chain.pem; $MTLS ssl_crl $T/stale-crls.pem;"
  expect "nginx with a stale ssl_crl: the refusal is not called 'expired' (our certificate is valid)" 1 "client-cert-refused" "https://127.0.0.1:$P" --servername web.test --ca "$ROOTCA" \
    --cert "$T/alice/chain.pem" --key "$T/alice/key.pem"
  grep -q "crl\|CRL" "$T/doctor.json" && ok "… and its words name the CRL as a likely cause" || bad "no CRL hint: $(cat "$T/doctor.json")"
  grep -q "CRL has expired" "$T/ngx-stale-crl/error.log" && ok "control: nginx's log says CRL has expired" || bad "control: nginx log $(tail -2 "$T/ngx-stale-crl/error.log")"
  expect "doctor files on nginx's ssl_crl file: crl-stale" 1 "crl-stale" files --cert "$T/alice/chain.pem" --ca "$ROOTCA" --crl "$T/stale-crls.pem"
else
  bad "nginx is not installed"
fi

# On reload the proxy says what doctor would find in the new files: here a leaf-only certificate.
grep -q "code=missing-intermediate" "$T/proxy.log" && bad "the healthy start-up already warned: $(grep code= "$T/proxy.log")" || ok "a healthy proxy start-up: no doctor warning"
cp "$T/web/cert.pem" "$T/proxy-cert.tmp" && mv "$T/proxy-cert.tmp" "$T/proxy-cert.pem" && kill -HUP "$PROXY_PID"
for _ in $(seq 50); do grep -q "code=missing-intermediate" "$T/proxy.log" && break; sleep 0.1; done
grep "code=missing-intermediate" "$T/proxy.log" | grep -q "at=reload" && ok "after a reload to a leaf-only certificate the proxy warns (code=missing-intermediate at=reload)" \
  || bad "no reload warning: $(tail -3 "$T/proxy.log")"

# The clock: doctor itself runs 2 h ahead (wall-clock shim) against the authority, whose answers carry Date.
cc -shared -fPIC -O2 -o "$T/shift.so" "$ROOT/scripts/clockshift/shift.c" -ldl
LD_PRELOAD="$T/shift.so" MUTUAL_TEST_CLOCK_SHIFT=7200 "$MUTUAL" doctor "https://$A" --ca "$ROOTCA" --json --no-revocation > "$T/doctor.json" 2>&1
got=$(codes)
case " $got " in *" clock-skew "*) ok "this host's clock 2 h ahead: clock-skew named ($got)";; *) bad "clock: '$got' $(head -c 300 "$T/doctor.json")";; esac
# Revocation as a relying party checks it: a CA whose certificates name its CRL and OCSP URLs, served for real.
HP=$(free_port)
M init --state-dir "$T/crlca" --name "CRL CA" --http-public-url "http://127.0.0.1:$HP" > /dev/null
M issue --state-dir "$T/crlca" --profile server --dns web.test --out-dir "$T/crlweb" > /dev/null 2>&1
"$MUTUAL" serve --state-dir "$T/crlca" --listen 127.0.0.1:0 --http-listen "127.0.0.1:$HP" > "$T/crlserve.log" 2>&1 & PIDS+=($!); CRLSERVE=$!
for _ in $(seq 100); do grep -q "CRL and OCSP on" "$T/crlserve.log" && break; sleep 0.1; done
P=$(free_port); server "$P" -cert "$T/crlweb/cert.pem" -key "$T/crlweb/key.pem" -cert_chain "$T/crlca/ca/intermediate.pem"
revdoctor() { "$MUTUAL" doctor "https://127.0.0.1:$P" --servername web.test --ca "$T/crlca/ca/root.pem" --json > "$T/doctor.json" 2> "$T/doctor.err"; }
revdoctor; rc=$?; got=$(codes)
[ "$rc" = 0 ] && [ -z "$got" ] && ok "revocation checked through the certificate's OCSP and CRL URLs: healthy" || bad "revocation healthy: exit $rc, '$got' $(head -c 300 "$T/doctor.json")"
M revoke --state-dir "$T/crlca" "$(openssl x509 -in "$T/crlweb/cert.pem" -noout -serial | cut -d= -f2)" --reason keyCompromise > /dev/null 2>&1
for _ in $(seq 40); do revdoctor; got=$(codes); case " $got " in *" revoked "*) break;; esac; sleep 0.25; done
[ "$got" = "revoked" ] && ok "a revoked server certificate: revoked, said once (CRL and OCSP agree)" || bad "revoked: '$got' $(head -c 300 "$T/doctor.json")"
kill "$CRLSERVE"
for _ in $(seq 100); do kill -0 "$CRLSERVE" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$CRLSERVE" 2>/dev/null; then bad "serve did not stop within 10 s of SIGTERM"; kill -9 "$CRLSERVE"; else ok "serve stopped on SIGTERM"; fi
wait "$CRLSERVE" 2>/dev/null
revdoctor; got=$(codes)
case " $got " in *" revocation-unchecked "*) ok "the revocation URLs unreachable: revocation-unchecked ($got)";; *) bad "unreachable: '$got'";; esac

# The authority says at start-up when its own CA certificates are not valid by this host's clock (2 days behind).
M init --state-dir "$T/late" --name "Late" > /dev/null
LD_PRELOAD="$T/shift.so" MUTUAL_TEST_CLOCK_SHIFT=-172800 "$MUTUAL" serve --state-dir "$T/late" --listen 127.0.0.1:0 --http-listen off > "$T/late.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$T/late.log" && break; sleep 0.1; done
grep "code=not-yet-valid" "$T/late.log" | grep -q "issuing CA" && ok "serve with a clock 2 days behind warns about its CA (code=not-yet-valid)" || bad "no CA warning: $(head -3 "$T/late.log")"
grep -q "code=not-yet-valid" "$T/serve.log" && bad "the healthy authority warned: $(grep code= "$T/serve.log")" || ok "a healthy authority: no CA warning"
echo "doctor interop: $pass passed, $fail failed"
[ "$fail" = 0 ]
