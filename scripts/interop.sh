#!/usr/bin/env bash
# Interop checks with programs nobody on this team wrote:
#  - openssl verify -purpose sslserver|sslclient accepts what `mutual issue` / `mutual sign` make (every key type);
#  - openssl-made CSRs are signed; requests for CA:true come back as plain leaves;
#  - pkilint (lint_pkix_cert, lint_pkix_signer_signee_cert_chain) reports nothing at WARNING or above, apart from its
#    documented false positives for spiffe:// URIs and single-label DNS names, filtered by code and by name;
#  - the x509-limbo suite through `mutual verify`, with the committed exceptions file.
# Prints "N passed, N failed" at the end; exits non-zero on any failure.
set -uo pipefail
: "${MUTUAL:?path to the mutual binary}" "${VENV:?pkilint venv}" "${SHARED:?shared dir}"
. "$(dirname "$0")/harness.sh"

S="$T/state"
check "mutual init (P-256, name constraints)" "$MUTUAL" init --state-dir "$S" --name "Interop CA" --permit-dns test --permit-dns localhost --permit-uri spiffe://example.org
check "lint root" lint lint_pkix_cert "$S/ca/root.pem"
check "lint intermediate" lint lint_pkix_cert "$S/ca/intermediate.pem"
check "lint root -> intermediate" lint lint_pkix_signer_signee_cert_chain "$S/ca/root.pem" "$S/ca/intermediate.pem"
check "lint admin client" lint lint_pkix_cert "$S/admin/cert.pem"

for kt in p256 p384 ed25519 rsa2048; do
  check "issue server ($kt)" "$MUTUAL" issue --state-dir "$S" --profile server --dns api.test --dns localhost --key-type "$kt" --out-dir "$T/server-$kt"
  check "issue client ($kt)" "$MUTUAL" issue --state-dir "$S" --profile client --cn "client-$kt" --key-type "$kt" --out-dir "$T/client-$kt"
  check "issue workload ($kt)" "$MUTUAL" issue --state-dir "$S" --profile workload --uri "spiffe://example.org/ns/prod/sa/$kt" --key-type "$kt" --out-dir "$T/workload-$kt"
  check "openssl verify sslserver ($kt)" openssl verify -CAfile "$T/server-$kt/root.pem" -untrusted "$T/server-$kt/chain.pem" -purpose sslserver "$T/server-$kt/cert.pem"
  check "openssl verify sslclient ($kt)" openssl verify -CAfile "$T/client-$kt/root.pem" -untrusted "$T/client-$kt/chain.pem" -purpose sslclient "$T/client-$kt/cert.pem"
  check "openssl verify workload as client ($kt)" openssl verify -CAfile "$T/workload-$kt/root.pem" -untrusted "$T/workload-$kt/chain.pem" -purpose sslclient "$T/workload-$kt/cert.pem"
  check "openssl verify workload as server ($kt)" openssl verify -CAfile "$T/workload-$kt/root.pem" -untrusted "$T/workload-$kt/chain.pem" -purpose sslserver "$T/workload-$kt/cert.pem"
  for p in server client workload; do
    check "pkilint $p ($kt)" lint lint_pkix_cert "$T/$p-$kt/cert.pem"
    check "pkilint issuer->$p ($kt)" lint lint_pkix_signer_signee_cert_chain "$S/ca/intermediate.pem" "$T/$p-$kt/cert.pem"
  done
done
if openssl verify -CAfile "$T/server-p256/root.pem" -untrusted "$T/server-p256/chain.pem" -purpose sslclient "$T/server-p256/cert.pem" >/dev/null 2>&1; then
  bad "openssl must refuse a server certificate as a client"
else ok "openssl refuses a server certificate as a client"; fi

# An openssl-made CSR that asks to be a CA: signed as a plain leaf.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$T/evil.key" -subj "/CN=evil.test" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectAltName=DNS:evil.test" -out "$T/evil.csr" 2>/dev/null
check "sign an openssl CSR asking for CA:TRUE" "$MUTUAL" sign --state-dir "$S" --profile server "$T/evil.csr" --out "$T/evil.pem"
if openssl x509 -in "$T/evil.pem" -noout -text | grep -q "CA:TRUE"; then bad "CA:TRUE reached the certificate"; else ok "CA:TRUE did not reach the certificate"; fi
if openssl x509 -in "$T/evil.pem" -noout -text | grep -q "Certificate Sign"; then bad "keyCertSign reached the certificate"; else ok "keyCertSign did not reach the certificate"; fi
openssl req -in "$T/evil.csr" -outform DER -out "$T/evil.der"
check "sign a DER CSR" "$MUTUAL" sign --state-dir "$S" --profile server "$T/evil.der" --out "$T/evil2.pem"
check "openssl verify the CSR-signed leaf" openssl verify -CAfile "$S/ca/root.pem" -untrusted "$S/ca/intermediate.pem" -purpose sslserver "$T/evil.pem"
if "$MUTUAL" sign --state-dir "$S" --profile server "$T/evil.key" --out "$T/x.pem" >/dev/null 2>&1; then
  bad "a private key file was accepted as a CSR"; else ok "a private key file is refused as a CSR"; fi

