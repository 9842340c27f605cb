#!/usr/bin/env bash
# OCSP responder throughput (issue #4): cached answers (request without nonce) and fresh signatures (with a nonce,
# which is never cached), over plain HTTP on 127.0.0.1. `mutual serve` is pinned to core 0 and wrk to core 1, as in
# ../shared/bench/peers.sh; server CPU per response comes from /proc/PID/stat. Bounded: DUR seconds per run.
# Usage: MUTUAL=.build/release/mutual DUR=10 CONNS=50 bash benchmarks/ocsp.sh
set -euo pipefail
MUTUAL=${MUTUAL:-$(cd "$(dirname "$0")/.." && pwd)/.build/release/mutual}
DUR=${DUR:-10}; CONNS=${CONNS:-50}; REPS=${REPS:-3}
command -v wrk >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
T=$(mktemp -d); PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
HZ=$(getconf CLK_TCK)
ticks() { awk '{sub(/.*\) /,""); print $12+$13}' /proc/$1/stat; }

"$MUTUAL" init --state-dir "$T/s" >/dev/null
taskset -c 0 "$MUTUAL" serve --state-dir "$T/s" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 > "$T/serve.log" 2>&1 &
PID=$!
for _ in $(seq 100); do grep -q "CRL and OCSP on" "$T/serve.log" && break; sleep 0.1; done
URL=$(grep -o 'http://127.0.0.1:[0-9]*' "$T/serve.log" | head -1)/ocsp
"$MUTUAL" issue --state-dir "$T/s" --profile client --cn bench --out-dir "$T/c" >/dev/null
openssl ocsp -issuer "$T/s/ca/intermediate.pem" -cert "$T/c/cert.pem" -no_nonce -reqout "$T/cached.der" >/dev/null 2>&1
openssl ocsp -issuer "$T/s/ca/intermediate.pem" -cert "$T/c/cert.pem" -reqout "$T/fresh.der" >/dev/null 2>&1
for mode in cached fresh; do
  cat > "$T/$mode.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/ocsp-request"
local f = io.open("$T/$mode.der", "rb"); wrk.body = f:read("*all"); f:close()
LUA
done
# Sanity: the responder answers "good" with a verified signature, with and without a nonce.
for nonce in -no_nonce ""; do
  openssl ocsp -url "$URL" $nonce -issuer "$T/s/ca/intermediate.pem" -cert "$T/c/cert.pem" -CAfile "$T/s/ca/root.pem" > "$T/check.txt" 2>&1 || true
  grep -q "Response verify OK" "$T/check.txt" && grep -q ": good" "$T/check.txt" || { echo "OCSP answer is not good: $(cat "$T/check.txt")"; exit 1; }
done
echo "mode reps: responses/s | server CPU µs/response"
for mode in cached fresh; do
  for rep in $(seq "$REPS"); do
    t0=$(ticks "$PID")
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DUR}s" -s "$T/$mode.lua" "$URL")
    t1=$(ticks "$PID")
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    total=$(echo "$out" | awk '/requests in/ {print $1}')
    errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ {print}')
    cpu=$(awk -v a="$t0" -v b="$t1" -v n="$total" -v hz="$HZ" 'BEGIN { printf "%.1f", (b - a) / hz * 1e6 / n }')
    echo "$mode rep$rep: $rps responses/s, $cpu µs CPU/response ${errors:+($errors)}"
  done
done
