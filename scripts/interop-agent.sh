#!/usr/bin/env bash
# The agent end to end on 127.0.0.1 against a real `mutual serve` (ports chosen at run time):
#  - trust from the root fingerprint (a wrong pin is refused, no TOFU); bad flags exit 2;
#  - enrollment with a token: key.pem 0600, files verify with openssl, status;
#  - the full rotation story for AGENT_SECONDS (default 180): an authority issuing 30-second certificates, a sidecar
#    `mutual proxy` with an identity: block rotating its own certificate in-process, a client whose certificate a
#    second agent rotates, calling through the proxy continuously: >= 5 rotations each, zero failed requests, and the
#    inventory shows every rotation;
#  - a revoked certificate stops renewal with a clear message; an expired one is renewed via renew-expired;
#  - SIGKILL in the middle of a delivery (injected crash points) leaves a matching old or new key/cert pair;
#  - authority down: the agent keeps the current certificate and reports "retrying" with the reason.
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
HELP="$(cd "$(dirname "$0")" && pwd)/proxy_helpers.py"
SECONDS_TOTAL=${AGENT_SECONDS:-180}
S="$T/ca"
M() { "$MUTUAL" "$@"; }

M init --state-dir "$S" --name "Agent Interop" --json > "$T/init.json"
FP=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['root_fingerprint'])" "$T/init.json")
OSSL_FP=$(openssl x509 -in "$S/ca/root.pem" -noout -fingerprint -sha256 | cut -d= -f2)
"$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen off --renew-expired-grace 1h > "$T/serve.log" 2>&1 & SERVE_PID=$!; PIDS+=($SERVE_PID)
for _ in $(seq 100); do grep -q "listening on" "$T/serve.log" && break; sleep 0.1; done
A=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
[ -n "$A" ] && ok "authority up at $A" || { bad "serve did not start"; echo "agent interop: $pass passed, $fail failed"; exit 1; }
token() {  # scope validity [uses]
  M token create --state-dir "$S" --scope "$1" --max-validity "$2" --uses "${3:-1}" --ttl 1h --json | python3 -c "import json,sys;print(json.load(sys.stdin)['token'])"
}
agent() { "$MUTUAL" agent --authority "$A" --root-fingerprint "$FP" "$@"; }
pair_matches() {  # dir: key.pem and cert.pem belong together
  [ "$(openssl pkey -in "$1/key.pem" -pubout 2>/dev/null | sha256sum)" = "$(openssl x509 -in "$1/cert.pem" -noout -pubkey 2>/dev/null | sha256sum)" ]
}

# ---------------------------------------------------------------- bootstrap and bad input
TOK=$(token 'spiffe://example.org/ns/web/*' 1h 2)
"$MUTUAL" agent --authority "$A" --root-fingerprint "$(echo "$FP" | tr 0-9a-f 1-9a-f0)" --token "$TOK" --identity spiffe://example.org/ns/web/sa/x --out-dir "$T/wrongpin" --once > "$T/out" 2>&1
[ $? = 1 ] && grep -q "do not match --root-fingerprint" "$T/out" && [ ! -e "$T/wrongpin/key.pem" ] && ok "a wrong root fingerprint is refused before anything is sent (no TOFU)" || bad "wrong pin: $(cat "$T/out")"
agent --token "$TOK" --identity spiffe://example.org/ns/web/sa/x --out-dir "$T/x" --renew-at 3/2 --once > "$T/out" 2>&1
[ $? = 2 ] && grep -q "renew-at" "$T/out" && ok "bad --renew-at: exit 2" || bad "renew-at: $(cat "$T/out")"
"$MUTUAL" agent --authority "$A" --root-fingerprint nothex --identity spiffe://example.org/ns/web/sa/x --out-dir "$T/x" --once > "$T/out" 2>&1
[ $? = 2 ] && grep -q "64 hex digits" "$T/out" && ok "malformed fingerprint: exit 2" || bad "bad fp: $(cat "$T/out")"
agent --identity spiffe://example.org/ns/web/sa/x --out-dir "$T/x" --once > "$T/out" 2>&1
[ $? = 1 ] && grep -q "no --token" "$T/out" && ok "no certificate and no token: a clear message" || bad "no token: $(cat "$T/out")"

