#!/usr/bin/env bash
# ACME (RFC 8555) against the clients users already run: certbot (PyPI) and lego (Debian), each against a real
# `mutual serve --acme` on 127.0.0.1 with the validator pointed at unprivileged ports chosen at run time.
# certbot: register, certonly --standalone for a DNS name and for an IP address, renew, revoke, a failed validation;
# lego: http-01 with an ECDSA account key. Every certificate lands in the inventory with its ACME account as owner.
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}" "${VENV:?}"
. "$(dirname "$0")/harness.sh"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
M() { "$MUTUAL" "$@"; }

M init --state-dir "$T/ca" --name "ACME Interop" > /dev/null
HP=$(free_port); TP=$(free_port); DNSPORT=$(free_port)
"$MUTUAL" serve --state-dir "$T/ca" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --acme test --acme-http-port "$HP" --acme-tls-port "$TP" \
  --acme-dns-resolver "127.0.0.1:$DNSPORT" > "$T/serve.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "ACME directory" "$T/serve.log" && break; sleep 0.1; done
DIR=$(grep -o 'https://[^ ]*/acme/test/directory' "$T/serve.log")
[ -n "$DIR" ] || { bad "mutual serve did not start: $(cat "$T/serve.log")"; echo "$pass passed, $fail failed"; exit 1; }
ROOT_PEM="$T/ca/ca/root.pem"
export REQUESTS_CA_BUNDLE="$ROOT_PEM"   # certbot trusts the authority's root for the ACME API
CB=("$VENV/bin/certbot" --non-interactive --config-dir "$T/cb/conf" --work-dir "$T/cb/work" --logs-dir "$T/cb/logs" --server "$DIR")
STANDALONE=(--standalone --http-01-address 127.0.0.1 --http-01-port "$HP")

owner_of() {  # identity → owner in the inventory (the newest valid certificate)
  M list --state-dir "$T/ca" --json 2>/dev/null | python3 -c "
import json, sys
rows = [r for r in json.load(sys.stdin) if r['identity'] == sys.argv[1]]
print(rows[-1]['owner'] if rows else '')" "$1"
}

start=$(date +%s.%N)
if timeout 120 "${CB[@]}" register --agree-tos -m ops@example.org > "$T/cb-register.log" 2>&1; then ok "certbot register (RS256 account key)"; else bad "certbot register: $(tail -5 "$T/cb-register.log")"; fi
if timeout 120 "${CB[@]}" certonly "${STANDALONE[@]}" -d localhost --cert-name dns > "$T/cb-dns.log" 2>&1; then
  took=$(python3 -c "print(round($(date +%s.%N) - $start, 2))")
  ok "certbot certonly --standalone for a DNS name (register → certificate in ${took}s)"
