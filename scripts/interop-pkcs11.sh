#!/usr/bin/env bash
# CA and agent keys that never leave a token, checked with the tools an operator has:
#  1. SoftHSM2: `mutual init --key-store pkcs11:…` generates the root and issuing keys in the token; pkcs11-tool shows
#     them sensitive and never extractable; no key file is written; wrong PIN, missing token, missing module and a
#     malformed URI each fail with their code;
#  2. `mutual serve` signs through the token: an agent enrolls over the API, openssl verifies the chain, the CRL and
#     an OCSP response (signed by the token) after a revocation; a restart with a wrong PIN fails with its code;
#  3. the token taken away while serving: /readyz turns red naming pkcs11-token-removed, issuance fails;
#  4. a software TPM (swtpm, through tpm2-abrmd and libtpm2_pkcs11): `mutual agent --key-store` enrolls with a key
#     generated in the TPM and renews over mTLS twice, the TPM signing the TLS handshake; key.uri, no key.pem.
# Prints "N passed, N failed".
set -uo pipefail
: "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
SOFTHSM=/usr/lib/softhsm/libsofthsm2.so
TPM2=$(ls /usr/lib/*/pkcs11/libtpm2_pkcs11.so 2>/dev/null | head -1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 150); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# ---- 1. SoftHSM2 token, init
export SOFTHSM2_CONF="$T/softhsm2.conf"
mkdir -p "$T/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$T" > "$SOFTHSM2_CONF"
softhsm2-util --init-token --free --label mutual --pin 1234 --so-pin 56789012 >/dev/null
echo 1234 > "$T/pin"; echo 9999 > "$T/wrong-pin"
URI="pkcs11:token=mutual;object=issuing?module-path=$SOFTHSM&pin-source=file:$T/pin"
S="$T/state"

refused() { # what code command...: the command fails and names the code
  local what=$1 code=$2; shift 2
  if "$@" > "$T/refused.out" 2>&1; then bad "$what: succeeded"; return; fi
  grep -q "\[$code\]" "$T/refused.out" && ok "$what: refused with [$code]" || { bad "$what: no [$code]"; sed 's/^/     /' "$T/refused.out" | head -5; }
}
refused "init with a module that does not exist" pkcs11-module-unloadable "$MUTUAL" init --state-dir "$T/s1" --key-store "pkcs11:token=mutual;object=k?module-path=/nonexistent/module.so&pin-source=file:$T/pin"
refused "init with a file that is not a PKCS#11 module" pkcs11-module-unloadable "$MUTUAL" init --state-dir "$T/s2" --key-store "pkcs11:token=mutual;object=k?module-path=$SOFTHSM2_CONF&pin-source=file:$T/pin"
refused "init naming a token that is not there" pkcs11-token-not-found "$MUTUAL" init --state-dir "$T/s3" --key-store "pkcs11:token=absent;object=k?module-path=$SOFTHSM&pin-source=file:$T/pin"
refused "init with the wrong PIN" pkcs11-pin-incorrect "$MUTUAL" init --state-dir "$T/s4" --key-store "pkcs11:token=mutual;object=k?module-path=$SOFTHSM&pin-source=file:$T/wrong-pin"
refused "init with a malformed URI" pkcs11-bad-uri "$MUTUAL" init --state-dir "$T/s5" --key-store "pkcs11:token=mutual;token=again?module-path=$SOFTHSM"
[ ! -e "$T/s4/config.json" ] && [ ! -e "$T/s3/ca" ] && ok "failed inits leave no CA behind" || bad "a failed init left files"

check "mutual init --key-store generates the CA keys in the token" "$MUTUAL" init --state-dir "$S" --name "Token CA" --key-store "$URI"
[ ! -e "$S/ca/root.key" ] && [ ! -e "$S/ca/intermediate.key" ] && ok "no CA key file was written" || bad "CA key files exist: $(ls "$S/ca")"
grep -q '"keyStore"' "$S/config.json" && ! grep -q "1234" "$S/config.json" && ok "config.json names the key store and holds no PIN" || bad "config.json: $(cat "$S/config.json")"
pkcs11-tool --module "$SOFTHSM" --token-label mutual --login --pin 1234 --list-objects --type privkey > "$T/objects.txt" 2>&1
for label in issuing issuing-root; do
  grep -A4 "label: *$label\$" "$T/objects.txt" | grep -q "sensitive.*never extractable" \
    && ok "pkcs11-tool: the $label key is sensitive and never extractable" || { bad "pkcs11-tool: $label"; cat "$T/objects.txt"; }
done
# The public keys in the token are the ones in the certificates.
pkcs11-tool --module "$SOFTHSM" --token-label mutual --read-object --type pubkey --label issuing -o "$T/issuing-pub.der" >/dev/null 2>&1
openssl x509 -in "$S/ca/intermediate.pem" -pubkey -noout | openssl pkey -pubin -outform DER -out "$T/cert-pub.der" 2>/dev/null
cmp -s "$T/issuing-pub.der" "$T/cert-pub.der" && ok "the issuing certificate certifies the token's key" || bad "the token's public key differs from the certificate's"

# ---- 2. serve through the token
"$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$T/serve.log" 2>&1 &
SERVE=$!; PIDS+=($SERVE)
wait_for "$T/serve.log" "CRL and OCSP on" && ok "mutual serve starts with its keys in the token" || { bad "serve did not start: $(tail -3 "$T/serve.log")"; echo "PKCS#11: $pass passed, $fail failed"; exit 1; }
API=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
HTTP=$(grep -o 'http://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
FP=$(openssl x509 -in "$S/ca/root.pem" -outform DER | sha256sum | cut -d' ' -f1)
[ "$(curl -s -o /dev/null -w '%{http_code}' --cacert "$S/ca/root.pem" "$API/readyz")" = 200 ] && ok "/readyz is 200 while the token signs" || bad "/readyz not 200"
token() { "$MUTUAL" token create --state-dir "$S" --scope 'spiffe://example.org/*' --max-validity 1h --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'; }
check "an agent enrolls over the API (certificate signed by the token)" "$MUTUAL" agent --authority "$API" --root-fingerprint "$FP" --token "$(token)" --identity spiffe://example.org/soft/a --out-dir "$T/a" --once
check "openssl verifies the chain to the root" openssl verify -CAfile "$S/ca/root.pem" -untrusted "$T/a/chain.pem" "$T/a/cert.pem"
SERIAL=$(openssl x509 -in "$T/a/cert.pem" -noout -serial | cut -d= -f2)
check "revoke it" "$MUTUAL" revoke --state-dir "$S" "$SERIAL" --reason keyCompromise
sleep 1
curl -sf "$HTTP/crl" -o "$T/crl.der" && openssl crl -inform DER -in "$T/crl.der" -CAfile "$S/ca/intermediate.pem" -noout > "$T/crl.txt" 2>&1 \
  && grep -q "verify OK" "$T/crl.txt" && ok "openssl verifies the CRL signed by the token" || bad "CRL: $(cat "$T/crl.txt" 2>/dev/null)"
openssl crl -inform DER -in "$T/crl.der" -noout -text | grep -qi "$SERIAL" && ok "the CRL lists the revoked serial" || bad "the CRL lacks $SERIAL"
openssl ocsp -issuer "$S/ca/intermediate.pem" -cert "$T/a/cert.pem" -url "$HTTP/ocsp" -CAfile "$S/ca/root.pem" > "$T/ocsp.txt" 2>&1
grep -q "Response verify OK" "$T/ocsp.txt" && grep -q "revoked" "$T/ocsp.txt" && ok "openssl verifies the OCSP response signed by the token: revoked" || bad "OCSP: $(cat "$T/ocsp.txt")"

# A second serve with a wrong PIN in the PIN file fails at start with its code (the first keeps serving).
cp "$T/pin" "$T/pin.good"; cp "$T/wrong-pin" "$T/pin"
refused "serve with the wrong PIN" pkcs11-pin-incorrect timeout 20 "$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0
cp "$T/pin.good" "$T/pin"

# ---- 3. the token goes away while serving
TOKDIR=$(grep -l "mutual" "$T"/tokens/*/token.object | head -1 | xargs dirname)
SPARE=$(token)
mv "$TOKDIR" "$TOKDIR.away"
sleep 1.2
curl -s --cacert "$S/ca/root.pem" -w '\n%{http_code}' "$API/readyz" > "$T/ready.txt"
[ "$(tail -1 "$T/ready.txt")" = 503 ] && grep -q '"key_error":"pkcs11-token-removed"' "$T/ready.txt" \
  && ok "/readyz is 503 with key_error pkcs11-token-removed while the token is gone" || bad "/readyz: $(cat "$T/ready.txt")"
