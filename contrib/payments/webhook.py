#!/usr/bin/python3
"""Payment webhook receiver for walletd: Flutterwave and Paystack.

Gateways POST here when a customer pays a checkout that walletd's
topup.create issued (the top-up ref is the gateway's tx_ref / reference).
A good signature and a successful payment call topup.confirm, which credits
the wallet exactly once however often the gateway retries.  A bad signature
is answered 401 and changes nothing.  A failed attempt changes nothing
either: the customer may pay again on the same checkout.

A real, successful payment that walletd did not credit is never answered
2xx: 503 when walletd cannot take it now (unreachable, a full store, busy),
500 when it refused it (no_fx_rate for a currency it cannot convert, say),
so the gateway sends the event again until staff fix the cause.  Only what
retrying can never change is answered 2xx: a failed payment, or a ref that
is not walletd's (unknown_topup).  Every delivery is logged in one line:
gateway, ref, amount, outcome.

    POST /flutterwave   header verif-hash: the secret hash set in the dashboard
    POST /paystack      header x-paystack-signature: HMAC-SHA512(secret key, body)
    GET  /health        200 "ok" while walletd answers, else 503: for a load balancer

Environment:
    WALLETD_SOCKET        walletd's socket (run this as a user of the payments role)
    FLW_SECRET_HASH       Flutterwave: Settings > Webhooks > Secret hash
    PAYSTACK_SECRET_KEY   Paystack: Settings > API Keys > Secret key
    WEBHOOK_LISTEN        address:port to listen on (default 127.0.0.1:8081);
                          put it behind your TLS reverse proxy
Only Debian's python3 and python3-msgpack are needed.
"""
import decimal
import hashlib
import hmac
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import walletd  # noqa: E402

MAX_BODY = 1 << 20
# walletd's answers that may pass (a full store given room, a busy or restarting
# walletd): answered 503, so the gateway sends the event again later.
RETRY_CODES = {"storage_full", "busy", "too_many_connections", "internal"}
# The one answer retrying can never change: the ref is not a top-up of this walletd.
NOT_OURS = {"unknown_topup"}


def flutterwave(headers, body):
    """Returns (ok_signature, confirm_params or None)."""
    secret = os.environ.get("FLW_SECRET_HASH", "")
    given = headers.get("verif-hash", "")
    if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
        return False, None
    event = json.loads(body, parse_float=decimal.Decimal)
    data = event.get("data") or {}
    if data.get("status") != "successful":
        return True, None
    return True, {"ref": data["tx_ref"], "amount": decimal.Decimal(str(data["amount"])),
                  "currency": data.get("currency"), "provider": "flutterwave",
                  "provider_ref": str(data.get("id") or data.get("flw_ref"))}


def paystack(headers, body):
    secret = os.environ.get("PAYSTACK_SECRET_KEY", "")
    given = headers.get("x-paystack-signature", "")
    want = hmac.new(secret.encode(), body, hashlib.sha512).hexdigest()
    if not secret or not hmac.compare_digest(given.encode(), want.encode()):
        return False, None
    event = json.loads(body, parse_float=decimal.Decimal)
    data = event.get("data") or {}
    if event.get("event") != "charge.success" or data.get("status") != "success":
        return True, None
    # Paystack amounts are in the currency's subunit (kobo, pesewas, cents).
    return True, {"ref": data["reference"], "amount": decimal.Decimal(data["amount"]) / 100,
                  "currency": data.get("currency"), "provider": "paystack",
                  "provider_ref": str(data.get("id"))}


GATEWAYS = {"/flutterwave": flutterwave, "/paystack": paystack}


class Handler(BaseHTTPRequestHandler):
    timeout = 30  # seconds a client may stall; each connection has a thread

    def log_request(self, code="-", size="-"):
        pass  # answer() logs each request in one line, with what it did

    def answer(self, status, text, params=None):
        """Answers, and logs the request in one line (a delivery with its gateway, ref and amount)."""
        what = "%s %s" % (self.command, self.path.split("?")[0])
        if params is not None:
            what += " ref=%s amount=%s %s" % (params.get("ref"), params.get("amount"), params.get("currency") or "")
        self.log_message("%s -> %d %s", what, status, text)
        data = (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.split("?")[0] != "/health":
            return self.answer(404, "no such page")
        try:
            with walletd.Client(timeout=5) as w:
                w.ping()
        except walletd.WalletdError as e:
            return self.answer(503, "walletd unavailable: %s" % e.code)
        return self.answer(200, "ok")

    def do_POST(self):
        gateway = GATEWAYS.get(self.path.split("?")[0])
        if gateway is None:
            return self.answer(404, "no such webhook")
        length = self.headers.get("Content-Length", "")
        length = int(length) if length.isdigit() else 0
        if length <= 0 or length > MAX_BODY:
            return self.answer(400, "bad body")
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            good, params = gateway(headers, body)
        except (ValueError, KeyError, TypeError, decimal.InvalidOperation):
            return self.answer(400, "cannot read the event")
        if not good:
            return self.answer(401, "bad signature")
        if params is None:
            return self.answer(200, "ignored")
        params = {k: v for k, v in params.items() if v is not None}
        try:
            with walletd.Client(timeout=10) as w:
                res = w.topup_confirm(**params)
        except walletd.ConnectionLost as e:
            return self.answer(503, "walletd unavailable: %s" % e, params)  # the gateway retries
        except walletd.WalletdError as e:
            if e.code in NOT_OURS:
                return self.answer(200, "not credited: %s" % e.code, params)
            if e.code in RETRY_CODES:
                return self.answer(503, "not credited yet: %s" % e.code, params)
            # no_fx_rate, invalid_argument...: a real payment walletd refused. Staff must
            # fix the cause; until then every retry of the gateway is refused again.
            return self.answer(500, "not credited: %s: %s" % (e.code, e.message), params)
        state = "already credited" if res["replayed"] else "credited"
        return self.answer(200, "%s %s %s" % (state, res["transaction"]["amount"], res["transaction"]["currency"]),
                           params)


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # a burst opens hundreds of connections at once; the default 5 drops them


def main():
    host, _, port = os.environ.get("WEBHOOK_LISTEN", "127.0.0.1:8081").rpartition(":")
    server = Server((host or "127.0.0.1", int(port)), Handler)
    print("webhook receiver on %s:%s" % (host, port), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
