#!/usr/bin/env bash
# Issuance over HTTP (issue #3), side by side with `cfssl serve`, with the cost taken apart: the same load generator,
# CSRs and pinning as ../shared/bench/peers.sh (server on core 0, load on core 1, 16 keep-alive clients), servers run
# one after the other within each repetition so every line of a repetition shares the machine's state of the moment.
#   cfssl         cfssl serve (signs, stores nothing)
#   mutual-full   mutual bench ca-server: CSR check, profile, signing, inventory + audit committed (fsync) first
#   mutual-sign   the same without the inventory write (not durable: for the breakdown only)
#   mutual-http   reads the body and answers a fixed PEM block (the HTTP server alone)
# Server CPU per certificate comes from /proc/PID/stat over the timed run. Needs peers.sh's venv and load generator
# (run `STAGES="install certs ca" bash ../shared/bench/peers.sh` once).
# Usage: MUTUAL=.build/release/mutual REPS=3 N=6000 bash benchmarks/http-issuance.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MUTUAL=${MUTUAL:-$ROOT/.build/release/mutual}
BASE=${BASE:-/tmp/mutual-peer-bench}; PY=$BASE/venv/bin/python; L=$BASE/lib; D=$BASE/ca
REPS=${REPS:-3}; N=${N:-6000}; THREADS=${THREADS:-16}; PORT=${PORT:-9888}
WHO=${WHO:-"cfssl mutual-full mutual-sign mutual-http"}
for f in "$PY" "$L/sign_load.py" "$L/gen_csrs.py" "$D/cfssl-ca.pem" "$D/cfssl-config.json"; do
  [ -e "$f" ] || { echo "missing $f: run STAGES=\"install certs ca\" bash ../shared/bench/peers.sh first" >&2; exit 2; }
done
for who in $WHO; do
  case $who in cfssl|mutual-full|mutual-sign|mutual-http) ;; *) echo "unknown server '$who' in WHO (cfssl, mutual-full, mutual-sign, mutual-http)" >&2; exit 2 ;; esac
done
T=$(mktemp -d); PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$T"; }
trap cleanup EXIT INT TERM
HZ=$(getconf CLK_TCK)
ticks() { awk '{sub(/.*\) /,""); print $12+$13}' /proc/$1/stat; }
"$PY" "$L/gen_csrs.py" "$T/csrs" "$N"

echo "| rep | server | certificates/s | p50 ms | server CPU ms per certificate | errors |"
echo "|---|---|---|---|---|---|"
for rep in $(seq "$REPS"); do
  for who in $WHO; do
    case $who in
      cfssl) taskset -c 0 cfssl serve -address 127.0.0.1 -port "$PORT" -ca "$D/cfssl-ca.pem" -ca-key "$D/cfssl-ca-key.pem" \
               -config "$D/cfssl-config.json" -loglevel 3 > "$T/server.log" 2>&1 &
             path=/api/v1/cfssl/sign; mode=cfssl ;;
      mutual-*) taskset -c 0 "$MUTUAL" bench ca-server --listen "127.0.0.1:$PORT" --stage "${who#mutual-}" > "$T/server.log" 2>&1 &
             path=/sign; mode=raw ;;
    esac
    PID=$!
    for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
    taskset -c 1 "$PY" "$L/sign_load.py" --port "$PORT" --path $path --mode $mode --csrs "$T/csrs/csrs.json" --count 500 --threads 4 > /dev/null
    p0=$(ticks "$PID")
    j=$(taskset -c 1 "$PY" "$L/sign_load.py" --port "$PORT" --path $path --mode $mode --csrs "$T/csrs/csrs.json" --threads "$THREADS" --max-seconds 60)
    p1=$(ticks "$PID")
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    echo "$j" | "$PY" -c "
import json, sys
d = json.load(sys.stdin)
print('| $rep | $who | %s | %s | %.3f | %d |' % (round(d['per_s']), d['p50_ms'], ($p1 - $p0) / $HZ * 1000 / max(1, d['signed']), d['errors']))"
  done
done