else bad "certbot certonly for localhost: $(tail -8 "$T/cb-dns.log")"; fi
check "the certbot certificate verifies against the root with openssl" openssl verify -CAfile "$ROOT_PEM" -untrusted "$T/cb/conf/live/dns/chain.pem" "$T/cb/conf/live/dns/cert.pem"
check "it is a server certificate for localhost" bash -c "openssl x509 -in '$T/cb/conf/live/dns/cert.pem' -noout -ext subjectAltName,extendedKeyUsage | grep -q 'DNS:localhost' && openssl x509 -in '$T/cb/conf/live/dns/cert.pem' -noout -ext extendedKeyUsage | grep -q 'Server Authentication'"
owner=$(owner_of localhost)
case "$owner" in acme:test/*) ok "inventory: owner of the localhost certificate is its ACME account ($owner)";; *) bad "inventory owner '$owner'";; esac

if timeout 120 "${CB[@]}" certonly "${STANDALONE[@]}" --ip-address 127.0.0.1 --cert-name ip > "$T/cb-ip.log" 2>&1; then ok "certbot certonly --standalone for an IP address"; else bad "certbot for 127.0.0.1: $(tail -8 "$T/cb-ip.log")"; fi
check "the IP certificate names IP Address:127.0.0.1" bash -c "openssl x509 -in '$T/cb/conf/live/ip/cert.pem' -noout -ext subjectAltName | grep -q 'IP Address:127.0.0.1'"

before=$(openssl x509 -in "$T/cb/conf/live/dns/cert.pem" -noout -serial)
if timeout 120 "${CB[@]}" renew --force-renewal --no-random-sleep-on-renew --cert-name dns "${STANDALONE[@]}" > "$T/cb-renew.log" 2>&1 \
   && [ "$(openssl x509 -in "$T/cb/conf/live/dns/cert.pem" -noout -serial)" != "$before" ]; then ok "certbot renew: a new certificate"; else bad "certbot renew: $(tail -8 "$T/cb-renew.log")"; fi

# ARI (RFC 9773): certbot asks renewal-info before renewing, and a fresh certificate is not due. Once the certificate
# is revoked with `mutual revoke`, certbot renews it (it sees the revocation through the authority's OCSP responder;
# its next ARI question waits for the Retry-After it was given).
current=$(openssl x509 -in "$T/cb/conf/live/dns/cert.pem" -noout -serial | cut -d= -f2 | tr A-F a-f)
timeout 120 "${CB[@]}" renew --no-random-sleep-on-renew --cert-name dns "${STANDALONE[@]}" > "$T/cb-ari1.log" 2>&1
after=$(openssl x509 -in "$T/cb/conf/live/dns/cert.pem" -noout -serial | cut -d= -f2 | tr A-F a-f)
if [ "$after" = "$current" ] && grep -qE '"GET /acme/test/renewal-info/[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+ HTTP/1.1" 200' "$T"/cb/logs/letsencrypt.log*; then
  ok "certbot renew: asked renewal-info (ARI), a fresh certificate is not due"
else bad "certbot renew of a fresh certificate: $(tail -5 "$T/cb-ari1.log")"; fi
M revoke --state-dir "$T/ca" --reason keyCompromise "$current" > /dev/null
timeout 120 "${CB[@]}" renew --no-random-sleep-on-renew --cert-name dns "${STANDALONE[@]}" > "$T/cb-ari2.log" 2>&1
after=$(openssl x509 -in "$T/cb/conf/live/dns/cert.pem" -noout -serial | cut -d= -f2 | tr A-F a-f)
[ "$after" != "$current" ] && ok "certbot renew after mutual revoke: renewed at once" || bad "certbot did not renew the revoked certificate: $(tail -5 "$T/cb-ari2.log")"

serial=$(openssl x509 -in "$T/cb/conf/live/ip/cert.pem" -noout -serial | cut -d= -f2 | tr A-F a-f)
if timeout 60 "${CB[@]}" revoke --cert-name ip --reason keycompromise --no-delete-after-revoke > "$T/cb-revoke.log" 2>&1; then ok "certbot revoke"; else bad "certbot revoke: $(tail -5 "$T/cb-revoke.log")"; fi
check "the revoked certificate is revoked (keyCompromise) in the inventory" bash -c "'$MUTUAL' show --state-dir '$T/ca' $serial --json | python3 -c 'import json,sys; r=json.load(sys.stdin); sys.exit(0 if r[\"status\"]==\"revoked\" and r.get(\"revocation_reason\")==\"keyCompromise\" else 1)'"

# A validation that cannot succeed: certbot listens on another port than the one the validator connects to.
WRONG=$(free_port)
if timeout 120 "${CB[@]}" certonly --standalone --http-01-address 127.0.0.1 --http-01-port "$WRONG" -d localhost --cert-name never > "$T/cb-fail.log" 2>&1; then
  bad "certbot succeeded although nothing answered the validator"
else
  if grep -q "Type:   connection" "$T/cb-fail.log" && grep -qi "connection refused" "$T/cb-fail.log"; then ok "a refused validation: certbot reports type connection (connection refused), the order does not hang"; else bad "failed validation reported as: $(grep -iE 'type|detail' "$T/cb-fail.log" | head -3)"; fi
fi

# lego: http-01 with an ECDSA (P-256) account key.
if LEGO_CA_CERTIFICATES="$ROOT_PEM" timeout 120 lego --server "$DIR" --email ops@example.org --accept-tos --key-type ec256 --path "$T/lego" \
     --http --http.port "127.0.0.1:$HP" --domains localhost --domains 127.0.0.1 run > "$T/lego.log" 2>&1; then
  ok "lego run (http-01, ECDSA account key) for a DNS name and an IP address"
else bad "lego: $(tail -8 "$T/lego.log")"; fi
if LEGO_CA_CERTIFICATES="$ROOT_PEM" timeout 120 lego --server "$DIR" --email ops@example.org --accept-tos --key-type ec384 --path "$T/lego-tls" \
     --tls --tls.port "127.0.0.1:$TP" --domains localhost run > "$T/lego-tls.log" 2>&1; then
  ok "lego run with tls-alpn-01 (ALPN acme-tls/1 on the validator's TLS port)"
else bad "lego tls-alpn-01: $(tail -8 "$T/lego-tls.log")"; fi
check "the lego certificate verifies with openssl" openssl verify -CAfile "$ROOT_PEM" -untrusted "$T/ca/ca/intermediate.pem" "$T/lego/certificates/localhost.crt"

# dns-01 against a real DNS server: certbot's manual auth hook (re)starts dnsmasq on 127.0.0.1 with the TXT records
# it was given, as a DNS provider's API would publish them; a wildcard name needs dns-01.
mkdir -p "$T/dns"
cat > "$T/dns/hook.sh" <<HOOK
#!/usr/bin/env bash
echo "\$CERTBOT_DOMAIN \${WRONG_TXT:-\$CERTBOT_VALIDATION}" >> "$T/dns/records"
[ -f "$T/dns/pid" ] && kill "\$(cat "$T/dns/pid")" 2>/dev/null && sleep 0.3
args=()
while read -r d v; do args+=("--txt-record=_acme-challenge.\$d,\$v"); done < "$T/dns/records"
exec dnsmasq --port=$DNSPORT --listen-address=127.0.0.1 --bind-interfaces --no-resolv --no-hosts -C /dev/null --user=root --pid-file="$T/dns/pid" "\${args[@]}"
HOOK
chmod +x "$T/dns/hook.sh"
stop_dns() { [ -f "$T/dns/pid" ] && kill "$(cat "$T/dns/pid")" 2>/dev/null; rm -f "$T/dns/pid" "$T/dns/records"; }
if timeout 120 "${CB[@]}" certonly --manual --preferred-challenges dns --manual-auth-hook "$T/dns/hook.sh" \
     -d dns01.example.org -d '*.dns01.example.org' --cert-name wild > "$T/cb-dns01.log" 2>&1; then
  ok "certbot dns-01 (manual hook publishing TXT records in dnsmasq) for a name and its wildcard"
else bad "certbot dns-01: $(tail -8 "$T/cb-dns01.log")"; fi
stop_dns
check "the wildcard certificate names *.dns01.example.org" bash -c "openssl x509 -in '$T/cb/conf/live/wild/cert.pem' -noout -ext subjectAltName | grep -q 'DNS:\*.dns01.example.org'"
if WRONG_TXT=not-the-digest timeout 120 "${CB[@]}" certonly --manual --preferred-challenges dns --manual-auth-hook "$T/dns/hook.sh" \
     -d wrong.example.org --cert-name wrong > "$T/cb-dns01-wrong.log" 2>&1; then
  bad "a wrong TXT record was accepted"
else
  grep -q "Type:   incorrectResponse" "$T/cb-dns01-wrong.log" && ok "a wrong TXT record: incorrectResponse, the order fails" || bad "wrong TXT reported as: $(grep -iE 'type|detail' "$T/cb-dns01-wrong.log" | head -3)"
fi
stop_dns

# External Account Binding: a second authority whose provisioner requires it; the key comes from `mutual acme eab`.
M init --state-dir "$T/eabca" --name "ACME EAB" > /dev/null
"$MUTUAL" serve --state-dir "$T/eabca" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --acme teams --acme-eab --acme-http-port "$HP" > "$T/serve-eab.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "ACME directory" "$T/serve-eab.log" && break; sleep 0.1; done
EDIR=$(grep -o 'https://[^ ]*/acme/teams/directory' "$T/serve-eab.log")
export REQUESTS_CA_BUNDLE="$T/eabca/ca/root.pem"
CBE=("$VENV/bin/certbot" --non-interactive --config-dir "$T/cbe/conf" --work-dir "$T/cbe/work" --logs-dir "$T/cbe/logs" --server "$EDIR")
if timeout 120 "${CBE[@]}" register --agree-tos -m ops@example.org > "$T/cbe-none.log" 2>&1; then bad "registration without EAB was accepted"
elif grep -q "externalAccountRequired\|External account binding\|eab" "$T/cbe-none.log"; then ok "certbot register without EAB: refused (externalAccountRequired)"
else bad "registration without EAB refused, but not for EAB: $(tail -3 "$T/cbe-none.log")"; fi
M acme eab create --state-dir "$T/eabca" --provisioner teams --owner team-payments --json > "$T/eab.json"
KID=$(python3 -c "import json; print(json.load(open('$T/eab.json'))['kid'])"); HMAC=$(python3 -c "import json; print(json.load(open('$T/eab.json'))['hmac_key'])")
if timeout 120 "${CBE[@]}" certonly "${STANDALONE[@]}" --agree-tos -m ops@example.org --eab-kid "$KID" --eab-hmac-key "$HMAC" -d localhost --cert-name eab > "$T/cbe.log" 2>&1; then
  ok "certbot with --eab-kid/--eab-hmac-key: account bound, certificate issued"
