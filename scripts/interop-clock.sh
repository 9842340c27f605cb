#!/usr/bin/env bash
# Agents whose wall clocks lie, against a real authority whose clock is right (ports chosen at run time, 127.0.0.1).
# Each agent runs under an LD_PRELOAD shim (scripts/clockshift/shift.c) that moves only its wall clock:
#  - 2 h behind and 2 h ahead, with 12-second certificates, as daemons for CLOCK_SECONDS (default 40) — several
#    renewals each — while the authority is restarted in the middle;
#  - 2 h behind and 2 h ahead with 10-minute and 24-hour certificates: enrollment, then a second run that is "not
#    due" (never "expired", never stopped).
# Every agent ends with a certificate that is valid by the real clock, and a status that names the skew.
# Prints "N passed, N failed"; stops every process it started.
set -uo pipefail
: "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_TOTAL=${CLOCK_SECONDS:-40}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
cc -shared -fPIC -O2 -o "$T/shift.so" "$ROOT/scripts/clockshift/shift.c" -ldl || { bad "cannot build the clock shim (cc)"; echo "clock interop: $pass passed, $fail failed"; exit 1; }
shifted() { local s=$1; shift; LD_PRELOAD="$T/shift.so" MUTUAL_TEST_CLOCK_SHIFT="$s" "$@"; }
[ $(( $(shifted -7200 date +%s) - $(date +%s) )) -le -7199 ] && ok "the shim moves a process's wall clock (date says $(shifted -7200 date -u +%H:%M) at $(date -u +%H:%M))" || bad "the shim does not work"

S="$T/ca"; P=$(free_port)
"$MUTUAL" init --state-dir "$S" --json > "$T/init.json"
FP=$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['root_fingerprint'])" "$T/init.json")
serve() {
  "$MUTUAL" serve --state-dir "$S" --listen "127.0.0.1:$P" --http-listen off --renew-expired-grace 1h >> "$T/serve.log" 2>&1 & SERVE=$!; PIDS+=($SERVE)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$P) 2>/dev/null && return 0; sleep 0.1; done; return 1
}
serve && ok "authority up on 127.0.0.1:$P with the right clock" || { bad "serve did not start"; echo "clock interop: $pass passed, $fail failed"; exit 1; }
A="https://127.0.0.1:$P"
token() { "$MUTUAL" token create --state-dir "$S" --scope 'spiffe://example.org/ns/clock/*' --max-validity "$1" --uses 1 --json | python3 -c "import json,sys;print(json.load(sys.stdin)['token'])"; }
agent() {  # shift name validity [extra…]
  local s=$1 name=$2 validity=$3; shift 3
  shifted "$s" "$MUTUAL" agent --authority "$A" --root-fingerprint "$FP" --identity "spiffe://example.org/ns/clock/sa/$name" \
    --out-dir "$T/$name" --validity "$validity" "$@"
}
valid_now() { openssl x509 -in "$T/$1/cert.pem" -noout -checkend 0 >/dev/null 2>&1; }
skew() { "$MUTUAL" agent status --out-dir "$T/$1" --json | python3 -c "import json,sys; print(int(json.load(sys.stdin)['status'].get('clock_skew_seconds') or 0))"; }

# ---- long and short certificates: enrollment, then "not due" — never expired, never stopped
for spec in "-7200 behind-10m 10m" "7200 ahead-10m 10m" "-7200 behind-24h 24h" "7200 ahead-24h 24h"; do
  set -- $spec
  agent "$1" "$2" "$3" --token "$(token "$3")" --once > "$T/out" 2>&1
  grep -q "^enrolled" "$T/out" && ok "$2: enrolled with the host clock $(( $1 / 3600 )) h off" || bad "$2 enroll: $(tail -3 "$T/out")"
  agent "$1" "$2" "$3" --once > "$T/out" 2>&1
  grep -q "^not due" "$T/out" && ok "$2: a second run is 'not due' (the certificate is judged on the authority's clock)" || bad "$2 second run: $(tail -3 "$T/out")"
  valid_now "$2" && [ $(( $(skew "$2") + $1 )) -ge -5 ] && [ $(( $(skew "$2") + $1 )) -le 5 ] \
    && ok "$2: valid by the real clock; status names the skew ($(skew "$2") s)" || bad "$2: valid? skew $(skew "$2")"
done

# ---- a clock so far off (3 days behind) that nothing verifies: the failure is named for what it is
agent -259200 days-behind 1h --token "$(token 1h)" --once > "$T/out" 2>&1; rc=$?
code=$("$MUTUAL" agent status --out-dir "$T/days-behind" --json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['status'].get('last_error_code'))" 2>/dev/null)
[ $rc = 1 ] && [ "$code" = clock-skew ] && ok "3 days behind: enrollment fails with code clock-skew ($(grep -o "this host's clock is about [^—]*" "$T/out" | head -1))" || bad "days behind: rc=$rc code=$code $(tail -2 "$T/out")"
"$MUTUAL" agent status --out-dir "$T/days-behind" > "$T/out" 2>&1
grep -q "^what to do: *fix this host's clock" "$T/out" && ok "agent status after the failed enrollment says what failed and what to do" || bad "status: $(cat "$T/out")"

# ---- 12-second certificates, as daemons, across an authority restart
for spec in "-7200 behind-12s" "7200 ahead-12s"; do
  set -- $spec
  agent "$1" "$2" 12s --token "$(token 12s)" > "$T/$2.log" 2>&1 & PIDS+=($!)
done
sleep $(( SECONDS_TOTAL / 2 ))
kill "$SERVE"; wait "$SERVE" 2>/dev/null
sleep 2
serve && ok "authority restarted in the middle" || bad "restart failed: $(tail -3 "$T/serve.log")"
sleep $(( SECONDS_TOTAL / 2 ))
for name in behind-12s ahead-12s; do
  renewals=$(grep -c "renewal: certificate delivered" "$T/$name.log")
  state=$("$MUTUAL" agent status --out-dir "$T/$name" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['status']['state'])")
  valid_now "$name" && [ "$renewals" -ge 3 ] && [ "$state" != stopped ] \
    && ok "$name: $renewals renewals of 12-second certificates in ${SECONDS_TOTAL}s across the restart; valid by the real clock; state $state; skew $(skew "$name") s" \
    || bad "$name: renewals=$renewals state=$state valid=$(valid_now "$name" && echo yes || echo no): $(grep -E 'error|warning' "$T/$name.log" | tail -3)"
done
grep -q "code=clock-skew" "$T/behind-12s.log" && ok "the agent's log warns about the clock with code=clock-skew" || bad "no clock-skew warning in the log"
echo "clock interop: $pass passed, $fail failed"
[ "$fail" = 0 ]
