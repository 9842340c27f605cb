#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests, on a free port on 127.0.0.1, run as the unprivileged "postgres" user.
#   eval "$(bash scripts/pg.sh start DIR)"   -> exports MUTUAL_TEST_POSTGRES_URL and MUTUAL_TEST_PG_DIR
#   bash scripts/pg.sh stop DIR              -> stops the cluster and removes DIR
#   bash scripts/pg.sh restart DIR           -> fast restart (the same port), for outage tests
set -euo pipefail
cmd=${1:?start|stop|restart}; dir=${2:?data directory}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$cmd" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
    as_pg "$bin/initdb" -D "$dir/data" -U mutual --auth=trust -E UTF8 >/dev/null
    echo "$port" > "$dir/port"
    [ "$(id -u)" = 0 ] && chown postgres "$dir/port"
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=200" start >/dev/null
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U mutual mutual_test
    echo "export MUTUAL_TEST_POSTGRES_URL=postgres://mutual@127.0.0.1:$port/mutual_test?tlsmode=disable MUTUAL_TEST_PG_DIR=$dir"
    ;;
  restart)
    port=$(cat "$dir/port")
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -m fast -o "-p $port -k $dir -c listen_addresses=127.0.0.1" restart >/dev/null
    ;;
  stop)
    [ -d "$dir/data" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -w -m fast stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
esac