else bad "certbot with EAB: $(tail -8 "$T/cbe.log")"; fi
owner=$(M list --state-dir "$T/eabca" --json 2>/dev/null | python3 -c "import json,sys; print([r['owner'] for r in json.load(sys.stdin) if r['identity']=='localhost'][-1])" 2>/dev/null)
[ "$owner" = team-payments ] && ok "the EAB key's owner owns the certificate (team-payments)" || bad "owner '$owner'"
check "mutual acme eab list shows the key bound" bash -c "'$MUTUAL' acme eab list --state-dir '$T/eabca' --json | python3 -c 'import json,sys; k=json.load(sys.stdin)[0]; sys.exit(0 if k[\"account\"] else 1)'"
check "mutual acme accounts and orders list the account and its valid order" bash -c "'$MUTUAL' acme accounts --state-dir '$T/eabca' --json | grep -q team-payments && '$MUTUAL' acme orders --state-dir '$T/eabca' --json | python3 -c 'import json,sys; o=json.load(sys.stdin); sys.exit(0 if [x[\"status\"] for x in o] == [\"valid\"] else 1)'"

[ -n "${KEEP:-}" ] && cp -r "$T" /tmp/acme-keep
stop_dns
# Stop the authorities here and wait for them (bounded), so none outlives the script.
for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
for _ in $(seq 100); do alive=0; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done; [ "$alive" = 0 ] && break; sleep 0.1; done
for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
