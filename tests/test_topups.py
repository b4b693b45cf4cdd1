"""Top-ups: checkout, exactly-once confirmation, the webhook receiver."""
import concurrent.futures
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from harness import DaemonTest, ROOT, PY


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class TopUps(DaemonTest):
    config = {"topup_url": "https://pay.example/checkout?ref={ref}&amt={amount}&c={currency}&w={wallet}",
              "topup_ttl": "2"}

    def test_create_confirm_credits_once(self):
        d = self.d
        self.seed("0")
        t = d.ctl_json("topup", "create", "acme", "100")
        self.assertEqual(t["status"], "pending")
        self.assertTrue(t["ref"].startswith("tp_") and len(t["ref"]) == 27)
        self.assertEqual(t["checkout_url"], "https://pay.example/checkout?ref=%s&amt=100.00&c=USD&w=acme" % t["ref"])
        self.assertIn("expires_at", t)
        for i in range(3):
            r = d.ctl_json("topup", "confirm", t["ref"], "100", "flutterwave", "FLW-1")
            self.assertEqual(r["replayed"], i > 0)
            self.assertEqual(r["transaction"]["description"], "Top up via Flutterwave")
        h = d.ctl_json("history", "acme")
        self.assertEqual([x["type"] for x in h["transactions"]], ["credit"])
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "100")
        self.assertEqual(d.ctl_json("topup", "get", t["ref"])["status"], "paid")
        self.assertEqual(len(d.ctl_json("topup", "list", "acme", "--status", "paid")["topups"]), 1)
        self.assertEqual(d.ctl_json("topup", "confirm", "tp_nope", "1", "x", "y", expect=1)["code"], "unknown_topup")

    def test_racing_confirms_credit_once(self):
        d = self.d
        self.seed("0")
        t = d.ctl_json("topup", "create", "acme", "50")

        def confirm(i):
            with d.client() as c:
                return c.topup_confirm(ref=t["ref"], amount="50", provider="paystack", provider_ref="PS-%d" % i)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(confirm, range(16)))
        self.assertEqual(sum(1 for r in results if not r["replayed"]), 1)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "50")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_late_payments_are_credited_and_flagged(self):
        d = self.d
        self.seed("0")
        a = d.ctl_json("topup", "create", "acme", "10")
        b = d.ctl_json("topup", "create", "acme", "20")
        self.assertEqual(d.ctl_json("topup", "cancel", b["ref"])["status"], "cancelled")
        time.sleep(2.2)
        self.assertEqual(d.ctl_json("topup", "get", a["ref"])["status"], "expired")
        ra = d.ctl_json("topup", "confirm", a["ref"], "12.5", "flutterwave", "F1")
        self.assertTrue(ra["topup"]["late"])
        self.assertEqual(ra["topup"]["credited"], "12.5")  # what was paid, not what was asked
        rb = d.ctl_json("topup", "confirm", b["ref"], "20", "flutterwave", "F2")
        self.assertTrue(rb["topup"]["late"])
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "32.5")

    def test_other_currency_is_converted_and_recorded(self):
        d = self.d
        self.seed("0")
        t = d.ctl_json("topup", "create", "acme", "1")
        r = d.ctl_json("topup", "confirm", t["ref"], "3723.40", "mtn", "M1", "--currency", "UGX")
        self.assertEqual(r["transaction"]["amount"], "1")
        self.assertEqual((r["transaction"]["paid_amount"], r["transaction"]["paid_currency"]), ("3723.4", "UGX"))

    def test_frozen_wallet_refuses_checkout_but_accepts_payment(self):
        d = self.d
        self.seed("0")
        t = d.ctl_json("topup", "create", "acme", "5")
        d.ctl_json("wallet", "update", "acme", "--status", "frozen")
        self.assertEqual(d.ctl_json("topup", "create", "acme", "5", expect=1)["code"], "wallet_frozen")
        self.assertEqual(d.ctl_json("topup", "confirm", t["ref"], "5", "x", "y")["transaction"]["amount"], "5")


