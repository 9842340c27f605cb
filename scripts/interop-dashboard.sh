#!/usr/bin/env bash
# The dashboard in a real browser: headless Chromium (Debian) driven by selenium (PyPI) against a real `mutual serve`
# on 127.0.0.1. Signs in with a login link, reads the overview, searches, opens a certificate, revokes it with
# confirmation, finds it under revocations and in the audit trail; a read-only session cannot revoke; a cross-site
# form is refused; used and expired links are refused; markup in certificates renders as text. Screenshots of each
# page go to $SHOTS (default: a temporary directory) and are checked for a real render.
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}" "${VENV:?}"
. "$(dirname "$0")/harness.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHOTS=${SHOTS:-$T/shots}
mkdir -p "$SHOTS"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
M() { "$MUTUAL" "$@"; }
S="$T/ca"

# An inventory with history: owners, profiles, lifetimes, renewals, lapses, revocations (issued through the authority).
M bench dashboard --count "${DASHBOARD_CERTIFICATES:-400}" --state-dir "$S" --fill-only > "$T/fill.log" 2>&1 || { bad "bench fill: $(cat "$T/fill.log")"; }
M issue --state-dir "$S" --profile client --cn '<script>alert(1)</script>' --owner 'team"><img src=x onerror=alert(2)>' --out-dir "$T/markup" > /dev/null 2>&1
M issue --state-dir "$S" --profile workload --uri spiffe://example.org/ns/payments/api --owner payments --out-dir "$T/target" > /dev/null 2>&1
M issue --state-dir "$S" --profile workload --uri spiffe://example.org/ns/payments/worker --owner payments --out-dir "$T/victim" > /dev/null 2>&1
serial_of() { openssl x509 -in "$1" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f' | sed 's/^0*//'; }
TARGET_SERIAL=$(M list --state-dir "$S" --identity spiffe://example.org/ns/payments/api --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["serial"])')
VICTIM_SERIAL=$(M list --state-dir "$S" --identity spiffe://example.org/ns/payments/worker --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["serial"])')
MARKUP_SERIAL=$(M list --state-dir "$S" --json | python3 -c 'import json,sys; print([r for r in json.load(sys.stdin) if "script" in r["subject"]][0]["serial"])')
M token create --state-dir "$S" --scope '*.example.org' --profile server --owner web --json > "$T/token.json"
TOKEN_SECRET=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$T/token.json")
TOKEN_ID=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$T/token.json")

"$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$T/serve.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "dashboard: https" "$T/serve.log" && break; sleep 0.1; done
BASE=$(grep -o 'listening on https://[^ ]*' "$T/serve.log" | cut -d' ' -f3)
[ -n "$BASE" ] || { bad "mutual serve did not start: $(cat "$T/serve.log")"; echo "dashboard interop: $pass passed, $fail failed"; exit 1; }

# Links as an operator makes them; the expired one is made by a CLI whose wall clock is an hour behind.
ADMIN_LINK=$(M dashboard login --state-dir "$S" --as alice 2>/dev/null)
READONLY_LINK=$(M dashboard login --state-dir "$S" --as auditor --read-only 2>/dev/null)
cc -shared -fPIC -O2 -o "$T/shift.so" "$ROOT/scripts/clockshift/shift.c" -ldl
EXPIRED_LINK=$(LD_PRELOAD="$T/shift.so" MUTUAL_TEST_CLOCK_SHIFT=-3600 "$MUTUAL" dashboard login --state-dir "$S" --ttl 15m 2>/dev/null)
case "$ADMIN_LINK" in "$BASE/dashboard/login?code=mdl_"*) ok "mutual dashboard login prints a link to the running dashboard";; *) bad "login link: $ADMIN_LINK (base $BASE)";; esac

# An attacker's page on another origin: a form that posts a revocation to the dashboard as soon as it loads.
ATTACK_PORT=$(free_port)
mkdir -p "$T/attacker"
cat > "$T/attacker/attack.html" <<HTML
<!doctype html><title>totally harmless</title>
<form id="f" method="post" action="$BASE/dashboard/certificates/$VICTIM_SERIAL/revoke"><input name="reason" value="keyCompromise"></form>
<script>document.getElementById("f").submit()</script>
HTML
python3 -m http.server "$ATTACK_PORT" --bind 127.0.0.1 --directory "$T/attacker" > "$T/attacker.log" 2>&1 & PIDS+=($!)

BASE="$BASE" ADMIN_LINK="$ADMIN_LINK" READONLY_LINK="$READONLY_LINK" EXPIRED_LINK="$EXPIRED_LINK" \
ATTACK_URL="http://localhost:$ATTACK_PORT/attack.html" TARGET_SERIAL="$TARGET_SERIAL" VICTIM_SERIAL="$VICTIM_SERIAL" \
TARGET_IDENTITY=spiffe://example.org/ns/payments/api MARKUP_SERIAL="$MARKUP_SERIAL" TOKEN_SECRET="$TOKEN_SECRET" TOKEN_ID="$TOKEN_ID" SHOTS="$SHOTS" \
MUTUAL="$MUTUAL" STATE="$S" timeout 300 "$VENV/bin/python3" "$ROOT/scripts/dashboard_browser.py" > "$T/browser.log" 2>&1
browser_status=$?
cp "$T/browser.log" "${BROWSER_LOG:-/dev/null}" 2>/dev/null; grep -E '^(ok|FAIL) '
pass=$((pass + $(grep -c '^ok ' "$T/browser.log")))
fail=$((fail + $(grep -c '^FAIL ' "$T/browser.log")))
if [ "$browser_status" -ne 0 ] && ! grep -q '^dashboard browser:' "$T/browser.log"; then bad "the browser script did not finish: $(tail -20 "$T/browser.log")"; fi

# A client holding the admin certificate (curl here, a browser with admin/ imported likewise) needs no login; another
# certificate of the same CA does.
check "the admin client certificate opens the dashboard over real TLS without a login" bash -c "curl -sk --cert '$S/admin/chain.pem' --key '$S/admin/key.pem' '$BASE/dashboard/' | grep -q 'data-page=\"overview\"'"
check "a workload certificate is not enough (401 login-required)" bash -c "curl -sk -D - -o /dev/null --cert '$T/victim/chain.pem' --key '$T/victim/key.pem' '$BASE/dashboard/' | tr -d '\r' | grep -qi '^mutual-problem: urn:mutual:problem:login-required'"

# What the operator sees from the outside.
check "the dashboard's refusals are counted by code in /metrics" bash -c "curl -sk '$BASE/metrics' | grep -q 'mutual_dashboard_requests_total{page=\"login\",outcome=\"refused\",code=\"login-used\"}'"
check "every login and the revocation are in the audit trail (mutual audit verify intact)" bash -c "'$MUTUAL' audit list --state-dir '$S' --json | grep -q dashboard-login && '$MUTUAL' audit verify --state-dir '$S' > /dev/null"
M init --state-dir "$T/off" --name Off > /dev/null 2>&1
"$MUTUAL" serve --state-dir "$T/off" --listen 127.0.0.1:0 --http-listen off --no-dashboard > "$T/off.log" 2>&1 & PIDS+=($!)
for _ in $(seq 100); do grep -q "listening on" "$T/off.log" && break; sleep 0.1; done
OFF=$(grep -o 'listening on https://[^ ]*' "$T/off.log" | cut -d' ' -f3)
check "serve --no-dashboard serves no dashboard (404)" bash -c "[ \"\$(curl -sk -o /dev/null -w '%{http_code}' '$OFF/dashboard/')\" = 404 ] && ! grep -q 'dashboard:' '$T/off.log'"
echo "dashboard interop: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