mkdir -p "$T/garbage"; head -c 5000 /dev/urandom > "$T/garbage/status.json"
M agent status --out-dir "$T/nowhere" > "$T/out" 2>&1; rc1=$?
M agent status --out-dir "$T/garbage" > "$T/out2" 2>&1; rc2=$?
[ $rc1 = 1 ] && [ $rc2 = 1 ] && grep -q "no agent status" "$T/out" && grep -q "no agent status" "$T/out2" && ok "agent status on a missing or garbage directory: exit 1 with a clear message" || bad "status bad dir: $rc1 $rc2 $(cat "$T/out" "$T/out2")"
agent --token "$TOK" --identity spiffe://example.org/ns/web/sa/first --out-dir "$T/first" --root-fingerprint "$OSSL_FP" --once > "$T/out" 2>&1
grep -q "^enrolled: serial" "$T/out" && ok "enrolled with the token; the pin accepted in openssl's colon form" || bad "enroll: $(cat "$T/out")"
[ "$(stat -L -c %a "$T/first/key.pem")" = 600 ] && ok "key.pem is mode 0600" || bad "key mode $(stat -L -c %a "$T/first/key.pem")"
openssl verify -CAfile "$T/first/bundle.pem" -untrusted "$T/first/chain.pem" -purpose sslclient "$T/first/cert.pem" >/dev/null 2>&1 && pair_matches "$T/first" \
  && ok "delivered cert.pem verifies with openssl against bundle.pem + chain.pem, and matches key.pem" || bad "delivered files do not verify"
M agent status --out-dir "$T/first" > "$T/out" 2>&1 && grep -q "state: *ok" "$T/out" && grep -q "expires:.*in [0-9]*s" "$T/out" && ok "mutual agent status: state, serial and time to expiry" || bad "status: $(cat "$T/out")"
M agent status --out-dir "$T/first" --json | python3 -c "import json,sys; d=json.load(sys.stdin); assert d['status']['serial'] and d['expires_in_seconds'] > 0" && ok "status --json" || bad "status json"
agent --identity spiffe://example.org/ns/web/sa/first --out-dir "$T/first" --once > "$T/out" 2>&1
grep -q "not due" "$T/out" && ok "--once when not due: nothing to do, says when" || bad "once not due: $(cat "$T/out")"

# ---------------------------------------------------------------- crash in the middle of a delivery
# 9 s certificates: due at 6 s; renewing at 6.5 s leaves 2.5 s before notAfter (whole seconds in X.509) so the
# crashing runs renew over mTLS while the certificate is still valid.
CT=$(token 'spiffe://example.org/ns/web/*' 9s 1)
agent --token "$CT" --identity spiffe://example.org/ns/web/sa/crash --out-dir "$T/crash" --validity 9s --once >/dev/null 2>&1
old=$(openssl x509 -in "$T/crash/cert.pem" -noout -serial)
sleep 6.5   # past 2/3 of the lifetime: the next run renews
for point in after-key after-files before-publish; do
  MUTUAL_AGENT_CRASH_POINT=$point "$MUTUAL" agent --authority "$A" --root-fingerprint "$FP" --identity spiffe://example.org/ns/web/sa/crash --out-dir "$T/crash" --once >/dev/null 2>&1
  rc=$?
  [ $rc = 137 ] && pair_matches "$T/crash" && [ "$(openssl x509 -in "$T/crash/cert.pem" -noout -serial)" = "$old" ] \
    && ok "SIGKILL at $point: exit 137, the old key/cert pair is intact and matching" || bad "crash at $point: rc=$rc, serial $(openssl x509 -in "$T/crash/cert.pem" -noout -serial) vs $old"
done
sleep 3.5   # now past notAfter: the next run must use renew-expired
agent --identity spiffe://example.org/ns/web/sa/crash --out-dir "$T/crash" --once > "$T/out" 2>&1
grep -q "renewed" "$T/out" && pair_matches "$T/crash" && [ "$(openssl x509 -in "$T/crash/cert.pem" -noout -serial)" != "$old" ] \
  && ok "after the crashes, the next run renews (expired: renew-expired with proof of possession) and the new pair matches" || bad "after crash: $(cat "$T/out")"
[ "$(ls -d "$T/crash"/.gen-* | wc -l)" -le 2 ] && ok "old versions are cleaned up (current and previous kept)" || bad "generations: $(ls -a "$T/crash")"

# ---------------------------------------------------------------- the rotation story: sidecar proxy + agent-managed client, 30 s certificates
python3 "$HELP" echo > "$T/echo.port" & PIDS+=($!)
for _ in $(seq 50); do [ -s "$T/echo.port" ] && break; sleep 0.1; done
ECHO=$(head -1 "$T/echo.port")
PT=$(token 'spiffe://example.org/ns/edge/*' 30s 1)
cat > "$T/sidecar.yaml" <<YAML
access-log: off
admin-listen: 127.0.0.1:0
identity:
  authority: $A
  root-fingerprint: $FP
  token: $PT
  identity: spiffe://example.org/ns/edge/sa/front
  validity: 30s
  out-dir: sidecar-identity
listeners:
  - name: front
    listen: 127.0.0.1:0
    upstream: http://127.0.0.1:$ECHO
    allow: ["spiffe://example.org/ns/web/*"]
