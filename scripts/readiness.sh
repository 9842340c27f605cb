#!/usr/bin/env bash
# Readiness that tells the truth, on a real full disk: the authority's state directory on a 8 MiB tmpfs (inside a
# private mount namespace, so nothing is mounted on the host), filled until writes fail.
#  - /readyz is 200 while writes work; 503 `not-ready` while the disk is full (issuance gets 503 and nothing is issued;
#    /healthz, which only reads, stays 200 — that is why a load balancer must use /readyz); 200 again once space returns;
#  - no misleading "rollback failed" line in the log.
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}"
if [ -z "${MUTUAL_IN_MOUNT_NS:-}" ]; then
  unshare -m true 2>/dev/null || { echo "FAIL readiness: cannot create a mount namespace (unshare -m needs root)"; echo "readiness: 0 passed, 1 failed"; exit 1; }
  exec unshare -m env MUTUAL_IN_MOUNT_NS=1 bash "$0" "$@"
fi
. "$(dirname "$0")/harness.sh"
# Stop the server before unmounting, and unmount before the harness removes the directory.
trap 'for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; umount "$T/small" 2>/dev/null; cleanup' EXIT
mkdir -p "$T/small"
mount -t tmpfs -o size=8m tmpfs "$T/small" || { bad "cannot mount a tmpfs"; echo "readiness: $pass passed, $fail failed"; exit 1; }
S="$T/small/state"
"$MUTUAL" init --state-dir "$S" > /dev/null
TOKEN=$("$MUTUAL" token create --state-dir "$S" --scope 'spiffe://example.org/*' --uses 10)
"$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen off > "$T/serve.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$T/serve.log" && break; sleep 0.1; done
A=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)
[ -n "$A" ] && ok "authority up with its state on an 8 MiB filesystem" || { bad "serve did not start: $(cat "$T/serve.log")"; echo "readiness: $pass passed, $fail failed"; exit 1; }
get() { curl -s -o "$T/body" -w '%{http_code}' --cacert "$S/ca/root.pem" "$A$1"; }
sign() {
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$T/k.pem" -subj / \
    -addext "subjectAltName=URI:spiffe://example.org/w/$1" -out "$T/r.csr" 2>/dev/null
  python3 -c "import json,sys; print(json.dumps({'csr': open(sys.argv[1]).read()}))" "$T/r.csr" > "$T/req.json"
  curl -s -o "$T/body" -w '%{http_code}' --cacert "$S/ca/root.pem" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    --data-binary @"$T/req.json" "$A/v1/sign"
}
count() { "$MUTUAL" list --state-dir "$S" --json 2>/dev/null | python3 -c "import json,sys; print(len(json.load(sys.stdin)))" 2>/dev/null || echo "?"; }

[ "$(get /readyz)" = 200 ] && ok "/readyz 200 while the inventory accepts writes" || bad "/readyz before: $(cat "$T/body")"
[ "$(sign a)" = 200 ] && ok "issuance works" || bad "sign before: $(cat "$T/body")"
before=$(count)

dd if=/dev/zero of="$T/small/fill" bs=64k 2>/dev/null; sync
sleep 1.1   # past the readiness cache
code=$(get /readyz)
[ "$code" = 503 ] && grep -q '"urn:mutual:problem:not-ready"' "$T/body" && ok "disk full: /readyz 503 not-ready ($(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['detail'][:90])" "$T/body"))" || bad "/readyz on a full disk: $code $(cat "$T/body")"
code=$(sign b)
[ "$code" = 503 ] && ok "disk full: issuance refused with 503 ($(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['type'])" "$T/body"))" || bad "sign on a full disk: $code $(cat "$T/body")"
[ "$(get /healthz)" = 200 ] && ok "/healthz (liveness: reads) stays 200 — load balancers must use /readyz" || bad "/healthz on a full disk: $(cat "$T/body")"

rm -f "$T/small/fill"
sleep 1.1
[ "$(get /readyz)" = 200 ] && ok "space back: /readyz 200 again" || bad "/readyz after: $(cat "$T/body")"
[ "$(sign c)" = 200 ] && ok "space back: issuance works again" || bad "sign after: $(cat "$T/body")"
after=$(count)
[ "$after" = $((before + 1)) ] && ok "the inventory holds exactly the certificates that were returned ($before -> $after)" || bad "inventory count $before -> $after"
"$MUTUAL" audit verify --state-dir "$S" > "$T/out" 2>&1 && ok "the audit trail is intact after the failed writes" || bad "audit: $(cat "$T/out")"
! grep -qi "rollback failed\|cannot rollback" "$T/serve.log" && ok "no misleading rollback lines in the log" || bad "log: $(grep -i rollback "$T/serve.log" | head -2)"
echo "readiness: $pass passed, $fail failed"
[ "$fail" = 0 ]
