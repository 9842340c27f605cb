#!/usr/bin/env bash
# Runs the shell examples of README.md and docs/*.md (blocks marked `<!-- example: NAME -->`) as written, with the
# documented host names and ports, inside a private network and mount namespace: its own loopback, its own /etc/hosts
# (the example host names -> 127.0.0.1), nothing visible to or from the host. See scripts/docs_examples.py.
set -uo pipefail
: "${MUTUAL:?}"
. "$(dirname "$0")/harness.sh"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if ! unshare -m -n true 2>/dev/null; then
  bad "cannot create a network namespace (unshare -m -n needs root or user namespaces): the documentation examples did not run"
  echo "docs examples: $pass passed, $fail failed"; exit 1
fi
mkdir -p "$T/shims" "$T/work"
ln -s "$MUTUAL" "$T/shims/mutual"
# What cannot run here is recorded, not executed: no service manager, and no nginx of the host to reload.
for tool in systemctl nginx; do printf '#!/bin/sh\necho "%s $*" >> "%s/recorded.log"\n' "$tool" "$T" > "$T/shims/$tool"; chmod +x "$T/shims/$tool"; done
printf '127.0.0.1 localhost ca.example api.example web.example ca.svc.acme.test ca.internal\n::1 localhost\n' > "$T/hosts"
unshare -m -n env PATH="$T/shims:$PATH" bash -c '
  ip link set lo up || exit 1
  mount --bind "$1" /etc/hosts || exit 1
  python3 "$2/scripts/docs_examples.py" "$3"
' _ "$T/hosts" "$ROOT" "$T/work"