YAML
"$MUTUAL" proxy --config "$T/sidecar.yaml" > "$T/sidecar.out" 2> "$T/sidecar.err" & SIDECAR=$!; PIDS+=($SIDECAR)
for _ in $(seq 100); do grep -q "front listening on" "$T/sidecar.err" && break; sleep 0.1; done
SP=$(grep "front listening on" "$T/sidecar.err" | sed 's/.*://')
[ -n "$SP" ] && [ -e "$T/sidecar-identity/key.pem" ] && ok "sidecar proxy enrolled its own identity in-process and listens on $SP" || bad "sidecar: $(tail -5 "$T/sidecar.err")"
KT=$(token 'spiffe://example.org/ns/web/*' 30s 1)
"$MUTUAL" agent --authority "$A" --root-fingerprint "$FP" --token "$KT" --identity spiffe://example.org/ns/web/sa/client --out-dir "$T/client" --validity 30s > "$T/client-agent.log" 2>&1 & CLIENT_AGENT=$!; PIDS+=($CLIENT_AGENT)
for _ in $(seq 100); do [ -e "$T/client/key.pem" ] && break; sleep 0.1; done
python3 "$HELP" load "$SP" "$T/client/bundle.pem" "$T/client/chain.pem" "$T/client/key.pem" "$SECONDS_TOTAL" "$T/story.json" & LOAD=$!; PIDS+=($LOAD)

# Meanwhile: revocation stops an agent; authority-down keeps the current certificate.
RT=$(token 'spiffe://example.org/ns/web/*' 30s 1)
agent --token "$RT" --identity spiffe://example.org/ns/web/sa/doomed --out-dir "$T/doomed" --validity 30s --once >/dev/null 2>&1
dserial=$(openssl x509 -in "$T/doomed/cert.pem" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f')
M revoke --state-dir "$S" "$dserial" --reason keyCompromise >/dev/null
timeout 60 "$MUTUAL" agent --authority "$A" --root-fingerprint "$FP" --identity spiffe://example.org/ns/web/sa/doomed --out-dir "$T/doomed" > "$T/doomed.log" 2>&1
rc=$?
M agent status --out-dir "$T/doomed" > "$T/doomed.status" 2>&1
[ $rc = 1 ] && grep -q "was revoked" "$T/doomed.log" && grep -q "state: *stopped" "$T/doomed.status" \
  && ok "revoked certificate: renewal stops with a clear message, status 'stopped'" || bad "revoked agent rc=$rc: $(tail -3 "$T/doomed.log")"

wait $LOAD
python3 - "$T/story.json" <<'PY' && ok "client called through the sidecar for ${SECONDS_TOTAL}s: zero failed requests ($(python3 -c "import json;print(json.load(open('$T/story.json'))['ok'])") ok)" || bad "rotation story: $(cat "$T/story.json")"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["failed"] == 0 and r["ok"] > 100, r
PY
proxy_certs=$(M list --state-dir "$S" --identity spiffe://example.org/ns/edge/sa/front | grep -c edge/sa/front)
client_certs=$(M list --state-dir "$S" --identity spiffe://example.org/ns/web/sa/client | grep -c web/sa/client)
min=$(( SECONDS_TOTAL / 30 ))
[ "$proxy_certs" -ge $((min + 1)) ] && ok "inventory: the sidecar's certificate rotated $((proxy_certs - 1)) times" || bad "sidecar rotations: $proxy_certs certificates"
[ "$client_certs" -ge $((min + 1)) ] && ok "inventory: the client's certificate rotated $((client_certs - 1)) times" || bad "client rotations: $client_certs certificates"
grep -q "reloaded" "$T/sidecar.err" && ok "the sidecar reloaded its listener after each renewal" || bad "no reload in sidecar log"

# Authority down (crashed): the client agent keeps its certificate and reports why.
kill -9 $SERVE_PID; wait $SERVE_PID 2>/dev/null
# The next renewal is due within 20 s; a refused connection is retried by the HTTP client until its 15 s timeout.
for _ in $(seq 60); do
  M agent status --out-dir "$T/client" > "$T/out" 2>&1
  grep -q "state: *retrying" "$T/out" && break
  sleep 1
done
grep -q "state: *retrying" "$T/out" && grep -q "authority unreachable" "$T/out" && pair_matches "$T/client" \
  && ok "authority down: status 'retrying' with the reason, current pair kept" || bad "authority down: $(cat "$T/out")"
kill $CLIENT_AGENT $SIDECAR 2>/dev/null; wait $CLIENT_AGENT $SIDECAR 2>/dev/null

echo "agent interop: $pass passed, $fail failed"
[ "$fail" = 0 ]