if "$MUTUAL" agent --authority "$API" --root-fingerprint "$FP" --token "$SPARE" --identity spiffe://example.org/soft/b --out-dir "$T/b" --once > "$T/b.out" 2>&1; then
  bad "issuance succeeded without the token"
else
  grep -q "pkcs11-token-removed" "$T/b.out" && ok "issuance over the API is refused with pkcs11-token-removed while the token is gone" || bad "issuance refusal: $(tail -2 "$T/b.out")"
fi
mv "$TOKDIR.away" "$TOKDIR"
kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null

# ---- 4. an agent with its key in a software TPM
if [ -z "$TPM2" ] || ! command -v swtpm >/dev/null || ! command -v tpm2-abrmd >/dev/null; then
  bad "swtpm, tpm2-abrmd or libtpm2_pkcs11 missing"
else
  "$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$T/serve2.log" 2>&1 &
  PIDS+=($!)
  wait_for "$T/serve2.log" "CRL and OCSP on" || bad "serve did not restart: $(tail -3 "$T/serve2.log")"
  API=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve2.log" | head -1)
  mkdir -p "$T/tpm" "$T/tpmstore"
  P=$(free_port)
  swtpm socket --tpmstate dir="$T/tpm" --tpm2 --server type=tcp,port=$P,bindaddr=127.0.0.1 --ctrl type=tcp,port=$((P + 1)),bindaddr=127.0.0.1 --flags not-need-init,startup-clear > "$T/swtpm.log" 2>&1 &
  PIDS+=($!)
  dbus-daemon --session --nofork --print-address=3 --address="unix:path=$T/bus" 3>"$T/bus.addr" > /dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do [ -s "$T/bus.addr" ] && break; sleep 0.1; done
  export DBUS_SESSION_BUS_ADDRESS=$(head -1 "$T/bus.addr")
  sleep 0.3
  tpm2-abrmd --session --allow-root --tcti="swtpm:host=127.0.0.1,port=$P" > "$T/abrmd.log" 2>&1 &
  PIDS+=($!)
  export TPM2TOOLS_TCTI="tabrmd:bus_type=session" TPM2_PKCS11_TCTI="tabrmd:bus_type=session" TPM2_PKCS11_STORE="$T/tpmstore"
  for _ in $(seq 50); do tpm2_getrandom 4 >/dev/null 2>&1 && break; sleep 0.1; done
  if tpm2_ptool init --path "$T/tpmstore" > "$T/ptool.log" 2>&1 && tpm2_ptool addtoken --pid=1 --label=agent --sopin=56789012 --userpin=4321 --path "$T/tpmstore" >> "$T/ptool.log" 2>&1; then
    ok "a TPM token (swtpm + libtpm2_pkcs11) is set up"
  else
    bad "tpm2_ptool: $(tail -3 "$T/ptool.log")"
  fi
  echo 4321 > "$T/tpm-pin"
  KS="pkcs11:token=agent;object=workload?module-path=$TPM2&pin-source=file:$T/tpm-pin"
  agent() { "$MUTUAL" agent --authority "$API" --root-fingerprint "$FP" --identity spiffe://example.org/tpm/workload --out-dir "$T/tpm-out" --validity 30s --renew-at 0.1 --key-store "$KS" --once "$@"; }
  check "the agent enrolls with a key generated in the TPM" agent --token "$(token)"
  [ -f "$T/tpm-out/key.uri" ] && [ ! -e "$T/tpm-out/key.pem" ] && ok "out-dir has key.uri (the TPM key) and no key.pem" || bad "out-dir: $(ls "$T/tpm-out")"
  grep -q "^pkcs11:token=agent;object=workload;id=" "$T/tpm-out/key.uri" && ok "key.uri names the key by token, label and id" || bad "key.uri: $(cat "$T/tpm-out/key.uri")"
  for n in 1 2; do
    # Due a tenth into the certificate's life (3 s), measured from when the agent got it: ask until it is due (a
    # loaded machine may wake a little early), at most 10 times.
    sleep 3
    for _ in $(seq 10); do
      agent > "$T/renew$n.out" 2>&1
      grep -q "^renewed: serial" "$T/renew$n.out" && break
      grep -q "not due" "$T/renew$n.out" || break
      sleep 1
    done
    grep -q "^renewed: serial" "$T/renew$n.out" && ok "renewal $n over mTLS, the TPM signing the handshake" || bad "renewal $n: $(tail -2 "$T/renew$n.out")"
  done
  "$MUTUAL" list --state-dir "$S" --json | python3 -c '
import json, sys
rows = [c for c in json.load(sys.stdin) if c["identity"] == "spiffe://example.org/tpm/workload"]
renewed = [c for c in rows if (c.get("requester") or "").startswith("cert:")]
sys.exit(0 if len(rows) == 3 and len(renewed) == 2 else 1)' && ok "the inventory shows the enrollment and two renewals by certificate" || bad "inventory rows for the TPM identity"
  pkcs11-tool --module "$TPM2" --token-label agent --login --pin 4321 --list-objects --type privkey > "$T/tpm-objects.txt" 2>&1
  [ "$(grep -c 'label: *workload$' "$T/tpm-objects.txt")" = 2 ] && ok "the TPM holds the current and the previous key only (superseded ones destroyed)" || bad "TPM keys: $(grep -c 'label: *workload$' "$T/tpm-objects.txt")"
  grep -A4 'label: *workload$' "$T/tpm-objects.txt" | grep -q "never extractable" && ok "pkcs11-tool: the TPM key is never extractable" || bad "TPM key attributes: $(cat "$T/tpm-objects.txt")"
  openssl x509 -in "$T/tpm-out/cert.pem" -pubkey -noout > "$T/leaf-pub.pem"
  check "openssl verifies the renewed chain" openssl verify -CAfile "$S/ca/root.pem" -untrusted "$T/tpm-out/chain.pem" "$T/tpm-out/cert.pem"
fi

echo "PKCS#11: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
