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
# pkilint with exactly the documented false positives filtered: pkix.invalid_uri_syntax for spiffe:// URIs and
# pkix.invalid_domain_name_syntax for single-label DNS names.
lint() {
  local tool=$1; shift
  "$VENV/bin/$tool" lint -s WARNING -f JSON "$@" > "$T/lint.json" 2>"$T/lint.err"
  python3 - "$T/lint.json" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read().strip()
doc = json.loads(text) if text else {"results": []}
real = []
for result in doc.get("results", []):
    for f in result.get("finding_descriptions", []):
        if f.get("severity") in ("INFO", "DEBUG", "NOTICE"):
            continue
        quoted = re.search(r'"([^"]*)"', f.get("message") or "")
        name = quoted.group(1) if quoted else ""
        if f["code"] == "pkix.invalid_uri_syntax" and name.startswith("spiffe://"):
            continue
        if f["code"] == "pkix.invalid_domain_name_syntax" and name and "." not in name:
            continue
        real.append(f)
for f in real:
    print(f["code"], f.get("severity"), f.get("message"))
sys.exit(1 if real else 0)
PY
}
