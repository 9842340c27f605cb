#!/usr/bin/env bash
# ACME benchmarks against one `mutual serve` (release build, SQLite): the time of one full certbot issuance (register
# -> certificate, median of RUNS), and orders per second completed end to end by THREADS concurrent python `acme`
# clients for DURATION seconds, with the authority's CPU per order from /proc.
# Usage: MUTUAL=.build/release/mutual VENV=.venv bash benchmarks/acme.sh
set -uo pipefail
: "${MUTUAL:?}" "${VENV:?}"
RUNS=${RUNS:-3}; THREADS=${THREADS:-16}; DURATION=${DURATION:-20}
T=$(mktemp -d); PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$T"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
"$MUTUAL" init --state-dir "$T/ca" --name "ACME Bench" > /dev/null
HP=$(free_port)
cat > "$T/authority.yaml" <<YAML
listen: 127.0.0.1:0
http-listen: 127.0.0.1:0
log-level: error
acme:
  - name: bench
    challenges: [http-01]
    http-port: $HP
    rate-limits: {orders-per-account-per-hour: none, certificates-per-identifier-per-hour: none}
YAML
"$MUTUAL" serve --state-dir "$T/ca" --config "$T/authority.yaml" > "$T/serve.log" 2>&1 & SERVE=$!; PIDS+=($SERVE)
for _ in $(seq 100); do grep -q "ACME directory" "$T/serve.log" && break; sleep 0.1; done
DIR=$(grep -o 'https://[^ ]*/acme/bench/directory' "$T/serve.log")
times=()
for i in $(seq "$RUNS"); do
  start=$(date +%s.%N)
  REQUESTS_CA_BUNDLE="$T/ca/ca/root.pem" "$VENV/bin/certbot" --non-interactive --config-dir "$T/cb$i/conf" --work-dir "$T/cb$i/work" \
    --logs-dir "$T/cb$i/logs" --server "$DIR" certonly --agree-tos --register-unsafely-without-email --standalone \
    --http-01-address 127.0.0.1 --http-01-port "$HP" -d localhost > "$T/cb$i.log" 2>&1 || { echo "certbot run $i failed"; tail -5 "$T/cb$i.log"; }
  times+=("$(python3 -c "print(round($(date +%s.%N) - $start, 2))")")
done
echo "certbot register -> certificate (s): ${times[*]} (median $(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p"))"
ticks() { awk '{print $14 + $15}' "/proc/$SERVE/stat"; }
before=$(ticks)
result=$("$VENV/bin/python3" "$(dirname "$0")/acme_orders.py" "$DIR" "$T/ca/ca/root.pem" "$HP" "$THREADS" "$DURATION" 2> "$T/bench.err")
after=$(ticks)
hz=$(getconf CLK_TCK)
echo "$result"
python3 -c "
import json; r = json.loads('$result'); cpu = ($after - $before) / $hz
print(f'authority CPU: {cpu:.1f} s for {r[\"orders\"]} orders = {1000 * cpu / max(1, r[\"orders\"]):.1f} ms per order')"
grep -c failure "$T/bench.err" | sed 's/^/client failures logged: /'
