"""Peers for scripts/interop-proxy.sh: an echo backend, a PROXY v2 backend, and TLS clients that measure.

Every server binds port 0 on 127.0.0.1 and prints its port on the first line of stdout.
"""
import http.client
import http.server
import json
import socket
import ssl
import struct
import sys
import threading
import time


def echo_backend():
    """HTTP/1.1 keep-alive backend that answers with the path and the headers it received (JSON)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def read_chunked(self):
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while True:
                        line = self.rfile.readline()
                        if line in (b"\r\n", b"\n", b""):
                            return body
                        name, _, value = line.decode(errors="replace").partition(":")
                        self.trailers.append([name.strip().lower(), value.strip()])
                body += self.rfile.read(size)
                self.rfile.readline()

        def handle_any(self):
            self.trailers = []
            length = int(self.headers.get("content-length") or 0)
            if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
                body_in = self.read_chunked()
            elif "/slow-upload" in self.path:
                # A slow consumer: reads the request body at about 16 MiB/s, 64 KiB at a time.
                got = 0
                while got < length:
                    got += len(self.rfile.read(min(65536, length - got)))
                    time.sleep(0.004)
                body_in = b"\0" * got
            else:
                body_in = self.rfile.read(length) if length else b""
            if "/chunked/" in self.path:
                # A chunked response of N chunks and a trailer, as a streaming backend sends it.
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for i in range(int(self.path.rsplit("/", 1)[1])):
                    piece = ("chunk-%d;" % i).encode()
                    self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\nx-trailer: done\r\n\r\n")
                return
            if "/close-delimited" in self.path:
                # No length: the body ends when the backend closes the connection.
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.end_headers()
                self.wfile.write(b"until the backend closes")
                self.close_connection = True
                return
            if "/malformed" in self.path:
                # Content-Length and Transfer-Encoding together: a response no proxy can frame without guessing.
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello")
                self.close_connection = True
                return
            if "/big/" in self.path:
                # A large body, written as fast as the socket takes it: N bytes in 64 KiB chunks.
                size = int(self.path.rsplit("/", 1)[1])
                self.send_response(200)
                self.send_header("content-type", "application/octet-stream")
                self.send_header("content-length", str(size))
                self.end_headers()
                chunk = b"x" * 65536
                while size > 0:
                    self.wfile.write(chunk[:size])
                    size -= len(chunk)
                return
            body = json.dumps({
                "path": self.path, "method": self.command, "body_bytes": len(body_in),
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "all_headers": [[k.lower(), v] for k, v in self.headers.items()],
                "trailers": self.trailers,
            }).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


def proxy_v2_backend():
    """Reads a PROXY v2 header, answers with its decoded fields as one JSON line, then echoes the stream."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)

    def serve(conn):
        with conn:
            head = conn.recv(16, socket.MSG_WAITALL)
            if len(head) < 16 or head[:12] != b"\r\n\r\n\x00\r\nQUIT\n":
                conn.sendall(b'{"error":"no PROXY v2 signature"}\n')
                return
            ver_cmd, family, length = head[12], head[13], struct.unpack("!H", head[14:16])[0]
            rest = conn.recv(length, socket.MSG_WAITALL)
            info = {"version_command": ver_cmd, "family": family}
            offset = 0
            if family == 0x11:
                info["source"] = "%s:%d" % (socket.inet_ntoa(rest[0:4]), struct.unpack("!H", rest[8:10])[0])
                info["destination"] = "%s:%d" % (socket.inet_ntoa(rest[4:8]), struct.unpack("!H", rest[10:12])[0])
                offset = 12
            tlvs = {}
            while offset + 3 <= len(rest):
                kind, size = rest[offset], struct.unpack("!H", rest[offset + 1:offset + 3])[0]
                value = rest[offset + 3:offset + 3 + size]
                offset += 3 + size
                if kind == 0x20:
                    ssl_info = {"client": value[0], "verify": struct.unpack("!I", value[1:5])[0]}
                    sub = 5
                    while sub + 3 <= len(value):
                        t, n = value[sub], struct.unpack("!H", value[sub + 1:sub + 3])[0]
                        ssl_info["0x%02x" % t] = value[sub + 3:sub + 3 + n].decode(errors="replace")
                        sub += 3 + n
                    tlvs["ssl"] = ssl_info
                elif kind == 0xE0:
                    tlvs["client_cert_der_bytes"] = len(value)
                else:
                    tlvs["0x%02x" % kind] = value.decode(errors="replace")
            info["tlvs"] = tlvs
            conn.sendall((json.dumps(info) + "\n").encode())
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def tls_context(ca, cert=None, key=None):
    # The files may be replaced (agent rotation) between reading the certificate and the key; a mismatched read is
    # retried, as any client that reloads its credentials must.
    for attempt in range(5):
        try:
            context = ssl.create_default_context(cafile=ca)
            context.check_hostname = False
            if cert:
                context.load_cert_chain(cert, key)
            return context
        except (ssl.SSLError, OSError):
            if attempt == 4:
                raise
            time.sleep(0.05)


def load(port, ca, cert, key, seconds, out):
    """Requests as fast as one connection allows for `seconds`, opening a new connection every 20 requests (so new
    handshakes meet rotated credentials) and writing {"ok": n, "failed": n, "errors": [...]} to `out`."""
    ok = failed = 0
    errors = []
    deadline = time.time() + float(seconds)
    conn = None
    count = 0
    while time.time() < deadline:
        try:
            if conn is None or count % 20 == 0:
                if conn:
                    conn.close()
                conn = http.client.HTTPSConnection("127.0.0.1", int(port), context=tls_context(ca, cert, key), timeout=5)
            conn.request("GET", "/load/%d" % count)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                ok += 1
            else:
                failed += 1
                errors.append("HTTP %d" % response.status)
        except Exception as error:  # every failure counts; the proof is zero of them
            failed += 1
            errors.append(repr(error))
            conn = None
            time.sleep(0.01)
        count += 1
    with open(out, "w") as handle:
        json.dump({"ok": ok, "failed": failed, "errors": errors[:20]}, handle)


def hold(port, ca, cert, key, out):
    """Opens one mTLS keep-alive connection, makes a request, then waits until the proxy closes it; writes the
    seconds from the first request to the close (or "open" after 20 s) to `out`. A line "ready" goes to stdout once
    the first request succeeded."""
    sock = socket.create_connection(("127.0.0.1", int(port)))
    tls = tls_context(ca, cert, key).wrap_socket(sock)
    tls.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
    data = tls.recv(65536)
    if b"200 OK" not in data:
        with open(out, "w") as handle:
            handle.write("first request failed: %r" % data[:200])
        return
    print("ready", flush=True)
    tls.settimeout(20)
    try:
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
    except (ssl.SSLError, OSError):
        pass
    except socket.timeout:
        with open(out, "w") as handle:
            handle.write("open")
        return
    with open(out, "w") as handle:
        handle.write("%.3f" % time.time())


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "echo":
        echo_backend()
    elif command == "proxyv2":
        proxy_v2_backend()
    elif command == "load":
        load(*sys.argv[2:8])
    elif command == "hold":
        hold(*sys.argv[2:7])
    else:
        sys.exit("unknown command " + command)