class Webhooks(DaemonTest):
    def setUp(self):
        super().setUp()
        self.port = free_port()
        env = dict(os.environ, WALLETD_SOCKET=self.d.sock, FLW_SECRET_HASH="flw-secret",
                   PAYSTACK_SECRET_KEY="sk_test_123", WEBHOOK_LISTEN="127.0.0.1:%d" % self.port)
        self.hook_log = os.path.join(self.d.dir, "webhook.log")
        self.hook = subprocess.Popen([PY, os.path.join(ROOT, "contrib", "payments", "webhook.py")],
                                     env=env, stdout=subprocess.PIPE, stderr=open(self.hook_log, "w"))
        self.hook.stdout.readline()

    def tearDown(self):
        self.hook.terminate()
        self.hook.wait()
        super().tearDown()

    def post(self, path, body, headers):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path), data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def test_flutterwave_webhook_three_times_credits_once(self):
        self.seed("0")
        t = self.d.ctl_json("topup", "create", "acme", "100")
        body = json.dumps({"event": "charge.completed", "data": {
            "id": 285959875, "tx_ref": t["ref"], "flw_ref": "FLW-MOCK", "amount": 100, "currency": "USD",
            "status": "successful"}}).encode()
        for _ in range(3):
            status, _ = self.post("/flutterwave", body, {"verif-hash": "flw-secret", "Content-Type": "application/json"})
            self.assertEqual(status, 200)
        self.assertEqual(self.post("/flutterwave", body, {"verif-hash": "forged"})[0], 401)
        h = self.d.ctl_json("history", "acme")
        self.assertEqual([(x["type"], x["amount"], x["provider_ref"]) for x in h["transactions"]],
                         [("credit", "100", "285959875")])

    def test_bad_content_length_is_a_clear_400(self):
        c = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        c.sendall(b"POST /paystack HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
        self.assertTrue(c.recv(100).startswith(b"HTTP/1.0 400"))
        c.close()

    def test_walletd_unable_now_asks_the_gateway_to_retry(self):
        self.seed("0")
        t = self.d.ctl_json("topup", "create", "acme", "25")
        self.d.config["max_connections"] = "2"
        self.d.write_config()
        self.d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        held = [self.d.raw() for _ in range(2)]  # walletd at its limit refuses the receiver
        body = json.dumps({"event": "charge.success", "data": {
            "id": 4100, "reference": t["ref"], "amount": 2500, "currency": "USD", "status": "success"}}).encode()
        sig = hmac.new(b"sk_test_123", body, hashlib.sha512).hexdigest()
        status, text = self.post("/paystack", body, {"x-paystack-signature": sig})
        self.assertEqual((status, text.strip()), (503, "not credited yet: too_many_connections"))
        for s in held:
            s.close()
        time.sleep(0.3)
        self.assertEqual(self.d.ctl_json("topup", "get", t["ref"])["status"], "pending")
        status, text = self.post("/paystack", body, {"x-paystack-signature": sig})  # the gateway's retry
        self.assertEqual((status, text.strip()), (200, "credited 25 USD"))
        self.assertEqual(self.d.ctl_json("balance", "acme")["balance"], "25")

    def test_paystack_signature_is_checked(self):
        self.seed("0")
        t = self.d.ctl_json("topup", "create", "acme", "25")
        body = json.dumps({"event": "charge.success", "data": {
            "id": 4099, "reference": t["ref"], "amount": 2500, "currency": "USD", "status": "success"}}).encode()
        sig = hmac.new(b"sk_test_123", body, hashlib.sha512).hexdigest()
        self.assertEqual(self.post("/paystack", body, {"x-paystack-signature": "0" * 128})[0], 401)
        self.assertEqual(self.d.ctl_json("balance", "acme")["balance"], "0")
        status, text = self.post("/paystack", body, {"x-paystack-signature": sig})
        self.assertEqual(status, 200, text)
        self.assertEqual(self.d.ctl_json("balance", "acme")["balance"], "25")
        failed = json.dumps({"event": "charge.failed", "data": {"reference": t["ref"], "status": "failed"}}).encode()
        sig2 = hmac.new(b"sk_test_123", failed, hashlib.sha512).hexdigest()
        self.assertEqual(self.post("/paystack", failed, {"x-paystack-signature": sig2})[0], 200)
        self.assertTrue(self.d.ctl_json("verify")["ok"])

    def flutterwave(self, ref, amount, currency, id=7001):
        body = json.dumps({"event": "charge.completed", "data": {
            "id": id, "tx_ref": ref, "flw_ref": "FLW-%d" % id, "amount": amount, "currency": currency,
            "status": "successful"}}).encode()
        return self.post("/flutterwave", body, {"verif-hash": "flw-secret", "Content-Type": "application/json"})

    def test_a_payment_walletd_cannot_credit_is_retried_until_it_can(self):
        # an NGN payment into a USD wallet with no NGN pair: the gateway must retry
        # (5xx), not be told it is done (it used to be answered 200 and forgotten)
        self.seed("0")
        t = self.d.ctl_json("topup", "create", "acme", "10")
        for _ in range(2):
            status, text = self.flutterwave(t["ref"], 15000, "NGN")
            self.assertEqual(status, 500, text)
            self.assertIn("no_fx_rate", text)
        self.assertEqual(self.d.ctl_json("topup", "get", t["ref"])["status"], "pending")
        self.d.ctl_json("fx", "set", "USD", "NGN", "1500")  # staff fix the cause
        self.assertEqual(self.flutterwave(t["ref"], 15000, "NGN"), (200, "credited 10 USD\n"))
        self.assertEqual(self.flutterwave(t["ref"], 15000, "NGN"), (200, "already credited 10 USD\n"))
        self.assertEqual(self.d.ctl_json("history", "acme")["total"], 1)
        # what retrying can never change is 2xx: a ref that is not a top-up of this walletd
        self.assertEqual(self.flutterwave("tp_not_ours", 5, "USD")[0], 200)
        self.hook.terminate()
        self.hook.wait()
        with open(self.hook_log) as f:
            lines = [x for x in f.read().splitlines() if "POST /flutterwave" in x]
        self.assertEqual(len(lines), 5)  # one line per delivery: gateway, ref, amount, outcome
        self.assertIn("ref=%s amount=15000 NGN -> 500 not credited: no_fx_rate" % t["ref"], lines[0])
        self.assertIn("-> 200 credited 10 USD", lines[2])
        self.assertIn("ref=tp_not_ours amount=5 USD -> 200 not credited: unknown_topup", lines[4])

    def test_health_endpoint_says_whether_walletd_answers(self):
        url = "http://127.0.0.1:%d/health" % self.port
        with urllib.request.urlopen(url, timeout=10) as r:
            self.assertEqual((r.status, r.read()), (200, b"ok\n"))
        self.d.stop()
        with self.assertRaises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        self.assertEqual(e.exception.code, 503)
        self.d.start()
