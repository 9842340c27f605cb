"""Peers for scripts/interop-gateway.sh: the attacks of issue #13 from outside, against a real `mutual proxy`.

Every server binds port 0 on 127.0.0.1 and prints its port on the first line of stdout. Every client loop is bounded
in count and time.
"""
import json
import os
import socket
import ssl
import sys
import threading
import time
import http.server
import urllib.parse


def lenient_backend(log_path):
    """A backend that reads paths the way lenient frameworks do: percent-decoded, ;parameters dropped from each
    segment (Tomcat), letters case-folded (Express). Every path it routes is appended to log_path; it answers
    200 with that canonical path."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_any(self):
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            raw = self.path.split("?", 1)[0]
            segments = [s.split(";", 1)[0] for s in raw.split("/")]
            canonical = urllib.parse.unquote("/".join(segments)).lower()
            with open(log_path, "a") as log:
                log.write(json.dumps({"raw": self.path, "canonical": canonical,
                                      "xfcc": self.headers.get_all("x-forwarded-client-cert") or [],
                                      "headers": [[k.lower(), v] for k, v in self.headers.items()]}) + "\n")
            body = canonical.encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass  # a client (the proxy) closing a pooled connection is not worth a traceback

    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def tls_context(ca, cert=None, key=None, alpn=None):
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    if cert:
        context.load_cert_chain(cert, key)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def raw_request(port, ca, cert, key, target, extra=b""):
    """One request with a request target sent byte for byte (what curl would normalize). Prints the status."""
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as raw:
        with tls_context(ca, cert, key).wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + extra + b"\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
            print(data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed")


def parse_xfcc(text):
    """A strict parser of Envoy's XFCC grammar: elements split on unquoted ',', pairs on unquoted ';', KEY=VALUE with
    VALUE optionally quoted ('\\' escapes '"' and '\\'). Raises ValueError on anything else."""
    elements, pairs = [], []
    key, value, in_key, quoted, was_quoted = "", "", True, False, False
    i = 0

    def end_pair():
        nonlocal key, value, in_key, was_quoted
        if not key or in_key or key not in ("By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS"):
            raise ValueError("bad pair %r" % key)
        pairs.append((key, value))
        key, value, in_key, was_quoted = "", "", True, False

    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
                if i >= len(text):
                    raise ValueError("dangling escape")
                value += text[i]
            elif c == '"':
                quoted, was_quoted = False, True
            else:
                value += c
        elif c == "=" and in_key:
            in_key = False
        elif c == '"' and not in_key and value == "" and not was_quoted:
            quoted = True
        elif c == ";":
            end_pair()
        elif c == ",":
            end_pair()
            elements.append(pairs)
            pairs = []
        else:
            if was_quoted or c in '"=\\' or ord(c) < 0x20:
                raise ValueError("unexpected %r at %d" % (c, i))
            if in_key:
                key += c
            else:
                value += c
        i += 1
    if quoted:
        raise ValueError("unterminated quote")
    end_pair()
    elements.append(pairs)
    return elements


def check_xfcc(log_path, expected_uri):
    """The last request the backend saw carries one XFCC header with exactly one element whose URI is expected_uri."""
    entry = json.loads(open(log_path).read().strip().splitlines()[-1])
    assert len(entry["xfcc"]) == 1, entry["xfcc"]
    elements = parse_xfcc(entry["xfcc"][0])
    assert len(elements) == 1, "%d elements: %s" % (len(elements), entry["xfcc"][0][:300])
    keys = [k for k, _ in elements[0]]
    assert keys.count("By") == 1 and keys.count("URI") == 1, keys
    uri = dict(elements[0])["URI"]
    assert uri == expected_uri, uri
    print("one element, URI=%s" % uri)


def siege(port, ca, cert, key, idle, slow, seconds, good_out):
    """`idle` TCP sockets that never send a byte, `slow` mTLS connections that dribble a request head one byte a
    second, and meanwhile one good client making a request every 100 ms for `seconds`. Writes "ok failed" counts of
    the good client's requests to good_out."""
    port = int(port)
    held = []
    for _ in range(int(idle)):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            pass
    stop = time.time() + float(seconds)

    def dribble():
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            tls = tls_context(ca, cert, key).wrap_socket(raw, server_hostname="localhost")
            tls.settimeout(2)
            head = b"GET /slow HTTP/1.1\r\nHost: localhost\r\n" + b"X-Pad: " + b"a" * 200
            for byte in head:
                if time.time() > stop:
                    break
                tls.sendall(bytes([byte]))
                time.sleep(1)
        except OSError:
            pass

    threads = [threading.Thread(target=dribble, daemon=True) for _ in range(int(slow))]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    good, failed = 0, 0
    context = tls_context(ca, cert, key)
    while time.time() < stop:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /ok HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    data = tls.recv(4096)
                    if data.startswith(b"HTTP/1.1 200"):
                        good += 1
                    else:
                        failed += 1
        except OSError:
            failed += 1
        time.sleep(0.1)
    for sock in held:
        sock.close()
    with open(good_out, "w") as out:
        out.write("%d %d" % (good, failed))


