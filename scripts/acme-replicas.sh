#!/usr/bin/env bash
# ACME across two `mutual serve` replicas on one PostgreSQL: 20 concurrent clients (10 certbot, 10 lego, each with its
# own account) split across the replicas, http-01 answered from one shared webroot; then the inventory is exact (20
# ACME certificates, 20 valid orders, audit chain intact), and a nonce issued by one replica is accepted once by the
# other (a JWS signed with python `cryptography`).
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}" "${VENV:?}" "${PG_DIR:?}"
. "$(dirname "$0")/harness.sh"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
PORT=$(cat "$PG_DIR/port")
psql "postgres://mutual@127.0.0.1:$PORT/mutual_test" -q -c "DROP DATABASE IF EXISTS acme_replicas WITH (FORCE)" -c "CREATE DATABASE acme_replicas" >/dev/null 2>&1
DB="postgres://mutual@127.0.0.1:$PORT/acme_replicas?tlsmode=disable"
S="$T/state"
"$MUTUAL" init --state-dir "$S" --database "$DB" --name "ACME Replicas" >/dev/null || { bad "init on PostgreSQL"; exit 1; }
HP=$(free_port)
mkdir -p "$T/webroot/.well-known/acme-challenge"
python3 -m http.server "$HP" --bind 127.0.0.1 --directory "$T/webroot" > "$T/webroot.log" 2>&1 & PIDS+=($!)
cat > "$T/authority.yaml" <<YAML
listen: 127.0.0.1:0
http-listen: 127.0.0.1:0
log-level: error
acme:
  - name: fleet
    challenges: [http-01]
    http-port: $HP
YAML
for r in a b; do
  "$MUTUAL" serve --state-dir "$S" --config "$T/authority.yaml" > "$T/$r.log" 2>&1 & PIDS+=($!)
done
for r in a b; do for _ in $(seq 100); do grep -q "ACME directory" "$T/$r.log" && break; sleep 0.1; done; done
A=$(grep -o 'https://[^ ]*/acme/fleet/directory' "$T/a.log"); B=$(grep -o 'https://[^ ]*/acme/fleet/directory' "$T/b.log")
[ -n "$A" ] && [ -n "$B" ] && ok "two replicas with --config on one PostgreSQL" || { bad "replicas did not start: $(cat "$T"/a.log "$T"/b.log)"; echo "$pass passed, $fail failed"; exit 1; }
ROOT_PEM="$S/ca/root.pem"

run_one() {  # index, directory
  local i=$1 dir=$2
  if [ $((i % 2)) -eq 0 ]; then
    local name=localhost; [ $((i % 4)) -eq 0 ] && name=127.0.0.1
    local ident=(-d "$name"); [ "$name" = 127.0.0.1 ] && ident=(--ip-address 127.0.0.1)
    REQUESTS_CA_BUNDLE="$ROOT_PEM" timeout 180 "$VENV/bin/certbot" --non-interactive --config-dir "$T/c$i/conf" --work-dir "$T/c$i/work" \
      --logs-dir "$T/c$i/logs" --server "$dir" certonly --agree-tos --register-unsafely-without-email --webroot -w "$T/webroot" \
      "${ident[@]}" --cert-name run$i > "$T/run$i.log" 2>&1
  else
    LEGO_CA_CERTIFICATES="$ROOT_PEM" timeout 180 lego --server "$dir" --email "run$i@example.org" --accept-tos --path "$T/l$i" \
      --http --http.webroot "$T/webroot" --domains localhost run > "$T/run$i.log" 2>&1
  fi
  echo $? > "$T/run$i.rc"
}
start=$(date +%s.%N)
for i in $(seq 1 20); do
  if [ $((i % 4)) -lt 2 ]; then run_one "$i" "$A" & else run_one "$i" "$B" & fi
  PIDS+=($!)
done
wait "${PIDS[@]:3}" 2>/dev/null
took=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
failed=0; for i in $(seq 1 20); do [ "$(cat "$T/run$i.rc" 2>/dev/null)" = 0 ] || { failed=$((failed + 1)); echo "     run $i: $(tail -3 "$T/run$i.log")"; }; done
[ "$failed" -eq 0 ] && ok "20 concurrent clients (10 certbot, 10 lego) split across the replicas all got certificates in ${took}s" || bad "$failed of 20 runs failed"
certs=$("$MUTUAL" list --state-dir "$S" --database "$DB" --json | python3 -c "import json,sys; print(sum(1 for r in json.load(sys.stdin) if r['owner'] and r['owner'].startswith('acme:fleet/')))")
[ "$certs" = 20 ] && ok "inventory: exactly 20 ACME certificates, each owned by its account" || bad "inventory holds $certs ACME certificates"
orders=$("$MUTUAL" acme orders --state-dir "$S" --database "$DB" --json | python3 -c "import json,sys; o=json.load(sys.stdin); print(sum(1 for x in o if x['status']=='valid'), len({x['account'] for x in o if x['status']=='valid'}))")
[ "$orders" = "20 20" ] && ok "20 valid orders from 20 accounts" || bad "valid orders / accounts: $orders"
check "the audit chain verifies" "$MUTUAL" audit verify --state-dir "$S" --database "$DB"

# A nonce from replica A, used on replica B: accepted once; the same request again on A is a replay.
cat > "$T/nonce.py" <<'PY'
import base64, json, ssl, sys, urllib.request
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
a, b, root = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=root); ctx.check_hostname = False
b64 = lambda d: base64.urlsafe_b64encode(d).rstrip(b"=").decode()
def nonce(directory):
    url = json.load(urllib.request.urlopen(directory, context=ctx))["newNonce"]
    return urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), context=ctx).headers["Replay-Nonce"]
key = ec.generate_private_key(ec.SECP256R1())
n = key.public_key().public_numbers()
jwk = {"crv": "P-256", "kty": "EC", "x": b64(n.x.to_bytes(32, "big")), "y": b64(n.y.to_bytes(32, "big"))}
def signed(url, n):
    protected = b64(json.dumps({"alg": "ES256", "jwk": jwk, "nonce": n, "url": url}).encode())
    payload = b64(json.dumps({"termsOfServiceAgreed": True}).encode())
    r, s = utils.decode_dss_signature(key.sign(f"{protected}.{payload}".encode(), ec.ECDSA(hashes.SHA256())))
    return json.dumps({"protected": protected, "payload": payload, "signature": b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))}).encode()
def post(url, body):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/jose+json"})
    try:
        with urllib.request.urlopen(req, context=ctx) as resp: return resp.status, ""
    except urllib.error.HTTPError as e: return e.code, json.load(e).get("type", "")
on_b = json.load(urllib.request.urlopen(b, context=ctx))["newAccount"]
on_a = json.load(urllib.request.urlopen(a, context=ctx))["newAccount"]
from_a = nonce(a)
first = post(on_b, signed(on_b, from_a))            # A's nonce, used on B
replay_b = post(on_b, signed(on_b, from_a))         # the same nonce again on B
replay_a = post(on_a, signed(on_a, from_a))         # and on A, where it was issued
print(first[0], replay_b, replay_a)
bad = "urn:ietf:params:acme:error:badNonce"
sys.exit(0 if first[0] == 201 and replay_b == (400, bad) and replay_a == (400, bad) else 1)
PY
if out=$("$VENV/bin/python3" "$T/nonce.py" "$A" "$B" "$ROOT_PEM" 2>&1); then ok "a nonce from replica A works on replica B, once: used again on B or on A it is badNonce ($out)"; else bad "cross-replica nonce: $out"; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
