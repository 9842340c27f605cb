#!/usr/bin/env bash
# The proxy's CPU per request (HTTP/1.1 keep-alive with wrk, HTTP/2 streams with h2load) and RSS per idle mTLS
# connection (fresh process, or after a first 1,000 connections), issue #17. Uses what ../shared/bench/peers.sh set up
# in $BASE (certificates, the client-certificate shim for wrk/h2load, the nginx backend's config, its Python venv):
# run `STAGES="install certs" bash ../shared/bench/peers.sh` once first. The proxy and the backend are pinned to core
# 0, the load generator to core 1; CPU comes from /proc/PID/stat. PERF=1 also records a perf profile to $OUT/perf.data.
# Usage: MUTUAL=.build/release/mutual bash benchmarks/proxy-cpu.sh h1|h2|idle|idle-warm|floor-idle|floor-idle-warm
set -euo pipefail
MODE=${1:-h1}
MUTUAL=${MUTUAL:-$(cd "$(dirname "$0")/.." && pwd)/.build/release/mutual}
BASE=${BASE:-/tmp/mutual-peer-bench}; C=$BASE/certs; R=$BASE/run; L=$BASE/lib
OUT=${OUT:-$(mktemp -d)}; PORT=${PORT:-9453}; DUR=${DUR:-8}; STREAMS=${STREAMS:-10}
[ -s "$L/mtls_preload.so" ] && [ -s "$R/backend/nginx.conf" ] || { echo "run: STAGES=\"install certs\" bash ../shared/bench/peers.sh" >&2; exit 2; }
SHIM=(env LD_PRELOAD=$L/mtls_preload.so MTLS_CERT=$C/client.pem MTLS_KEY=$C/client.key taskset -c 1)
P=""; B=""
cleanup() { [ -n "$P" ] && kill "$P" 2>/dev/null; [ -n "$B" ] && kill "$B" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
cpu_ms() { awk '{sub(/.*\) /,""); print ($12+$13)*10}' /proc/$1/stat; }

case $MODE in floor-*) SERVER=(bench tls-floor --listen 127.0.0.1:$PORT --cert $C/server.pem --key $C/server.key --client-ca $C/ca-bundle.pem) ;;
  *) SERVER=(proxy --listen 127.0.0.1:$PORT --upstream http://127.0.0.1:8080 --cert $C/server.pem --key $C/server.key
       --client-ca $C/ca-bundle.pem --allow spiffe://example.org/ns/default/sa/client --access-log off) ;;
esac
if [ "$MODE" = h1 ] || [ "$MODE" = h2 ]; then
  taskset -c 0 nginx -p $R/backend -c $R/backend/nginx.conf -e $R/backend/logs/error.log
  sleep 0.5; B=$(cat $R/backend/nginx.pid)
fi
taskset -c 0 "$MUTUAL" "${SERVER[@]}" 2> "$OUT/server.err" & P=$!
sleep 1.5

load() {  # warm-up, then the measured run
  if [ "$MODE" = h1 ]; then "${SHIM[@]}" wrk -t1 -c100 -d${1}s https://127.0.0.1:$PORT/
  else "${SHIM[@]}" h2load -n $(( $1 * 7500 )) -c 100 -m $STREAMS https://127.0.0.1:$PORT/; fi
}
case $MODE in
  h1|h2)
    load 2 > /dev/null
    t0=$(cpu_ms $P)
    PP=""
    if [ -n "${PERF:-}" ]; then perf record -F 2000 -g -p $P -o "$OUT/perf.data" -- sleep "$DUR" > /dev/null 2>&1 & PP=$!; fi
    load "$DUR" > "$OUT/load.txt"
    t1=$(cpu_ms $P)
    if [ -n "$PP" ]; then wait "$PP" || true; fi
    if [ "$MODE" = h1 ]; then n=$(awk '/requests in/{print $1}' "$OUT/load.txt")
    else n=$(awk '/^requests:/{print $8}' "$OUT/load.txt"); fi
    echo "$MODE: $n requests, proxy CPU $((t1 - t0)) ms, $(awk -v t=$((t1 - t0)) -v n="$n" 'BEGIN{printf "%.1f", t*1000/n}') µs per request" ;;
  idle|idle-warm|floor-idle|floor-idle-warm)
    hold() { $BASE/venv/bin/python $L/idle_conns.py --port $PORT -n 1000 --cert $C/client.pem --key $C/client.key --cafile $C/ca-bundle.pem "$@"; }
    case $MODE in *warm) hold --hold 0.5 > /dev/null 2>&1; sleep 1 ;; esac
    r0=$(awk '/^VmRSS/{print $2}' /proc/$P/status)
    rm -f "$OUT/release"
    hold --hold 60 --release "$OUT/release" > "$OUT/idle.out" 2>&1 & I=$!
    until grep -q READY "$OUT/idle.out"; do sleep 0.2; kill -0 $I 2>/dev/null || break; done
    sleep 1
    r1=$(awk '/^VmRSS/{print $2}' /proc/$P/status)
    touch "$OUT/release"; wait $I || true
    echo "$MODE: $(head -1 "$OUT/idle.out"); RSS $r0 -> $r1 KiB: $(awk -v a=$r0 -v b=$r1 'BEGIN{printf "%.1f", (b-a)/1000}') KiB per connection" ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac
