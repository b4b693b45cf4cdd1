#!/usr/bin/python3
"""A receiver of walletd's event webhooks, with Python's standard library only.

    webhook_receiver.py [--host 127.0.0.1] [--port 8080] --secret-file FILE

It acts on an event only when
- one of the `v1,` signatures in `webhook-signature` is the HMAC-SHA256 of
  "webhook-id.webhook-timestamp.body" with a line of FILE (the old and the new
  secret while one is rotated; a `whsec_` line is base64, as walletd reads it),
- `webhook-timestamp` is within 5 minutes of this machine's clock (a request
  captured and sent again later is refused), and
- its `webhook-id` was not acted on before: walletd sends an event again, with
  the same id, when it did not get the answer, so a repeated id is answered
  200 and not acted on again.
Each event acted on is printed as one line of JSON; put your own handling in
`act`.  The ids seen are kept in memory for the 5 minutes a timestamp is
accepted; a receiver that runs on several hosts keeps them in its database.
"""
import argparse
import base64
import hashlib
import hmac
import http.server
import json
import sys
import threading
import time

TOLERANCE = 5 * 60


def key_of(line):
    """The HMAC key of a secret line: a Standard Webhooks secret ("whsec_" and base64) is the bytes it encodes."""
    if line.startswith("whsec_"):
        try:
            return base64.b64decode(line[6:], validate=True)
        except ValueError:
            pass
    return line.encode()


class Verifier:
    def __init__(self, secrets):
        self.keys = [key_of(s) for s in secrets]
        self.seen = {}  # webhook-id -> when it was acted on
        self.lock = threading.Lock()

    def check(self, headers, body, now=None):
        """Returns None when the request is authentic and fresh, else (HTTP status, why not)."""
        now = time.time() if now is None else now
        msg_id, stamp, signatures = (headers.get(h) for h in ("webhook-id", "webhook-timestamp",
                                                               "webhook-signature"))
        if not (msg_id and stamp and signatures):
            return 400, "missing webhook-id, webhook-timestamp or webhook-signature"
        try:
            sent = int(stamp)
        except ValueError:
            return 400, "webhook-timestamp is not a number"
        if abs(now - sent) > TOLERANCE:
            return 400, "webhook-timestamp is more than 5 minutes away"
        content = b"%s.%s.%s" % (msg_id.encode(), stamp.encode(), body)
        expected = [base64.b64encode(hmac.new(k, content, hashlib.sha256).digest()).decode() for k in self.keys]
        given = [s[3:] for s in signatures.split() if s.startswith("v1,")]
        if not any(hmac.compare_digest(g, e) for g in given for e in expected):
            return 401, "no valid signature"
        return None

    def first_time(self, msg_id, now=None):
        """Whether msg_id is new (and notes it); forgets ids older than the tolerance."""
        now = time.time() if now is None else now
        with self.lock:
            for old in [i for i, t in self.seen.items() if now - t > 2 * TOLERANCE]:
                del self.seen[old]
            if msg_id in self.seen:
                return False
            self.seen[msg_id] = now
            return True


def act(event):
    """What the receiver does with an event: here, print it."""
    print(json.dumps(event, sort_keys=True), flush=True)


def handler(verifier):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            refused = verifier.check(self.headers, body)
            if refused:
                return self.answer(*refused)
            if not verifier.first_time(self.headers["webhook-id"]):
                return self.answer(200, "already done")
            act(json.loads(body))
            self.answer(200, "ok")

        def answer(self, status, text):
            data = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            sys.stderr.write("webhook_receiver: " + fmt % args + "\n")
    return Handler


def main():
    ap = argparse.ArgumentParser(description="Receives walletd's event webhooks, checked.")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (behind a TLS proxy)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--secret-file", required=True, help="walletd's webhook_secret_file (one or two lines)")
    args = ap.parse_args()
    with open(args.secret_file) as f:
        secrets = [line.strip() for line in f if line.strip()][:2]
    server = http.server.ThreadingHTTPServer((args.host, args.port), handler(Verifier(secrets)))
    print("listening on %s:%d" % (args.host, args.port), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
