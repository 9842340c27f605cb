#!/usr/bin/env bash
# ML-DSA certificates (RFC 9881), checked by independent code: the Swift tests build an ML-DSA-65 root, an ML-DSA-87
# intermediate and two leaves (P-256 and ML-DSA-65 keys) and keep their DER; python `cryptography` 50 parses them,
# verifies each signature and builds the chains with its PolicyBuilder server verifier.
# Prints "N passed, N failed".
set -uo pipefail
: "${VENV:?}"
. "$(dirname "$0")/harness.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$T/pq"
(cd "$ROOT" && MUTUAL_PQ_OUT="$T/pq" swift test --skip-build --filter MLDSATests > "$T/swift.log" 2>&1) || { bad "the ML-DSA Swift tests: $(grep -E '✘' "$T/swift.log" | head -5)"; }
"$VENV/bin/python3" "$ROOT/scripts/pq_verify.py" "$T/pq" > "$T/py.log" 2>&1
grep -E '^(ok|FAIL) ' "$T/py.log"
pass=$((pass + $(grep -c '^ok ' "$T/py.log")))
fail=$((fail + $(grep -c '^FAIL ' "$T/py.log")))
grep -q '^ML-DSA' "$T/py.log" || bad "the python checker did not finish: $(tail -5 "$T/py.log")"
echo "ML-DSA interop: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
