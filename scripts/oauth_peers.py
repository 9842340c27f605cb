"""Independent RFC 8705 peers for scripts/interop-oauth.sh, written from the RFCs, not from Mutual's code.

  token AUTHORITY CERT KEY CA AUDIENCE SCOPE        requests: client_credentials over mTLS; prints the access token
  rs PORT CERT KEY CA AUTHORITY AUDIENCE            a resource server: stdlib ssl (client certificate required) and
                                                    pyjwt; accepts a token only on a connection whose certificate's
                                                    SHA-256 thumbprint is the token's cnf.x5t#S256 (RFC 8705 3.1)
  call URL CERT KEY CA TOKEN [METHOD]               requests with a client certificate and a bearer token; prints
                                                    "STATUS <www-authenticate> <body>"
  forge KIND STATEDIR TOKEN                         a token an attacker or a broken issuer would send (see forge())
  echo PORT                                         the app behind the proxy: GET answers the request's headers as
                                                    JSON, POST echoes the body
  steady URL AUTHORITY CERT KEY CA SECONDS OUT      calls through the proxy for SECONDS with a fresh token every
                                                    half second (POST with a body); writes "requests failures kids"
"""
import base64
import glob
import hashlib
import hmac
import http.server
import json
import ssl
import sys
import threading
import time

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def get_token(authority, cert, key, ca, audience, scope):
    response = requests.post(
        authority + "/oauth2/token",
        data={"grant_type": "client_credentials", "audience": audience, "scope": scope},
        cert=(cert, key), verify=ca, timeout=10,
    )
    if response.status_code != 200:
        raise SystemExit(f"token endpoint: {response.status_code} {response.text}")
    body = response.json()
    assert body["token_type"] == "Bearer", body
    return body["access_token"]


def resource_server(port, cert, key, ca, authority, audience):
    metadata = requests.get(authority + "/.well-known/oauth-authorization-server", verify=ca, timeout=10).json()
    assert metadata["tls_client_certificate_bound_access_tokens"] is True
    jwks = requests.get(metadata["jwks_uri"], verify=ca, timeout=10).json()
    keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
    issuer = metadata["issuer"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            der = self.connection.getpeercert(binary_form=True)
            thumbprint = b64url(hashlib.sha256(der).digest())
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return self.answer(401, "no token")
            token = auth[len("Bearer "):]
            try:
                kid = jwt.get_unverified_header(token)["kid"]
                claims = jwt.decode(token, keys[kid].key, algorithms=["ES256"], audience=audience, issuer=issuer)
            except Exception as error:  # noqa: BLE001 - any failure is a refusal
                return self.answer(401, f"invalid token: {type(error).__name__}")
            if claims.get("cnf", {}).get("x5t#S256") != thumbprint:
                return self.answer(401, "certificate mismatch")
            return self.answer(200, "hello " + claims["sub"])

        def answer(self, status, text):
            body = text.encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(ca)
    context.verify_mode = ssl.CERT_REQUIRED
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("listening", flush=True)
    server.serve_forever()


def call(url, cert, key, ca, token, method="GET"):
    headers = {"Authorization": "Bearer " + token} if token else {}
    response = requests.request(method, url, headers=headers, cert=(cert, key), verify=ca, timeout=10,
                                data=b"x" * 1000 if method == "POST" else None)
    print(response.status_code, response.headers.get("www-authenticate", "-"), response.text.strip())


def signer_key(state):
    """The authority's current signing key, read from its state directory: what a stolen-key attacker would hold."""
    listing = json.load(open(state + "/oauth/keys.json"))["keys"]
    entry = [k for k in listing if k.get("file")][-1]
    with open(state + "/oauth/" + entry["file"], "rb") as f:
        return entry["kid"], serialization.load_pem_private_key(f.read(), password=None)


def forge(kind, state, token):
    """A token that must be refused: the claims of a real token, changed as KIND says, signed (or not) as KIND says."""
    claims = json.loads(unb64url(token.split(".")[1]))
    kid, key = signer_key(state)
    now = int(time.time())
    if kind == "expired":
        claims.update(exp=now - 3600, nbf=now - 7200, iat=now - 7200)
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
    if kind == "wrong-audience":
        claims["aud"] = "another-service"
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
    if kind == "no-scope":
        claims["scope"] = "write"
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
    if kind == "unknown-kid":
        other = ec.generate_private_key(ec.SECP256R1())
        return jwt.encode(claims, other, algorithm="ES256", headers={"kid": "attacker-key"})
    if kind == "alg-none":
        header = {"alg": "none", "typ": "at+jwt", "kid": kid}
        return b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode()) + "."
    if kind == "hs256-public-key":
        # The public key (as published, PEM) used as an HMAC secret: pyjwt refuses to do this, so by hand (RFC 7515).
        public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        header = b64url(json.dumps({"alg": "HS256", "typ": "at+jwt", "kid": kid}).encode())
        payload = b64url(json.dumps(claims).encode())
        mac = hmac.new(public, (header + "." + payload).encode(), hashlib.sha256).digest()
        return header + "." + payload + "." + b64url(mac)
    raise SystemExit("unknown forgery " + kind)


def steady(url, authority, cert, key, ca, seconds, out):
    # verify= on every call: a Session's own verify loses to REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in the environment.
    session = requests.Session()
    deadline = time.time() + seconds
    requests_made = failures = 0
    kids = set()
    token, fetched = None, 0.0
    failure_lines = []
    while time.time() < deadline:
        try:
            if token is None or time.time() - fetched > 0.5:
                token = get_token(authority, cert, key, ca, "payments", "read")
                fetched = time.time()
                kids.add(jwt.get_unverified_header(token)["kid"])
            response = session.post(url, headers={"Authorization": "Bearer " + token}, data=b"y" * 2000, timeout=10,
                                    cert=(cert, key), verify=ca)
            requests_made += 1
            if response.status_code != 200 or response.text.count("y") != 2000:
                failures += 1
                failure_lines.append(f"{response.status_code} {response.text[:200]}")
        except Exception as error:  # noqa: BLE001
            requests_made += 1
            failures += 1
            failure_lines.append(repr(error)[:200])
        time.sleep(0.01)
    with open(out, "w") as f:
        f.write(f"{requests_made} {failures} {len(kids)}\n")
        f.write("\n".join(failure_lines[:10]) + "\n")


def echo(port):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.answer(json.dumps({k.lower(): v for k, v in self.headers.items()}).encode())

        def do_POST(self):
            self.answer(self.rfile.read(int(self.headers.get("content-length", "0"))))

        def answer(self, body):
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "token":
        print(get_token(*args))
    elif command == "rs":
        resource_server(int(args[0]), *args[1:])
    elif command == "call":
        call(*args)
    elif command == "forge":
        print(forge(*args))
    elif command == "echo":
        echo(int(args[0]))
    elif command == "steady":
        steady(args[0], args[1], args[2], args[3], args[4], float(args[5]), args[6])
    else:
        raise SystemExit(__doc__)