def h2_checks(port, ca, cert, key):
    """HTTP/2 refusals, with the `h2` library: CONNECT → 405, host ≠ :authority → 400, a header with CR/LF → refused
    (and never logged raw), 10,000 headers → 431, a good request → 200. Prints one line per check."""
    import h2.config
    import h2.connection
    import h2.events

    def exchange(headers, validate=True, warmup=None, then=None):
        """Sends `headers` as one request; with `warmup`, first a request whose answer is awaited (by then the
        SETTINGS exchange is done) on the same connection. Returns the status, or how the stream/connection ended."""
        raw = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
        tls = tls_context(ca, cert, key, alpn=["h2"]).wrap_socket(raw, server_hostname="localhost")
        assert tls.selected_alpn_protocol() == "h2"
        config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=validate,
                                           normalize_outbound_headers=validate, validate_inbound_headers=False)
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        tls.sendall(conn.data_to_send())

        def run(stream, block):
            conn.send_headers(stream, block, end_stream=True)
            tls.sendall(conn.data_to_send())
            status, reset, goaway = None, None, None
            deadline = time.time() + 5
            while time.time() < deadline and status is None and reset is None and goaway is None:
                data = tls.recv(65536)
                if not data:
                    return "closed"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                        status = dict(event.headers).get(b":status", b"").decode()
                    elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                        reset = event.error_code
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        goaway = event.error_code
                tls.sendall(conn.data_to_send())
            return status or ("reset %s" % reset if reset is not None else "goaway %s" % goaway if goaway is not None else "none")

        stream = 1
        if warmup:
            run(1, warmup)
            stream = 3
        result = run(stream, headers)
        if then:
            result += " then " + run(stream + 2, then)
        tls.close()
        return result

    base = [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/h2")]
    print("good", exchange(base))
    print("connect", exchange([(":method", "CONNECT"), (":authority", "internal.admin:443")], validate=False))
    print("host", exchange(base + [("host", "admin.internal")], validate=False))
    print("crlf", exchange(base + [("x-evil", "a\r\nnotice mutual.proxy: forged line")], validate=False))
    print("headers", exchange(base + [("x-h%d" % i, "v") for i in range(10000)], warmup=base, then=base))
    print("count", exchange(base + [("x-h%d" % i, "v") for i in range(200)]))


def h2_idle(port, ca, cert, key, limit):
    """One HTTP/2 request, then silence: prints how many seconds passed until the proxy ended the connection (GOAWAY
    or close), or "open" after `limit` seconds."""
    import h2.config
    import h2.connection
    import h2.events
    raw = socket.create_connection(("127.0.0.1", int(port)), timeout=float(limit))
    tls = tls_context(ca, cert, key, alpn=["h2"]).wrap_socket(raw, server_hostname="localhost")
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", "/idle")], end_stream=True)
    tls.sendall(conn.data_to_send())
    start, done = None, False
    deadline = time.time() + float(limit)
    while time.time() < deadline:
        try:
            data = tls.recv(65536)
        except (ssl.SSLError, OSError):
            break
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.StreamEnded):
                start, done = time.time(), True
            elif isinstance(event, h2.events.ConnectionTerminated):
                deadline = 0
        tls.sendall(conn.data_to_send())
    print("%.1f" % (time.time() - start) if done and time.time() < start + float(limit) else "open")


def bad_preface(port, ca, cert, key):
    """ALPN h2 then garbage instead of the connection preface: expects GOAWAY and then the connection closed."""
    raw = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
    tls = tls_context(ca, cert, key, alpn=["h2"]).wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
    received = b""
    deadline = time.time() + 5
    closed = False
    while time.time() < deadline:
        try:
            data = tls.recv(4096)
        except (ssl.SSLError, OSError):
            closed = True
            break
        if not data:
            closed = True
            break
        received += data
    frame_types, index = [], 0
    while index + 9 <= len(received):
        length = int.from_bytes(received[index:index + 3], "big")
        frame_types.append(received[index + 3])
        index += 9 + length
    print("goaway" if 7 in frame_types else "no-goaway", "closed" if closed else "open")


def expiring(port, ca, cert, key, not_after):
    """A keep-alive connection with a certificate that expires at `not_after` (epoch seconds): one request before,
    one after. Prints the two outcomes."""
    raw = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
    tls = tls_context(ca, cert, key).wrap_socket(raw, server_hostname="localhost")
    tls.settimeout(5)
    outcomes = []
    for phase in ("before", "after"):
        if phase == "after":
            time.sleep(max(0, float(not_after) - time.time()) + 1.2)
        try:
            tls.sendall(b"GET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = tls.recv(4096)
            outcomes.append(data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed")
        except (ssl.SSLError, OSError):
            outcomes.append("closed")
    print(" ".join(outcomes))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "backend":
        lenient_backend(*args)
    elif command == "raw":
        raw_request(args[0], args[1], args[2], args[3], args[4].encode("latin-1").decode("unicode_escape").encode("latin-1"))
    elif command == "xfcc":
        check_xfcc(*args)
    elif command == "siege":
        siege(*args)
    elif command == "h2":
        h2_checks(*args)
    elif command == "h2idle":
        h2_idle(*args)
    elif command == "preface":
        bad_preface(*args)
    elif command == "expiring":
        expiring(*args)
    else:
        sys.exit("unknown command " + command)
