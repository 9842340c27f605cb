"""Orders per second completed end to end against one `mutual serve --acme`: THREADS accounts (python `acme`, the
library certbot is built on), each looping new order -> http-01 -> finalize -> certificate for DURATION seconds.
The http-01 answers come from one in-process HTTP server on the validator's port.
Usage: acme_orders.py DIRECTORY_URL ROOT_PEM HTTP_PORT THREADS DURATION
Prints one JSON line: orders, seconds, orders_per_second, failures, p50/p95 latency in ms."""
import http.server, json, statistics, sys, threading, time
import josepy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from acme import challenges, client, crypto_util, messages

directory_url, root, http_port, threads, duration = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
answers, lock = {}, threading.Lock()

class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with lock: body = answers.get(self.path)
        self.send_response(200 if body else 404); self.end_headers()
        if body: self.wfile.write(body.encode())
    def log_message(self, *a): pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", http_port), Answer)
threading.Thread(target=server.serve_forever, daemon=True).start()

def account():
    key = josepy.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    net = client.ClientNetwork(key, alg=josepy.ES256, verify_ssl=root, user_agent="mutual-bench")
    directory = messages.Directory.from_json(net.get(directory_url).json())
    acme = client.ClientV2(directory, net=net)
    acme.new_account(messages.NewRegistration.from_data(terms_of_service_agreed=True))
    return acme

latencies, failures = [], [0]
def worker(index, stop_at):
    acme = account()
    name = "localhost"
    while time.time() < stop_at:
        started = time.time()
        try:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            order = acme.new_order(crypto_util.make_csr(pem, [name]))
            for authz in order.authorizations:
                challb = next(c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01))
                response, validation = challb.chall.response_and_validation(acme.net.key)
                with lock: answers["/" + challb.chall.path.lstrip("/")] = validation
                acme.answer_challenge(challb, response)
            acme.poll_and_finalize(order, deadline=None)
            with lock: latencies.append(time.time() - started)
        except Exception as error:
            with lock: failures[0] += 1
            print("failure:", error, file=sys.stderr)

start = time.time()
stop_at = start + duration
workers = [threading.Thread(target=worker, args=(i, stop_at)) for i in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
elapsed = time.time() - start
lat = sorted(latencies)
print(json.dumps({
    "orders": len(lat), "seconds": round(elapsed, 1), "orders_per_second": round(len(lat) / elapsed, 1), "failures": failures[0],
    "p50_ms": round(statistics.median(lat) * 1000) if lat else None, "p95_ms": round(lat[int(len(lat) * 0.95) - 1] * 1000) if lat else None,
}))
