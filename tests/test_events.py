"""Event webhooks: low_balance, topup_paid and hold_expired, each POSTed as signed
JSON to a real local HTTP server until it answers 2xx, once delivered never again."""
import hashlib
import hmac
import json
import os
import subprocess
import time

from harness import DaemonTest, HERE, PY, json_files
from test_topups import free_port

SECRET = "whsec_test_42"


class Events(DaemonTest):
    def setUp(self):
        self.port = free_port()
        self.config = {"webhook_url": "http://127.0.0.1:%d/walletd" % self.port, "alert_interval": "1"}
        super().setUp()
        secret = os.path.join(self.d.dir, "webhook.secret")
        with open(secret, "w") as f:
            f.write(SECRET + "\n")
        self.d.config["webhook_secret_file"] = secret
        self.d.restart()
        self.posts_dir = os.path.join(self.d.dir, "posts")
        self.sink = None

    def start_sink(self, fail):
        self.sink = subprocess.Popen([PY, os.path.join(HERE, "hook_sink.py"), str(self.port), self.posts_dir,
                                      str(fail)], stdout=subprocess.PIPE)
        self.sink.stdout.readline()

    def tearDown(self):
        if self.sink:
            self.sink.terminate()
            self.sink.wait()
        super().tearDown()

    def posts(self):
        return json_files(self.posts_dir)

    def delivered(self, count, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            ok = [p for p in self.posts() if p["status"] == 200]
            if len(ok) >= count:
                return ok
            time.sleep(0.1)
        return [p for p in self.posts() if p["status"] == 200]

    def test_events_are_signed_retried_until_2xx_and_delivered_once(self):
        d = self.d
        d.ctl_json("wallet", "create", "acme", "USD", "--threshold", "5")
        d.ctl_json("credit", "acme", "5.20", "opening")
        d.ctl_json("rate", "set", "default", "sms", "1", "1", "USD")
        d.ctl_json("charge", "acme", "sms", "+15550000000", "m1")  # 4.20: low_balance
        tp = d.ctl_json("topup", "create", "acme", "10")
        d.ctl_json("topup", "confirm", tp["ref"], "10", "paystack", "PS-9")  # topup_paid
        d.ctl_json("hold", "create", "acme", "--ref", "h1", "--amount", "1", "--expires-in", "1")
        time.sleep(2.5)  # the hold expires meanwhile: hold_expired
        d.restart()  # the webhook is down all this time: the events wait, durable
        self.assertIn("\nwalletd_webhooks_pending 3\n", d.ctl("stats", "--prometheus").stdout)  # a dead receiver shows
        self.start_sink(fail=2)  # and its first two answers are 500
        ok = self.delivered(3)
        self.assertEqual(len(ok), 3)
        deadline = time.time() + 10
        while d.ctl_json("stats")["webhooks_pending"] and time.time() < deadline:
            time.sleep(0.1)
        self.assertIn("\nwalletd_webhooks_pending 0\n", d.ctl("stats", "--prometheus").stdout)
        bodies = [json.loads(p["body"]) for p in ok]
        self.assertEqual(sorted(b["type"] for b in bodies), ["hold_expired", "low_balance", "topup_paid"])
        for p, b in zip(ok, bodies):
            sig = hmac.new(SECRET.encode(), p["body"].encode(), hashlib.sha256).hexdigest()
            self.assertEqual(p["headers"]["X-Walletd-Signature"], "sha256=" + sig)
            self.assertEqual(p["headers"]["Content-Type"], "application/json")
            self.assertEqual(b["wallet"], "acme")
            self.assertEqual(sorted(b), ["created_at", "data", "id", "type", "wallet"])
        by = {b["type"]: b for b in bodies}
        self.assertEqual((by["low_balance"]["data"]["balance"], by["low_balance"]["data"]["threshold"]), ("4.2", "5"))
        self.assertEqual((by["topup_paid"]["data"]["amount"], by["topup_paid"]["data"]["provider_ref"]), ("10", "PS-9"))
        self.assertEqual((by["hold_expired"]["data"]["hold"], by["hold_expired"]["data"]["remaining"]), ("h1", "1"))
        failed = [json.loads(p["body"])["id"] for p in self.posts() if p["status"] == 500]
        self.assertEqual(len(failed), 2)
        self.assertTrue(set(failed) <= {b["id"] for b in bodies})  # a retry carries the same id
        self.assertEqual(len({b["id"] for b in bodies}), 3)
        d.restart()
        time.sleep(2)
        self.assertEqual(len([p for p in self.posts() if p["status"] == 200]), 3)  # never sent again
