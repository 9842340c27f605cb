#!/usr/bin/env bash
# Issuance/s and renewal/s (issue #7): SQLite default vs PostgreSQL with one and two authority processes sharing the
# database. Each process runs `mutual bench issue` (in-process durable issuance, 64 concurrent issuers); for two
# replicas two processes run at once on one state directory and database. CPU: the authority processes' own
# (getrusage) and PostgreSQL's (all its processes, from /proc). Needs a cluster from scripts/pg.sh (PG_DIR).
# Usage: MUTUAL=.build/release/mutual PG_DIR=/tmp/mutual-pg-… COUNT=10000 bash benchmarks/postgres.sh
set -euo pipefail
MUTUAL=${MUTUAL:-$(cd "$(dirname "$0")/.." && pwd)/.build/release/mutual}
: "${PG_DIR:?a cluster started by scripts/pg.sh}"
COUNT=${COUNT:-10000}
PORT=$(cat "$PG_DIR/port"); HZ=$(getconf CLK_TCK)
# utime+stime of live PostgreSQL processes plus cutime+cstime (backends that already exited are reaped by the postmaster).
pg_ticks() { local t=0 v; for p in $(pgrep -u postgres postgres); do v=$(awk '{sub(/.*\) /,""); print $12+$13+$14+$15}' /proc/$p/stat 2>/dev/null || echo 0); t=$((t + v)); done; echo $t; }
fresh_db() { psql "postgres://mutual@127.0.0.1:$PORT/mutual_test" -q -c "DROP DATABASE IF EXISTS bench WITH (FORCE)" -c "CREATE DATABASE bench" >/dev/null 2>&1; echo "postgres://mutual@127.0.0.1:$PORT/bench?tlsmode=disable"; }
run() {  # label replicas mode(extra flag) database|-
  local label=$1 replicas=$2 flag=$3 db=$4 T; T=$(mktemp -d)
  if [ "$db" = - ]; then "$MUTUAL" init --state-dir "$T/s" >/dev/null; else "$MUTUAL" init --state-dir "$T/s" --database "$db" >/dev/null; fi
  local p0 t0 t1 p1 total=0 cpu=0; p0=$(pg_ticks); t0=$(date +%s.%N)
  for r in $(seq "$replicas"); do
    "$MUTUAL" bench issue --state-dir "$T/s" --count "$COUNT" --concurrency 64 $flag --json > "$T/r$r.json" &
  done
  wait
  t1=$(date +%s.%N); p1=$(pg_ticks)
  for r in $(seq "$replicas"); do
    total=$((total + COUNT))
    cpu=$(python3 -c "import json;print($cpu + json.load(open('$T/r$r.json'))['cpu_us_per_certificate'] * $COUNT)")
  done
  # Wall time includes the untimed setup (CSR generation; for renewals also the first issuance): use the processes'
  # own timed windows for the rate, summed across replicas as they overlap.
  local rate; rate=$(python3 -c "
import json
rs=[json.load(open('$T/r%d.json' % r)) for r in range(1, $replicas + 1)]
print(round(sum(r['certificates_per_second'] for r in rs)))")
  printf '| %s | %s | %s/s | %.0f µs | %.0f µs |\n' "$label" "$replicas" "$rate" "$(python3 -c "print($cpu / $total)")" \
    "$(python3 -c "print(($p1 - $p0) / $HZ * 1e6 / $total)")"
  rm -rf "$T"
}
echo "| store | authority processes | rate | authority CPU per certificate | PostgreSQL CPU per certificate (whole run) |"
echo "|---|---|---|---|---|"
run "SQLite, issuance" 1 "" -
run "SQLite, renewal" 1 "--renew" -
run "PostgreSQL, issuance" 1 "" "$(fresh_db)"
run "PostgreSQL, renewal" 1 "--renew" "$(fresh_db)"
run "PostgreSQL, issuance" 2 "" "$(fresh_db)"
run "PostgreSQL, renewal" 2 "--renew" "$(fresh_db)"
