"""Independent peers for Mutual's ML-DSA hierarchy, written from RFC 9881 / FIPS 204 and the TLS 1.3 RFC, not from
Mutual's code: python `cryptography` 50 checks what `mutual init/issue/sign/serve` produced, and pyOpenSSL (on the
OpenSSL that cryptography bundles, which knows ML-DSA and X25519MLKEM768) is a TLS 1.3 client and server.

  pq_peers.py make-csr OUT_DIR                 an ML-DSA-65 key and CSR (SAN csr.example.org) for `mutual sign`
  pq_peers.py check DIR [HTTP_BASE]            check every file the script collected in DIR; one ok/FAIL line each
  pq_peers.py client HOST PORT CERT KEY CA PATH  one HTTPS request with a client certificate; prints a JSON summary
  pq_peers.py loop HOST PORT OUT_DIR CA SECONDS RESULT
                                               requests through the proxy for SECONDS with the agent's current
                                               certificate (re-read for every request), then a JSON summary in RESULT
  pq_peers.py server PORT CERT KEY CA READY    an HTTPS server that requires a client certificate (one connection
                                               at a time), answering with what it saw; writes READY when listening
"""
import datetime
import json
import socket
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import mldsa
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

MLDSA65 = "2.16.840.1.101.3.4.3.18"
MLDSA87 = "2.16.840.1.101.3.4.3.19"


def make_csr(out):
    key = mldsa.MLDSA65PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "csr.example.org")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("csr.example.org")]), critical=False)
        .sign(key, None)
    )
    open(f"{out}/csr.pem", "wb").write(csr.public_bytes(serialization.Encoding.PEM))
    open(f"{out}/csr-key.pem", "wb").write(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


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


def pems(path):
    return x509.load_pem_x509_certificates(open(path, "rb").read())


def ocsp_check(base, d, pq_issuing):
    """An OCSP request built by python cryptography for the ML-DSA certificates, answered by `mutual serve`: the
    response's ML-DSA signature verified under the ML-DSA issuing CA's key."""
    import urllib.request
    from cryptography.x509 import ocsp
    answers = {}
    for name in ("client", "server87"):
        cert = pems(f"{d}/{name}/cert.pem")[0]
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, pq_issuing, hashes.SHA1()).build()
        http = urllib.request.Request(f"{base}/ocsp", data=request.public_bytes(serialization.Encoding.DER),
                                      headers={"Content-Type": "application/ocsp-request"})
        response = ocsp.load_der_ocsp_response(urllib.request.urlopen(http, timeout=10).read())
        assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL, response.response_status
        assert response.signature_algorithm_oid.dotted_string == MLDSA65, response.signature_algorithm_oid
        pq_issuing.public_key().verify(response.signature, response.tbs_response_bytes)
        assert response.serial_number == cert.serial_number
        answers[name] = response.certificate_status
    assert answers["client"] == ocsp.OCSPCertStatus.GOOD and answers["server87"] == ocsp.OCSPCertStatus.REVOKED, answers
    return "ML-DSA-65 signature valid under the ML-DSA issuing CA; the workload good, the revoked ML-DSA-87 leaf revoked"


