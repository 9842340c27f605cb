# Shared by the proof scripts (sourced): a temporary directory, processes stopped on exit (by PID), and the
# "ok / FAIL" counters behind the closing "N passed, N failed" line.
T=$(mktemp -d)
PIDS=()
# Children first (a PID may be a subshell running a function), then the process itself.
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && { pkill -TERM -P "$p" 2>/dev/null; kill "$p" 2>/dev/null; }; done; wait 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
trap "exit 130" INT TERM PIPE
pass=0; fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
check() { local what=$1; shift; if "$@" >"$T/out" 2>&1; then ok "$what"; else bad "$what"; sed 's/^/     /' "$T/out" | head -20; fi; }
