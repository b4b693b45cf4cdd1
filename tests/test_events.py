"""Event webhooks: low_balance, topup_paid and hold_expired, each POSTed as signed
JSON to a real local HTTP server until it answers 2xx, once delivered never again."""
import base64
import hashlib
import hmac
import json
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request

from harness import DaemonTest, HERE, PY, ROOT, json_files
from test_topups import free_port

SECRET = "whsec_test_42"  # not base64 after whsec_: its own bytes are the key
with open(os.path.join(ROOT, "README.md")) as readme:  # the README's line, run as written but for port and file
    RECEIVER_LINE, = [line.strip() for line in readme if line.startswith("    ") and "webhook_receiver.py --" in line]


def standard_signature(key, msg_id, stamp, body):
    """Standard Webhooks' v1 signature, as its spec gives it (standardwebhooks.com)."""
    content = ("%s.%s.%s" % (msg_id, stamp, body)).encode()
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


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
        for p, b in zip(self.posts(), [json.loads(p["body"]) for p in self.posts()]):
            h = p["headers"]
            self.assertEqual(h["webhook-id"], b["id"])
            self.assertLess(abs(int(h["webhook-timestamp"]) - time.time()), 120)
            self.assertEqual(h["webhook-signature"], standard_signature(SECRET.encode(), b["id"],
                                                                        h["webhook-timestamp"], p["body"]))
            sig = hmac.new(SECRET.encode(), p["body"].encode(), hashlib.sha256).hexdigest()
            self.assertEqual(h["X-Walletd-Signature"], "sha256=" + sig)  # deprecated, still sent
        for p, b in zip(ok, bodies):
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

    def test_a_rotated_secret_signs_twice_and_the_example_receiver_takes_either_once(self):
        d = self.d
        keys = [os.urandom(24), os.urandom(32)]
        lines = ["whsec_" + base64.b64encode(k).decode() for k in keys]
        with open(d.config["webhook_secret_file"], "w") as f:
            f.write("\n".join(lines) + "\n")  # read at every delivery: no restart
        self.start_sink(fail=0)
        d.ctl_json("wallet", "create", "acme", "USD", "--threshold", "5")
        d.ctl_json("credit", "acme", "5.20", "opening")
        d.ctl_json("rate", "set", "default", "sms", "1", "1", "USD")
        d.ctl_json("charge", "acme", "sms", "+15550000000", "m1")  # 4.20: low_balance
        post = self.delivered(1)[0]
        h, body = post["headers"], post["body"]
        self.assertEqual(h["webhook-signature"].split(),
                         [standard_signature(k, h["webhook-id"], h["webhook-timestamp"], body) for k in keys])
        for line, key in zip(lines, keys):  # a receiver that knows either secret takes it, once
            port = free_port()
            secret = os.path.join(d.dir, "receiver.secret")
            with open(secret, "w") as f:
                f.write(line + "\n")
            command = RECEIVER_LINE.replace("8080", str(port)).replace("/etc/walletd/webhook-events.secret", secret)
            receiver = subprocess.Popen(shlex.split(command), cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
            try:
                receiver.stdout.readline()  # listening

                def send(headers, data):
                    req = urllib.request.Request("http://127.0.0.1:%d/" % port, data=data.encode(), method="POST",
                                                 headers=dict(headers, **{"Content-Type": "application/json"}))
                    try:
                        with urllib.request.urlopen(req, timeout=10) as r:
                            return r.status, r.read().decode().strip()
                    except urllib.error.HTTPError as e:
                        return e.code, e.read().decode().strip()

                sent = {k: h[k] for k in ("webhook-id", "webhook-timestamp", "webhook-signature")}
                self.assertEqual(send(sent, body), (200, "ok"))
                self.assertEqual(json.loads(receiver.stdout.readline()), json.loads(body))
                self.assertEqual(send(sent, body), (200, "already done"))  # a replay within 5 minutes
                stale = str(int(time.time()) - 301)  # captured, replayed later: re-signed even, still refused
                self.assertEqual(send(dict(sent, **{"webhook-id": "evt_x", "webhook-timestamp": stale,
                                                    "webhook-signature": standard_signature(key, "evt_x", stale, body)}),
                                      body), (400, "webhook-timestamp is more than 5 minutes away"))
                self.assertEqual(send(dict(sent, **{"webhook-id": "evt_y"}), body), (401, "no valid signature"))
                self.assertEqual(send(sent, body.replace("acme", "acmf")), (401, "no valid signature"))
            finally:
                receiver.terminate()
                rest = receiver.communicate(timeout=10)[0]
            self.assertEqual(rest, "")  # the event was acted on once
