#!/usr/bin/env bash
# Two `mutual serve` replicas on one PostgreSQL (issue #7 proof), on 127.0.0.1 with ports chosen at run time:
#  - 8 concurrent clients per replica enroll (token) and renew (mTLS) for DURATION seconds while revocations happen
#    (each revocation made on the *other* replica);
#  - at 1/3 of the run replica B is killed with SIGKILL (its clients move to A); at 1/2 PostgreSQL is restarted;
#  - afterwards: every certificate a client received is in the inventory exactly once, serials are unique, the audit
#    chain verifies, CRL numbers are 1..N without gaps, every revoked certificate is revoked in OCSP on both replicas
#    (B restarted), and requests during the outage failed cleanly (HTTP 503 or refused connections, never a 500).
# Prints "N passed, N failed". Stops every process it started.
set -uo pipefail
: "${MUTUAL:?}" "${VENV:?}" "${PG_DIR:?}"
DURATION=${DURATION:-60}
. "$(dirname "$0")/harness.sh"
PORT=$(cat "$PG_DIR/port")
psql "postgres://mutual@127.0.0.1:$PORT/mutual_test" -q -c "DROP DATABASE IF EXISTS replicas WITH (FORCE)" -c "CREATE DATABASE replicas" >/dev/null
DB="postgres://mutual@127.0.0.1:$PORT/replicas?tlsmode=disable"
PSQL="psql postgres://mutual@127.0.0.1:$PORT/replicas -tA"
S="$T/state"
"$MUTUAL" init --state-dir "$S" --database "$DB" --name "Replicas" >/dev/null || { bad "init on PostgreSQL"; exit 1; }
start_replica() {  # name -> writes $T/$1.log, appends PID
  "$MUTUAL" serve --state-dir "$S" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --log-level error > "$T/$1.log" 2>&1 &
  PIDS+=($!)
  echo $! > "$T/$1.pid"
  for _ in $(seq 100); do grep -q "CRL and OCSP on" "$T/$1.log" && break; sleep 0.1; done
}
start_replica a; start_replica b
A=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/a.log" | head -1); B=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/b.log" | head -1)
[ -n "$A" ] && [ -n "$B" ] && ok "two replicas up on one PostgreSQL ($A, $B)" || { bad "replicas did not start"; cat "$T"/*.log; exit 1; }
TOKEN=$("$MUTUAL" token create --state-dir "$S" --scope 'spiffe://load.test/*' --profile workload --uses 1000000 --ttl 1h 2>/dev/null)

# The load: python threads, stdlib HTTP over TLS with client certificates, CSRs from `cryptography`.
cat > "$T/load.py" <<'PY'
import http.client, json, os, random, ssl, sys, tempfile, threading, time
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
urls = {"a": sys.argv[1], "b": sys.argv[2]}; token = sys.argv[3]; root = sys.argv[4]; admin = (sys.argv[5], sys.argv[6])
duration = float(sys.argv[7]); outdir = sys.argv[8]
dead = set(); lock = threading.Lock()
issued, revoked, statuses = [], [], {}
def ctx(cert=None, key=None):
    c = ssl.create_default_context(cafile=root); c.check_hostname = False
    if cert: c.load_cert_chain(cert, key)
    return c
def post(base, path, body, bearer=None, cert=None, key=None):
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx(cert, key), timeout=20)
    headers = {"Content-Type": "application/json"}
    if bearer: headers["Authorization"] = "Bearer " + bearer
    try:
        conn.request("POST", path, json.dumps(body), headers); r = conn.getresponse(); data = r.read(); return r.status, data
    finally:
        conn.close()
def csr(name):
    k = ec.generate_private_key(ec.SECP256R1())
    req = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://load.test/" + name)]), critical=True).sign(k, hashes.SHA256()))
    return k, req.public_bytes(serialization.Encoding.PEM).decode()
def note(kind):
    with lock: statuses[kind] = statuses.get(kind, 0) + 1
def worker(replica, n):
    deadline = time.time() + duration; i = 0
    d = tempfile.mkdtemp(dir=outdir)
    while time.time() < deadline:
        target = replica if replica not in dead else "a"
        base = urls[target]; other = urls["b" if target == "a" and "b" not in dead else "a"]
        name = f"w{replica}{n}/{i}"; i += 1
        try:
            key, pem = csr(name)
            st, data = post(base, "/v1/sign", {"csr": pem}, bearer=token); note(f"sign {st}")
            if st != 200: time.sleep(0.2); continue
            got = json.loads(data); 
            with lock: issued.append(got["serial"])
            cf, kf = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
            open(cf, "w").write(got["chain"]); open(kf, "wb").write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            k2, pem2 = csr(name)
            st, data = post(base, "/v1/renew", {"csr": pem2}, cert=cf, key=kf); note(f"renew {st}")
            if st == 200:
                with lock: issued.append(json.loads(data)["serial"])
            if i % 5 == 0:
                st, _ = post(other, "/v1/revoke", {"serial": got["serial"], "reason": "superseded"}, cert=admin[0], key=admin[1]); note(f"revoke {st}")
                if st == 200:
                    with lock: revoked.append(got["serial"])
        except (ConnectionError, OSError, http.client.HTTPException) as e:
            note(f"{target} connection error {type(e).__name__}"); time.sleep(0.2)
threads = [threading.Thread(target=worker, args=(r, n)) for r in ("a", "b") for n in range(8)]
def control():
    for line in sys.stdin:
        if line.strip() == "b-dead": dead.add("b")
threading.Thread(target=control, daemon=True).start()
[t.start() for t in threads]; [t.join() for t in threads]
json.dump({"issued": issued, "revoked": revoked, "statuses": statuses}, open(os.path.join(outdir, "result.json"), "w"))
print(json.dumps(statuses, sort_keys=True))
PY
mkfifo "$T/control"
"$VENV/bin/python" "$T/load.py" "$A" "$B" "$TOKEN" "$S/ca/root.pem" "$S/admin/chain.pem" "$S/admin/key.pem" "$DURATION" "$T" < "$T/control" > "$T/load.out" 2>&1 &
LOAD=$!; PIDS+=($LOAD)
exec 9>"$T/control"
sleep "$(( DURATION / 3 ))"
kill -KILL "$(cat "$T/b.pid")" && echo "b-dead" >&9 && ok "replica B killed with SIGKILL at $((DURATION / 3)) s"
sleep "$(( DURATION / 2 - DURATION / 3 ))"
bash "$(dirname "$0")/pg.sh" restart "$PG_DIR" && ok "PostgreSQL restarted at $((DURATION / 2)) s"
wait "$LOAD"; exec 9>&-
echo "     load: $(cat "$T/load.out" | tail -1)"
python3 - "$T/result.json" <<'PY' > "$T/check.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(len(r["issued"]), len(set(r["issued"])), len(r["revoked"]), r["statuses"].get("sign 500", 0) + r["statuses"].get("renew 500", 0) + r["statuses"].get("revoke 500", 0),
      r["statuses"].get("sign 200", 0), sum(v for k, v in r["statuses"].items() if k.endswith(" 503")))
open(sys.argv[1] + ".issued", "w").write("\n".join(r["issued"]) + "\n")
open(sys.argv[1] + ".revoked", "w").write("\n".join(r["revoked"]) + "\n")
PY
read -r n_issued n_unique n_revoked n_500 n_sign_ok n_503 < "$T/check.txt"
[ "$n_sign_ok" -gt 50 ] && ok "load ran: $n_issued certificates received, $n_revoked revocations, $n_503 clean 503s during the outage" || bad "too little load: $(cat "$T/load.out")"
[ "$n_issued" = "$n_unique" ] && ok "serials received are unique" || bad "duplicate serials received ($n_issued vs $n_unique)"
[ "$n_500" = 0 ] && ok "no 500 during kill and database restart" || { bad "$n_500 responses were 500"; grep -h "request failed" "$T"/*.log | head -5; }
# Inventory: every received certificate exactly once.
$PSQL -c "SELECT serial FROM certificates" > "$T/inventory.txt"
missing=$(sort -u "$T/result.json.issued" | grep -v '^$' | comm -23 - <(sort "$T/inventory.txt") | wc -l)
dups=$($PSQL -c "SELECT COUNT(*) FROM (SELECT serial FROM certificates GROUP BY serial HAVING COUNT(*) > 1) d")
[ "$missing" = 0 ] && ok "every certificate a client received is in the inventory (none lost, including B's before SIGKILL)" || bad "$missing received certificates are missing from the inventory"
[ "$dups" = 0 ] && ok "each certificate is in the inventory exactly once" || bad "$dups serials duplicated"
# Audit chain and CRL numbers
check_out=$("$MUTUAL" audit verify --state-dir "$S" 2>&1) && ok "audit chain verifies: $check_out" || bad "audit chain: $check_out"
gaps=$($PSQL -c "SELECT COUNT(*) FROM (SELECT number, LAG(number) OVER (ORDER BY number) AS prev FROM crls) x WHERE prev IS NOT NULL AND number <> prev + 1")
ncrl=$($PSQL -c "SELECT COUNT(*) FROM crls")
[ "$gaps" = 0 ] && [ "$ncrl" -ge 1 ] && ok "CRL numbers strictly increase without gaps ($ncrl CRLs)" || bad "CRL numbering has $gaps gaps"
# OCSP from both replicas (B restarted) for every revoked certificate.
start_replica b2
for r in a b2; do
  H=$(grep -o 'http://127.0.0.1:[0-9]*' "$T/$r.log" | head -1)
  notrevoked=0
  while read -r serial; do
    [ -z "$serial" ] && continue
    out=$(openssl ocsp -url "$H/ocsp" -issuer "$S/ca/intermediate.pem" -serial "0x$serial" -CAfile "$S/ca/root.pem" 2>&1)
    echo "$out" | grep -q ": revoked" || notrevoked=$((notrevoked + 1))
  done < <(sort -u "$T/result.json.revoked" | head -200)
  [ "$notrevoked" = 0 ] && ok "OCSP on replica $r: every revoked certificate (up to 200 checked) is revoked" || bad "OCSP on $r: $notrevoked revoked certificates not shown revoked"
done
# A subscriber on replica A learns of a revocation made on replica B (through the shared revocation log).
AH=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/a.log" | head -1); BH=$(grep -o 'https://127.0.0.1:[0-9]*' "$T/b2.log" | head -1)
last=$($PSQL -c "SELECT COALESCE(MAX(sequence), 0) FROM revocation_log")
curl -sN --max-time 6 --cacert "$S/ca/root.pem" -H "Last-Event-ID: $last" "$AH/v1/revocations/events" > "$T/events-a.txt" &
PIDS+=($!)
sleep 0.5
"$MUTUAL" issue --state-dir "$S" --profile client --cn cross-replica --out-dir "$T/x" >/dev/null
xs=$(openssl x509 -in "$T/x/cert.pem" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f')
t0=$(date +%s%N)
curl -s -o /dev/null --cacert "$S/ca/root.pem" --cert "$S/admin/chain.pem" --key "$S/admin/key.pem" -H 'Content-Type: application/json' \
  --data "{\"serial\":\"$xs\",\"reason\":\"keyCompromise\"}" "$BH/v1/revoke"
for _ in $(seq 120); do grep -q "$xs" "$T/events-a.txt" && break; sleep 0.025; done
t1=$(date +%s%N)
grep -q "$xs" "$T/events-a.txt" && ok "a subscriber on replica A saw a revocation made on replica B ($(( (t1 - t0) / 1000000 )) ms)" || bad "cross-replica event missing"

echo
echo "replicas: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
