"""Independent check of the ML-DSA certificates Mutual builds (RFC 9881): python `cryptography` (50+, with an OpenSSL
that knows ML-DSA) parses each, checks every signature, and builds the chain with its PolicyBuilder server verifier.
Prints one "ok ..." or "FAIL ..." line per check."""
import datetime
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

out = sys.argv[1]
passed = failed = 0


def check(what, body):
    global passed, failed
    try:
        detail = body()
        passed += 1
        print(f"ok   {what}{': ' + detail if detail else ''}")
    except Exception as error:  # any failure of the checker is a failed check
        failed += 1
        print(f"FAIL {what}: {type(error).__name__}: {error}")


certs = {}
for name in ("root", "intermediate", "leaf-p256", "leaf-mldsa65"):
    def load(name=name):
        certs[name] = x509.load_der_x509_certificate(open(f"{out}/{name}.der", "rb").read())
        c = certs[name]
        return f"signed with {c.signature_algorithm_oid.dotted_string}, key {type(c.public_key()).__name__}"
    check(f"python cryptography parses the {name} certificate", load)

expected = {"root": ("2.16.840.1.101.3.4.3.18", "MLDSA65PublicKey"), "intermediate": ("2.16.840.1.101.3.4.3.18", "MLDSA87PublicKey"),
            "leaf-p256": ("2.16.840.1.101.3.4.3.19", "ECPublicKey"), "leaf-mldsa65": ("2.16.840.1.101.3.4.3.19", "MLDSA65PublicKey")}


def algorithms():
    for name, (oid, key) in expected.items():
        c = certs[name]
        assert c.signature_algorithm_oid.dotted_string == oid, f"{name}: {c.signature_algorithm_oid.dotted_string}"
        assert type(c.public_key()).__name__ == key, f"{name}: {type(c.public_key()).__name__}"


check("algorithms are the RFC 9881 OIDs (ML-DSA-65 root, ML-DSA-87 intermediate)", algorithms)
check("the root's self-signature verifies", lambda: certs["root"].verify_directly_issued_by(certs["root"]))
check("the intermediate's signature verifies under the root", lambda: certs["intermediate"].verify_directly_issued_by(certs["root"]))
for leaf in ("leaf-p256", "leaf-mldsa65"):
    check(f"{leaf}'s signature verifies under the intermediate", lambda leaf=leaf: certs[leaf].verify_directly_issued_by(certs["intermediate"]))

    def chain(leaf=leaf):
        when = datetime.datetime(2027, 1, 15, 12, tzinfo=datetime.timezone.utc)
        verifier = verification.PolicyBuilder().store(verification.Store([certs["root"]])).time(when).build_server_verifier(x509.DNSName("pq.example.org"))
        built = verifier.verify(certs[leaf], [certs["intermediate"]])
        assert len(built) == 3, f"chain of {len(built)}"
        return "root → intermediate → leaf"
    check(f"{leaf}: PolicyBuilder's server verifier builds the chain for pq.example.org", chain)


def tampered():
    der = bytearray(open(f"{out}/leaf-mldsa65.der", "rb").read())
    der[len(der) // 3] ^= 1
    try:
        x509.load_der_x509_certificate(bytes(der)).verify_directly_issued_by(certs["intermediate"])
    except Exception:
        return "refused"
    raise AssertionError("a flipped bit still verified")


check("a certificate with one flipped bit does not verify", tampered)

def crl():
    revocations = x509.load_der_x509_crl(open(f"{out}/intermediate.crl", "rb").read())
    assert revocations.signature_algorithm_oid.dotted_string == "2.16.840.1.101.3.4.3.19", revocations.signature_algorithm_oid
    assert revocations.is_signature_valid(certs["intermediate"].public_key()), "signature does not verify"
    assert not revocations.is_signature_valid(certs["root"].public_key()), "verifies under the wrong key"
    entry = revocations.get_revoked_certificate_by_serial_number(certs["leaf-p256"].serial_number)
    assert entry is not None, "the P-256 leaf is not listed"
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise, reason
    number = revocations.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    return f"ML-DSA-87 signature valid, CRL #{number}, the P-256 leaf revoked (keyCompromise)"


check("python cryptography checks the CRL signed by the ML-DSA-87 intermediate", crl)

for variant in ("ml-dsa-65", "ml-dsa-87"):
    def request(variant=variant):
        csr = x509.load_der_x509_csr(open(f"{out}/csr-{variant}.der", "rb").read())
        assert csr.is_signature_valid, "signature does not verify"
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        assert names == ["pq.example.org"], names
        return f"{type(csr.public_key()).__name__}, signature valid, SAN {names[0]}"
    check(f"python cryptography reads the {variant} certification request and checks its signature", request)
for variant in ("ml-dsa-65", "ml-dsa-87"):
    def keyfile(variant=variant, name="", password=None):
        key = serialization.load_pem_private_key(open(f"{out}/key-{variant}{name}.pem", "rb").read(), password=password)
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert raw == open(f"{out}/key-{variant}.pub", "rb").read(), "public key differs"
        return type(key).__name__
    check(f"python cryptography loads the {variant} key file (PKCS#8 seed form) and derives the same public key", keyfile)
    check(f"and the encrypted one (PBES2) with its passphrase", lambda variant=variant: keyfile(variant, "-encrypted", b"correct horse"))

print(f"ML-DSA (python cryptography): {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