def run_checks(d, base=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    pq_root = pems(f"{d}/state/ca/pq-root.pem")[0]
    pq_issuing = pems(f"{d}/state/ca/pq-intermediate.pem")[0]
    classical_root = pems(f"{d}/state/ca/root.pem")[0]

    def hierarchy():
        assert pq_root.signature_algorithm_oid.dotted_string == MLDSA65, pq_root.signature_algorithm_oid
        assert isinstance(pq_root.public_key(), mldsa.MLDSA65PublicKey), type(pq_root.public_key())
        pq_root.verify_directly_issued_by(pq_root)
        pq_issuing.verify_directly_issued_by(pq_root)
        for cert in (pq_root, pq_issuing):
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            assert usage.key_cert_sign and usage.crl_sign and not usage.key_encipherment, usage
        constraints = pq_issuing.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert constraints.ca and constraints.path_length == 0, constraints
        return f"{pq_root.subject.rfc4514_string()} → {pq_issuing.subject.rfc4514_string()}, ML-DSA-65, pathLen 0"
    check("`mutual init --key-type ml-dsa-65`: the ML-DSA root and issuing CA verify, CA key usage only", hierarchy)

    def workload():
        chain = pems(f"{d}/client/chain.pem")
        leaf = chain[0]
        assert leaf.signature_algorithm_oid.dotted_string == MLDSA65
        assert isinstance(leaf.public_key(), mldsa.MLDSA65PublicKey)
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and not usage.key_encipherment and not usage.key_agreement, usage
        verifier = verification.PolicyBuilder().store(verification.Store([pq_root])).time(now).build_client_verifier()
        verified = verifier.verify(leaf, chain[1:])
        uris = verified.subjects[0].value if verified.subjects else None
        assert len(verified.chain) == 3, len(verified.chain)
        key = serialization.load_pem_private_key(open(f"{d}/client/key.pem", "rb").read(), password=None)
        assert isinstance(key, mldsa.MLDSA65PrivateKey), type(key)
        assert key.public_key() == leaf.public_key(), "key.pem is not the certificate's key"
        return f"client verifier: {uris}, key.pem (PKCS#8 seed) matches"
    check("`mutual issue --key-type ml-dsa-65 --profile workload`: PolicyBuilder's client verifier accepts root → issuing → leaf", workload)

    for name, variant, dns in (("server", mldsa.MLDSA65PublicKey, "localhost"), ("server87", mldsa.MLDSA87PublicKey, "pq87.example.org")):
        def server(name=name, variant=variant, dns=dns):
            chain = pems(f"{d}/{name}/chain.pem")
            assert isinstance(chain[0].public_key(), variant), type(chain[0].public_key())
            verifier = verification.PolicyBuilder().store(verification.Store([pq_root])).time(now).build_server_verifier(x509.DNSName(dns))
            built = verifier.verify(chain[0], chain[1:])
            return f"{type(chain[0].public_key()).__name__} leaf for {dns}, chain of {len(built)}"
        check(f"`mutual issue --key-type {'ml-dsa-65' if name == 'server' else 'ml-dsa-87'} --profile server`: PolicyBuilder's server verifier accepts it", server)

    def signed():
        cert = pems(f"{d}/signed.pem")[0]
        cert.verify_directly_issued_by(pq_issuing)
        key = serialization.load_pem_private_key(open(f"{d}/csr-key.pem", "rb").read(), password=None)
        assert cert.public_key() == key.public_key(), "the certificate is not for the CSR's key"
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        assert names == ["csr.example.org"], names
        return "ML-DSA-65 CSR from python → `mutual sign` → certificate for that key, SAN csr.example.org"
    check("`mutual sign` with an ML-DSA CSR made by python cryptography", signed)

    def crl():
        revocations = x509.load_der_x509_crl(open(f"{d}/pq.crl", "rb").read())
        assert revocations.signature_algorithm_oid.dotted_string == MLDSA65, revocations.signature_algorithm_oid
        assert revocations.is_signature_valid(pq_issuing.public_key()), "signature does not verify under the ML-DSA issuing CA"
        assert revocations.issuer == pq_issuing.subject
        revoked = pems(f"{d}/server87/cert.pem")[0]
        entry = revocations.get_revoked_certificate_by_serial_number(revoked.serial_number)
        assert entry is not None, "the revoked certificate is not listed"
        live = pems(f"{d}/client/cert.pem")[0]
        assert revocations.get_revoked_certificate_by_serial_number(live.serial_number) is None, "a valid certificate is listed"
        classical = x509.load_der_x509_crl(open(f"{d}/classical.crl", "rb").read())
        assert classical.get_revoked_certificate_by_serial_number(revoked.serial_number) is None, "the classical CRL lists an ML-DSA certificate"
        dp = revoked.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
        assert dp.endswith("/pq/crl"), dp
        return f"GET /pq/crl: ML-DSA-65 signature valid, the revoked ML-DSA-87 leaf listed, classical /crl does not list it; CRL DP {dp}"
    check("the ML-DSA issuing CA's CRL (`/pq/crl`) after `mutual revoke`", crl)

    def bundle():
        roots = pems(f"{d}/pq-roots.pem")
        assert [r.fingerprint(hashes.SHA256()) for r in roots] == [classical_root.fingerprint(hashes.SHA256()), pq_root.fingerprint(hashes.SHA256())]
        only = pems(f"{d}/roots.pem")
        assert len(only) == 1 and only[0] == classical_root
        return "/pq/roots.pem = classical root + ML-DSA root; /roots.pem unchanged (classical only)"
    check("trust bundles for the migration", bundle)
    if base:
        check("OCSP (`POST /ocsp`) for ML-DSA certificates, asked and checked by python cryptography", lambda: ocsp_check(base, d, pq_issuing))
    print(f"ML-DSA CLI outputs (python cryptography): {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


def context(side, cert, key, ca):
    from OpenSSL import SSL
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD if side == "client" else SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_chain_file(cert)
    ctx.use_privatekey_file(key)
    ctx.load_verify_locations(ca)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda conn, cert, errno, depth, ok: bool(ok))
    return ctx


def client(host, port, cert, key, ca, path):
    from OpenSSL import SSL
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.settimeout(None)  # pyOpenSSL wants a blocking socket (a timeout makes it non-blocking: WantReadError)
    conn = SSL.Connection(context("client", cert, key, ca), sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    conn.do_handshake()
    peer = conn.get_peer_certificate(as_cryptography=True)
    summary = {
        "version": conn.get_protocol_version_name(), "group": conn.get_group_name(),
        "server_signature": peer.signature_algorithm_oid.dotted_string, "server_key": type(peer.public_key()).__name__,
    }
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    summary["status"] = int(head.split(b" ")[1]) if head else 0
    summary["body"] = body.decode(errors="replace")
    print(json.dumps(summary))


def loop(host, port, out, ca, seconds, result):
    """Calls through the proxy as the agent's identity while the agent renews: every request uses the key and chain of
    the version `current` points at then (one directory, so never a key of one version with a chain of another)."""
    import os
    import time
    deadline = time.monotonic() + float(seconds)
    total, failures, by_key, errors = 0, 0, {}, []
    while time.monotonic() < deadline:
        version = os.path.realpath(f"{out}/current")
        leaf = x509.load_pem_x509_certificates(open(f"{version}/chain.pem", "rb").read())[0]
        kind = type(leaf.public_key()).__name__
        total += 1
        try:
            import io, contextlib
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                client(host, port, f"{version}/chain.pem", f"{version}/key.pem", ca, "/whoami")
            answer = json.loads(buffer.getvalue())
            if answer["status"] != 200:
                raise RuntimeError(f"HTTP {answer['status']}")
            by_key[kind] = by_key.get(kind, 0) + 1
        except Exception as error:  # every failure counts; the first few are kept for the report
            failures += 1
            if len(errors) < 5:
                errors.append(f"{kind}: {type(error).__name__}: {error}")
        time.sleep(0.1)
    open(result, "w").write(json.dumps({"total": total, "failures": failures, "by_key": by_key, "errors": errors}))


def server(port, cert, key, ca, ready):
    from OpenSSL import SSL
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(port)))
    listener.listen(16)
    open(ready, "w").write("ready")
    ctx = context("server", cert, key, ca)
    while True:
        raw, _ = listener.accept()
        raw.settimeout(None)
        conn = SSL.Connection(ctx, raw)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            peer = conn.get_peer_certificate(as_cryptography=True)
            uris = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                request += chunk
            body = json.dumps({"group": conn.get_group_name(), "client_uri": uris, "client_key": type(peer.public_key()).__name__,
                               "client_signature": peer.signature_algorithm_oid.dotted_string}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            conn.shutdown()
        except Exception as error:  # a refused handshake is reported, and the server keeps serving
            print(f"handshake refused: {error}", file=sys.stderr, flush=True)
        finally:
            raw.close()


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "make-csr":
        make_csr(sys.argv[2])
    elif command == "check":
        run_checks(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    elif command == "client":
        client(*sys.argv[2:8])
    elif command == "loop":
        loop(*sys.argv[2:8])
    elif command == "server":
        server(*sys.argv[2:7])
