#!/usr/bin/env bash
# Certificate-bound access tokens (issue #22): tokens issued per second by `mutual serve` over mTLS, and the proxy's
# CPU per request with a bound-token check beside the same proxy without it, same run. Uses what
# ../shared/bench/peers.sh set up in $BASE (the client-certificate shim for wrk, the nginx backend): run
# `STAGES="install certs" bash ../shared/bench/peers.sh` once first. Certificates and tokens come from a CA made here.
# Servers are pinned to core 0, wrk to core 1; CPU comes from /proc/PID/stat.
# Usage: MUTUAL=.build/release/mutual bash benchmarks/oauth.sh [tokens|proxy|all]
set -euo pipefail
MODE=${1:-all}
MUTUAL=${MUTUAL:-$(cd "$(dirname "$0")/.." && pwd)/.build/release/mutual}
BASE=${BASE:-/tmp/mutual-peer-bench}; R=$BASE/run; L=$BASE/lib
OUT=${OUT:-$(mktemp -d)}; DUR=${DUR:-8}; REPS=${REPS:-3}
[ -s "$L/mtls_preload.so" ] && [ -s "$R/backend/nginx.conf" ] || { echo "run: STAGES=\"install certs\" bash ../shared/bench/peers.sh" >&2; exit 2; }
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; wait 2>/dev/null || true; }
trap cleanup EXIT
cpu_ms() { awk '{sub(/.*\) /,""); print ($12+$13)*10}' /proc/$1/stat; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout waiting for $2 in $1" >&2; exit 1; }

S=$OUT/state
"$MUTUAL" init --state-dir "$S" --name "Bench OAuth" > /dev/null
"$MUTUAL" issue --state-dir "$S" --profile workload --uri spiffe://example.org/ns/bench/client --out-dir "$OUT/client" > /dev/null
"$MUTUAL" issue --state-dir "$S" --profile server --dns localhost --ip 127.0.0.1 --out-dir "$OUT/server" > /dev/null
SHIM=(env LD_PRELOAD=$L/mtls_preload.so MTLS_CERT=$OUT/client/chain.pem MTLS_KEY=$OUT/client/key.pem taskset -c 1)
API_PORT=$(free_port)
taskset -c 0 "$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:$API_PORT --http-listen off --log-level warning \
  --oauth-allow 'spiffe://example.org/ns/bench/*=bench:read,write' --oauth-token-lifetime 1h > "$OUT/serve.log" 2>&1 &
API=$!; PIDS+=($API)
wait_for "$OUT/serve.log" "listening on"

tokens() {  # POST /oauth2/token over mTLS keep-alive, 16 connections
  cat > "$OUT/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = "grant_type=client_credentials&audience=bench&scope=read"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
LUA
  "${SHIM[@]}" wrk -t1 -c16 -d2s -s "$OUT/post.lua" https://127.0.0.1:$API_PORT/oauth2/token > /dev/null
  for rep in $(seq "$REPS"); do
    t0=$(cpu_ms $API)
    "${SHIM[@]}" wrk -t1 -c16 -d${DUR}s --latency -s "$OUT/post.lua" https://127.0.0.1:$API_PORT/oauth2/token > "$OUT/tokens.txt"
    t1=$(cpu_ms $API)
    n=$(awk '/requests in/{print $1}' "$OUT/tokens.txt")
    non2xx=$(awk '/Non-2xx/{print $4}' "$OUT/tokens.txt")
    echo "tokens run $rep: $n tokens in ${DUR}s = $((n / DUR))/s, server CPU $(awk -v t=$((t1 - t0)) -v n="$n" 'BEGIN{printf "%.1f", t*1000/n}') µs per token, p99 $(awk '/ 99%/{print $2}' "$OUT/tokens.txt"), non-2xx ${non2xx:-0}"
  done
}

proxy() {  # the same proxy and load, without and with --token-audience, alternating
  taskset -c 0 nginx -p $R/backend -c $R/backend/nginx.conf -e $R/backend/logs/error.log
  sleep 0.5; PIDS+=($(cat $R/backend/nginx.pid))
  TOKEN=$("$MUTUAL" oauth token --authority https://127.0.0.1:$API_PORT --cert "$OUT/client/chain.pem" --key "$OUT/client/key.pem" \
    --ca "$S/ca/root.pem" --audience bench --scope read)
  cat > "$OUT/same.lua" <<LUA
wrk.headers["Authorization"] = "Bearer $TOKEN"
LUA
  # The worst case: a token never seen before on every request (no connection or shared signature cache helps).
  # 60,000 tokens with the same claims and key as the authority's (its signing key read from the state directory),
  # each with its own jti; wrk reads them in order, the measured run after the warm-up's.
  $BASE/venv/bin/python - "$S" "$TOKEN" 60000 > "$OUT/tokens.list" <<'PY'
import base64, json, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
state, token, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
entry = [k for k in json.load(open(state + "/oauth/keys.json"))["keys"]][-1]
key = serialization.load_pem_private_key(open(state + "/oauth/" + entry["file"], "rb").read(), password=None)
header = token.split(".")[0]
claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
for i in range(count):
    claims["jti"] = "bench-%d" % i
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    r, s = utils.decode_dss_signature(key.sign((header + "." + payload).encode(), ec.ECDSA(hashes.SHA256())))
    print(header + "." + payload + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big")))
PY
  cat > "$OUT/rotating.lua" <<LUA
local tokens = {}
for line in io.lines("$OUT/tokens.list") do tokens[#tokens + 1] = line end
local i = tonumber(os.getenv("TOKEN_OFFSET") or "0")
request = function() i = i % #tokens + 1; return wrk.format(nil, nil, {["Authorization"] = "Bearer " .. tokens[i]}) end
LUA
  run_proxy() {  # NAME SCRIPT [token flags]
    local name=$1 script=$2; shift 2
    local port; port=$(free_port)
    taskset -c 0 "$MUTUAL" proxy --listen 127.0.0.1:$port --upstream http://127.0.0.1:8080 --cert "$OUT/server/chain.pem" \
      --key "$OUT/server/key.pem" --client-ca "$S/ca/root.pem" --allow 'spiffe://example.org/ns/bench/*' --access-log off \
      --authority https://127.0.0.1:$API_PORT --authority-ca "$S/ca/root.pem" "$@" \
      > "$OUT/proxy.log" 2>&1 &
    local P=$!
    wait_for "$OUT/proxy.log" "inbound listening"
    sleep 1
    "${SHIM[@]}" wrk -t1 -c100 -d2s -s "$script" https://127.0.0.1:$port/ > /dev/null
    local t0; t0=$(cpu_ms $P)
    TOKEN_OFFSET=20000 "${SHIM[@]}" wrk -t1 -c100 -d${DUR}s -s "$script" https://127.0.0.1:$port/ > "$OUT/load.txt"
    local t1; t1=$(cpu_ms $P)
    kill $P; wait $P 2>/dev/null || true
    local n; n=$(awk '/requests in/{print $1}' "$OUT/load.txt")
    local bad; bad=$(awk '/Non-2xx/{print $4}' "$OUT/load.txt")
    echo "$name: $((n / DUR)) req/s, proxy CPU $(awk -v t=$((t1 - t0)) -v n="$n" 'BEGIN{printf "%.1f", t*1000/n}') µs per request, non-2xx ${bad:-0}"
  }
  # Every run follows the authority's revocation (CRL and events): the only difference is the token check.
  TF=(--token-audience bench --token-scope read)
  for rep in $(seq "$REPS"); do
    run_proxy "run $rep, no token check           " "$OUT/same.lua" --log-level info
    run_proxy "run $rep, bound token, same token   " "$OUT/same.lua" "${TF[@]}"
    run_proxy "run $rep, bound token, new each time" "$OUT/rotating.lua" "${TF[@]}"
  done
}

case $MODE in
  tokens) tokens ;;
  proxy) proxy ;;
  all) tokens; proxy ;;
  *) echo "unknown mode $MODE" >&2; exit 2 ;;
esac