# Encrypted CA keys are standard PKCS#8: openssl opens them with the passphrase, and not without.
E="$T/enc"
check "init with an encrypted key" env MUTUAL_PASSPHRASE=interop-secret "$MUTUAL" init --state-dir "$E"
check "openssl reads the encrypted CA key with the passphrase" openssl pkey -in "$E/ca/intermediate.key" -passin pass:interop-secret -noout
if openssl pkey -in "$E/ca/intermediate.key" -passin pass:wrong -noout >/dev/null 2>&1; then bad "wrong passphrase accepted by openssl"; else ok "openssl refuses the wrong passphrase"; fi
check "issue an IP server certificate from the unconstrained CA" env MUTUAL_PASSPHRASE=interop-secret "$MUTUAL" issue --state-dir "$E" --profile server --ip 127.0.0.1 --ip ::1 --out-dir "$T/ip"
check "openssl verify -verify_ip 127.0.0.1" openssl verify -CAfile "$T/ip/root.pem" -untrusted "$T/ip/chain.pem" -purpose sslserver -verify_ip 127.0.0.1 "$T/ip/cert.pem"
check "pkilint IP server" lint lint_pkix_cert "$T/ip/cert.pem"
if "$MUTUAL" issue --state-dir "$S" --profile server --ip 127.0.0.1 --out-dir "$T/ip2" >/dev/null 2>&1; then
  bad "a DNS-constrained CA issued an IP SAN"; else ok "a DNS-constrained CA refuses IP SANs"; fi

# mutual verify agrees with openssl on a CRL made by openssl from our own CA.
mkdir -p "$T/ossl"; : > "$T/ossl/index.txt"; echo 1000 > "$T/ossl/crlnumber"
cat > "$T/ossl/ca.cnf" <<CNF
[ ca ]
default_ca = d
[ d ]
database = $T/ossl/index.txt
crlnumber = $T/ossl/crlnumber
default_md = sha256
default_crl_days = 1
CNF
serial=$(openssl x509 -in "$T/client-p256/cert.pem" -noout -serial | cut -d= -f2)
printf 'R\t300101000000Z\t%s\t%s\tunknown\t/CN=x\n' "$(date -u +%y%m%d%H%M%SZ)" "$serial" >> "$T/ossl/index.txt"
openssl ca -config "$T/ossl/ca.cnf" -gencrl -cert "$S/ca/intermediate.pem" -keyfile "$S/ca/intermediate.key" -out "$T/ossl/crl.pem" 2>/dev/null
if "$MUTUAL" verify --roots "$S/ca/root.pem" --intermediates "$S/ca/intermediate.pem" --eku clientAuth --crl "$T/ossl/crl.pem" "$T/client-p256/cert.pem" > "$T/out" 2>&1; then
  bad "mutual verify accepted a certificate revoked by an openssl CRL"; else
  if grep -q revoked "$T/out"; then ok "mutual verify rejects a certificate on an openssl-made CRL"; else bad "wrong reason: $(cat "$T/out")"; fi
fi
check "mutual verify accepts another certificate with that CRL" "$MUTUAL" verify --roots "$S/ca/root.pem" --intermediates "$S/ca/intermediate.pem" --eku clientAuth --crl "$T/ossl/crl.pem" "$T/client-p384/cert.pem"

check "audit chain intact after all of the above" "$MUTUAL" audit verify --state-dir "$S"

# The OpenAPI description of the authority API is valid OpenAPI 3.1.
check "docs/openapi.yaml is valid OpenAPI 3.1" "$VENV/bin/openapi-spec-validator" "$(dirname "$0")/../docs/openapi.yaml"

# x509-limbo
LIMBO="$SHARED/conformance/limbo"
if VERIFY_CMD="$MUTUAL verify" FAIL_ON_MISMATCH=1 EXCEPTIONS="$(dirname "$0")/../conformance/limbo-exceptions.json" \
    python3 "$LIMBO/cli_harness.py" < "$LIMBO/limbo.json" > "$T/limbo.json" 2> "$T/limbo.err"; then
  ok "x509-limbo: $(grep 'passed' "$T/limbo.err")"
else
  bad "x509-limbo: $(grep 'passed' "$T/limbo.err")"; grep UNEXPECTED "$T/limbo.err" | head -20
fi
n=$(python3 -c "import json;print(len(json.load(open('$(dirname "$0")/../conformance/limbo-exceptions.json'))))")
if [ "$n" -le 15 ]; then ok "limbo exceptions: $n (at most 15)"; else bad "limbo exceptions: $n > 15"; fi

echo
echo "interop: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
