#!/usr/bin/env bash
# Certificate-bound access tokens (RFC 8705) with independent peers:
#  1. a Python client (requests, with its client certificate) gets a token from `mutual serve --oauth-allow`;
#     a Python resource server (stdlib ssl + pyjwt, written from the RFC) accepts it only on a connection with the
#     same certificate; `mutual oauth token` and introspection agree;
#  2. through `mutual proxy --token-audience`: the token with its own certificate passes (the app sees the verified
#     claims, never the client's copies); with another certificate of the same CA, expired, wrong audience, missing
#     scope, unknown kid, alg none, HS256 keyed with the public key: each refused with its code and RFC 6750 error;
#     a revoked certificate: refused at the handshake, its token inactive at introspection;
#  3. the signing key rotated twice (published ahead, then with no notice) while a client calls steadily through
#     the proxy with fresh tokens: zero failed requests, both new keys used.
# Prints "N passed, N failed".
set -uo pipefail
: "${MUTUAL:?}" "${VENV:?}"
. "$(dirname "$0")/harness.sh"
PY="$VENV/bin/python3"
PEERS="$(cd "$(dirname "$0")" && pwd)/oauth_peers.py"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 150); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
S="$T/state"
ROOT="$S/ca/root.pem"

"$MUTUAL" init --state-dir "$S" --name "OAuth Test" > /dev/null 2>&1 || { bad "init"; echo "OAuth: $pass passed, $fail failed"; exit 1; }
issue() { "$MUTUAL" issue --state-dir "$S" --profile "$1" --out-dir "$T/$2" "${@:3}" > /dev/null 2>&1 || bad "issue $2"; }
issue workload alice --uri spiffe://example.org/ns/a/alice
issue workload mallory --uri spiffe://example.org/ns/a/mallory   # same CA, same policy, another certificate
issue workload steady --uri spiffe://example.org/ns/a/steady
issue server rs --dns localhost --ip 127.0.0.1

"$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --oauth-allow 'spiffe://example.org/ns/a/*=payments:read,write' --oauth-token-lifetime 2m > "$T/serve.log" 2>&1 &
PIDS+=($!)
wait_for "$T/serve.log" "CRL and OCSP on" || { bad "serve did not start: $(tail -3 "$T/serve.log")"; echo "OAuth: $pass passed, $fail failed"; exit 1; }
API=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)

# ---- 1. independent client and resource server
TOKEN=$("$PY" "$PEERS" token "$API" "$T/alice/chain.pem" "$T/alice/key.pem" "$ROOT" payments read 2>"$T/token.err") \
  && ok "python requests gets a token over mTLS (client_credentials, tls_client_auth)" || bad "python token: $(cat "$T/token.err")"
RS_PORT=$(free_port)
"$PY" "$PEERS" rs "$RS_PORT" "$T/rs/chain.pem" "$T/rs/key.pem" "$ROOT" "$API" payments > "$T/rs.log" 2>&1 &
PIDS+=($!)
wait_for "$T/rs.log" listening || bad "resource server did not start: $(cat "$T/rs.log")"
RS="https://127.0.0.1:$RS_PORT/resource"
out=$("$PY" "$PEERS" call "$RS" "$T/alice/chain.pem" "$T/alice/key.pem" "$ROOT" "$TOKEN" 2>&1)
[[ "$out" == "200 - hello spiffe://example.org/ns/a/alice" ]] && ok "python resource server (ssl + pyjwt) accepts the token with its own certificate" || bad "rs own: $out"
out=$("$PY" "$PEERS" call "$RS" "$T/mallory/chain.pem" "$T/mallory/key.pem" "$ROOT" "$TOKEN" 2>&1)
[[ "$out" == "401 - certificate mismatch" ]] && ok "python resource server refuses it on another certificate's connection (cnf.x5t#S256)" || bad "rs other: $out"
CLI_TOKEN=$("$MUTUAL" oauth token --authority "$API" --cert "$T/alice/chain.pem" --key "$T/alice/key.pem" --ca "$ROOT" --audience payments --scope read 2>"$T/cli.err")
out=$("$PY" "$PEERS" call "$RS" "$T/alice/chain.pem" "$T/alice/key.pem" "$ROOT" "$CLI_TOKEN" 2>&1)
[[ "$out" == 200* ]] && ok "mutual oauth token: accepted by the python resource server" || bad "cli token: $out $(cat "$T/cli.err")"
"$MUTUAL" oauth token --authority "$API" --cert "$T/alice/chain.pem" --key "$T/alice/key.pem" --ca "$ROOT" --audience payments --scope admin > /dev/null 2> "$T/refused.err"
grep -q "\[oauth-scope-not-allowed\]" "$T/refused.err" && ok "mutual oauth token: a scope outside the policy is refused with its code" || bad "cli refusal: $(cat "$T/refused.err")"
"$MUTUAL" oauth introspect --authority "$API" --cert "$S/admin/chain.pem" --key "$S/admin/key.pem" --ca "$ROOT" "$TOKEN" > "$T/introspect.json" 2>&1
[ "$(jq -r '.active' "$T/introspect.json")" = true ] && [ "$(jq -r '.cnf["x5t#S256"]' "$T/introspect.json")" != null ] \
  && ok "introspection (admin): active, with cnf" || bad "introspect: $(cat "$T/introspect.json")"

# ---- 2. through mutual proxy
ECHO_PORT=$(free_port)
"$PY" "$PEERS" echo "$ECHO_PORT" > "$T/echo.log" 2>&1 &
PIDS+=($!)
wait_for "$T/echo.log" listening || bad "echo app did not start"
"$MUTUAL" proxy --listen 127.0.0.1:0 --upstream "http://127.0.0.1:$ECHO_PORT" --cert "$T/rs/chain.pem" --key "$T/rs/key.pem" \
  --client-ca "$ROOT" --allow 'spiffe://example.org/ns/a/*' --authority "$API" --authority-ca "$ROOT" \
  --token-audience payments --token-scope read --access-log off > "$T/proxy.log" 2>&1 &
PIDS+=($!)
wait_for "$T/proxy.log" "inbound listening" || { bad "proxy did not start: $(tail -3 "$T/proxy.log")"; echo "OAuth: $pass passed, $fail failed"; exit 1; }
PX="https://127.0.0.1:$(grep -o 'inbound listening on 127.0.0.1:[0-9]*' "$T/proxy.log" | grep -o '[0-9]*$')/pay"
curl -s --cacert "$ROOT" --cert "$T/alice/chain.pem" --key "$T/alice/key.pem" -H "Authorization: Bearer $TOKEN" \
  -H "X-Token-Subject: spiffe://example.org/ns/admin" -H "X_Token_Scope: admin" "$PX" > "$T/seen.json"
[ "$(jq -r '."x-token-subject"' "$T/seen.json")" = "spiffe://example.org/ns/a/alice" ] && [ "$(jq -r '."x-token-scope"' "$T/seen.json")" = "read" ] \
  && [ "$(jq -r '.authorization' "$T/seen.json")" = null ] && ! grep -q "ns/admin" "$T/seen.json" \
  && ok "proxy: the bound token passes; the app sees the verified subject and scope, not the client's copies or the token" \
  || bad "proxy own: $(head -c 400 "$T/seen.json")"
# refused WHAT CERT TOKEN STATUS CODE ERROR: status, the body's stable code, the challenge's RFC 6750 error
refused() {
  local what=$1 who=$2 token=$3 status=$4 code=$5 error=$6
  curl -s -o "$T/body" -D "$T/headers" --cacert "$ROOT" --cert "$T/$who/chain.pem" --key "$T/$who/key.pem" \
    ${token:+-H "Authorization: Bearer $token"} "$PX"
  local got; got=$(head -1 "$T/headers" | cut -d' ' -f2)
  if [ "$got" = "$status" ] && [ "$(jq -r .error "$T/body")" = "$code" ] && grep -qi "^www-authenticate: Bearer realm=\"mutual\"${error:+.*error=\"$error\"}" "$T/headers"; then
    ok "proxy refuses $what: $status $code${error:+ ($error)}"
  else
    bad "proxy $what: $got $(cat "$T/body") $(grep -i www-auth "$T/headers")"
  fi
}
refused "the token on another certificate of the same CA" mallory "$TOKEN" 401 token_binding_mismatch invalid_token
refused "a request without a token" alice "" 401 token_missing ""
for kind in "expired token_expired 401 invalid_token" "wrong-audience token_audience 401 invalid_token" "no-scope token_scope 403 insufficient_scope" \
            "unknown-kid token_unknown_key 401 invalid_token" "alg-none token_algorithm 401 invalid_token" "hs256-public-key token_algorithm 401 invalid_token"; do
  set -- $kind
  forged=$("$PY" "$PEERS" forge "$1" "$S" "$TOKEN" 2>"$T/forge.err") || bad "forge $1: $(cat "$T/forge.err")"
  refused "a forged token ($1)" alice "$forged" "$3" "$2" "$4"
done

# A revoked certificate: the proxy refuses its handshake (revocation pushed by the authority), introspection says inactive.
SERIAL=$(openssl x509 -in "$T/alice/cert.pem" -noout -serial | cut -d= -f2)
"$MUTUAL" revoke --state-dir "$S" "$SERIAL" --reason keyCompromise > /dev/null 2>&1
for _ in $(seq 50); do
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$ROOT" --cert "$T/alice/chain.pem" --key "$T/alice/key.pem" -H "Authorization: Bearer $TOKEN" "$PX")
  [ "$code" = 000 ] && break; sleep 0.2
done
PXADDR=${PX#https://}; PXADDR=${PXADDR%/pay}
printf 'GET /pay HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n' "$TOKEN" \
  | timeout 5 openssl s_client -connect "$PXADDR" -servername localhost -CAfile "$ROOT" -cert "$T/alice/cert.pem" \
      -cert_chain "$T/alice/chain.pem" -key "$T/alice/key.pem" -ign_eof > "$T/revoked.out" 2>&1
grep -qi "SSL alert number" "$T/revoked.out" && ! grep -q "x-token-subject" "$T/revoked.out" && [ "$code" = 000 ] \
  && grep "handshake refused" "$T/proxy.log" | grep -q "reason=revoked" \
  && ok "proxy: the revoked certificate's handshake is refused (TLS alert; logged with reason=revoked), token and all" \
  || { bad "revoked: curl $code"; grep -i "alert\|error" "$T/revoked.out" | head -3 | sed "s/^/     /"; }
"$MUTUAL" oauth introspect --authority "$API" --cert "$S/admin/chain.pem" --key "$S/admin/key.pem" --ca "$ROOT" "$TOKEN" > "$T/introspect.json" 2>&1
[ "$(jq -r '.active' "$T/introspect.json")" = false ] && ok "introspection: the revoked certificate's token is inactive" || bad "introspect revoked: $(cat "$T/introspect.json")"

# ---- 3. signing-key rotation under steady calls
"$PY" "$PEERS" steady "$PX" "$API" "$T/steady/chain.pem" "$T/steady/key.pem" "$ROOT" 14 "$T/steady.out" > "$T/steady.log" 2>&1 &
STEADY=$!; PIDS+=($STEADY)
sleep 3
"$MUTUAL" oauth keys rotate --state-dir "$S" --publish-ahead 3s --keep-previous 2m > "$T/rotate1.out" 2>&1 || bad "rotate: $(cat "$T/rotate1.out")"
sleep 5
# No notice at all: the new key signs at once; the proxy learns it from the first token that names it.
"$MUTUAL" oauth keys rotate --state-dir "$S" --publish-ahead 0s --keep-previous 2m > "$T/rotate2.out" 2>&1 || bad "rotate: $(cat "$T/rotate2.out")"
wait "$STEADY"
read -r made failures kids < "$T/steady.out"
[ "${failures:-1}" = 0 ] && [ "${made:-0}" -gt 100 ] && ok "rotation (published ahead, then without notice) under steady calls: $made requests, 0 failed" \
  || { bad "rotation under load: $made requests, $failures failed"; sed 's/^/     /' "$T/steady.out" | tail -n +2 | head -5; }
[ "${kids:-0}" = 3 ] && ok "the steady client's tokens were signed by all three keys in turn" || bad "kids used: $kids"
"$MUTUAL" oauth keys --state-dir "$S" --json > "$T/keys.json"
[ "$(jq -r '[.[].stage] | join(",")' "$T/keys.json")" = "previous,previous,active" ] && ok "mutual oauth keys: previous, previous, active" || bad "keys: $(cat "$T/keys.json")"
grep -q "access-token keys loaded" "$T/proxy.log" && ok "the proxy logged the key set it loaded" || bad "proxy log"

echo "OAuth: $pass passed, $fail failed"
[ "$fail" = 0 ]
