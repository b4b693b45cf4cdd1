"""contrib/http/walletd-http, the platform's billing API over HTTP: the adapter as a
real process (as nobody, with only walletd's client role) in front of a real walletd."""
import concurrent.futures
import decimal
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from harness import DaemonTest, ROOT
from test_topups import free_port

D = decimal.Decimal
with open(os.path.join(ROOT, "README.md")) as readme:  # the README's line, run as written but for port and paths
    README_LINE, = [line.strip() for line in readme if line.startswith("    contrib/http/walletd-http ")]
UG = "+256712345678"
SEED_URL = "https://auth.esmsafrica.io/payments/initiate"  # the eSMS Africa billing page's checkout_url, as the topup_url


class HttpApi(DaemonTest):
    config = {"socket_group": "nogroup", "client_users": "nobody", "topup_url": SEED_URL}

    def setUp(self):
        super().setUp()
        self.keys = os.path.join(self.d.dir, "http-keys")
        self.write_keys("# the platform's API keys\nkey-acme acme\n\nkey-ug ug   # a UGX customer\n")
        self.port = free_port()
        self.log = os.path.join(self.d.dir, "http.log")
        # nobody may not read this checkout (under /root, say): a copy of the adapter and the client it
        # imports, laid out as in the checkout, in walletd's directory (mode 0711)
        copy = os.path.join(self.d.dir, "checkout")
        for path in ("contrib/http/walletd-http", "contrib/python/walletd/__init__.py"):
            os.makedirs(os.path.dirname(os.path.join(copy, path)), exist_ok=True)
            shutil.copy(os.path.join(ROOT, path), os.path.join(copy, path))
        command = README_LINE.replace("8082", str(self.port)).replace("/run/walletd/walletd.sock", self.d.sock)
        with open(self.log, "w") as log:
            self.adapter = subprocess.Popen(
                ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] +
                shlex.split(command.replace("/etc/walletd/http-keys", self.keys)),
                cwd=copy, stdout=subprocess.PIPE, stderr=log, text=True)
        self.assertIn("walletd-http on", self.adapter.stdout.readline())

    def tearDown(self):
        self.adapter.terminate()
        self.adapter.communicate()
        super().tearDown()

    def adapter_log(self):
        with open(self.log) as f:
            return f.read()

    def write_keys(self, text):
        with open(self.keys + ".tmp", "w") as f:
            f.write(text)
        os.chmod(self.keys + ".tmp", 0o644)
        os.replace(self.keys + ".tmp", self.keys)

    def request(self, method, path, body=None, key="key-acme", headers=None):
        """(status, the answer parsed with exact decimals, its raw text)."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        h = dict({"Authorization": "Bearer " + key} if key else {}, **(headers or {}))
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path), data=data, method=method,
                                     headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        return status, json.loads(text, parse_float=D), text

    def test_the_billing_pages_example_answered_through_it(self):
        d = self.d
        self.seed("1400")  # USD; 35 UGX a message to Uganda; USD UGX 3723.40
        status, body, _ = self.request("POST", "/api/balance/topup", {"amount": 100})
        self.assertEqual((status, body), (200, {"checkout_url": SEED_URL, "message": "Redirecting to payment portal"}))
        ref, = [t["ref"] for t in d.ctl_json("topup", "list", "acme")["topups"]]
        d.ctl_json("topup", "confirm", ref, "100", "flutterwave", "FLW-1")  # the gateway's webhook
        with d.client() as c:
            items = [{"wallet": "acme", "channel": "sms", "to": UG, "ref": "m%d" % i, "text": "hi"} for i in range(100)]
            self.assertTrue(all("error" not in r for r in c.call("charge.batch", items=items)["results"]))
        status, _, text = self.request("GET", "/api/balance")
        self.assertEqual((status, text), (200, '{"balance": 1499.06, "currency": "USD"}\n'))  # as the billing page writes it
        status, page, text = self.request("GET", "/api/balance/transactions?page=0&limit=20")
        self.assertEqual(status, 200)
        self.assertEqual((page["total"], page["page"], page["limit"], len(page["transactions"])), (102, 0, 20, 20))
        newest = page["transactions"][0]
        self.assertEqual(list(newest), ["id", "type", "amount", "balance_after", "currency", "description",
                                        "created_at"])
        self.assertEqual((newest["id"], newest["type"], newest["balance_after"], newest["currency"],
                          newest["description"]),
                         (102, "sms_charge", D("1499.06"), "USD", "SMS to +256712345678 via ESMS_UG (1 seg)"))
        self.assertEqual(newest["amount"], D("-0.0094"))  # once per message, rounded: 100 of them make 0.94
        self.assertRegex(newest["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertIn('"amount": -0.0094, "balance_after": 1499.06,', text)  # numbers, exactly walletd's text
        status, last, _ = self.request("GET", "/api/balance/transactions?page=5&limit=20")
        credit = last["transactions"][0]
        self.assertEqual((credit["id"], credit["type"], credit["amount"], credit["balance_after"],
                          credit["description"]), (2, "credit", D("100"), D("1500"), "Top up via Flutterwave"))
        self.assertEqual(len(last["transactions"]), 2)
        status, pre, _ = self.request("POST", "/api/messages/bulk-precheck",
                                      {"channel": "sms", "recipients": [UG] * 100, "text": "hi"})
        self.assertEqual((status, pre["sufficient"], pre["required"], pre["currency"]), (200, True, D("0.94"), "USD"))
        d.ctl_json("wallet", "create", "ug", "UGX")  # the page's insufficient balance: a UGX wallet holding 10
        d.ctl_json("credit", "ug", "10", "opening")
        status, body, _ = self.request("POST", "/api/messages/bulk-precheck", {"channel": "sms", "recipients": [UG]},
                                       key="key-ug")
        self.assertEqual(status, 402)
        self.assertEqual((body["detail"]["code"], body["detail"]["message"]),
                         ("insufficient_balance", "Insufficient balance. Required: 35 UGX, available: 10 UGX"))
        self.assertEqual((body["detail"]["missing"], body["detail"]["breakdown"][0]["prefix"]), (D("25"), "256"))
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_a_key_sees_its_own_wallet_only_and_keys_are_read_again_on_sighup(self):
        d = self.d
        self.seed("5")
        d.ctl_json("wallet", "create", "ug", "UGX")
        calls = lambda: sum(m["calls"] for m in d.ctl_json("stats")["requests"].values())  # noqa: E731
        before = calls()
        for key, headers in ((None, None), ("nosuch", None), (None, {"Authorization": "Basic a2V5LWFjbWU6"}),
                             (None, {"Authorization": "key-acme"}), ("key-acme ", {"X-Wallet": "ug"})):
            status, body, _ = self.request("GET", "/api/balance", key=key, headers=headers)
            if key == "key-acme ":
                self.assertEqual((status, body["currency"]), (200, "USD"))  # a header naming another wallet is no key
                continue
            self.assertEqual((status, body["detail"]["code"]), (401, "unauthorized"), (key, headers))
        self.assertEqual(calls() - before, 2)  # the one request that got through, and the stats call itself
        status, body, _ = self.request("GET", "/api/balance?wallet=ug")
        self.assertEqual((status, body["detail"]["field"]), (400, "wallet"))
        status, body, _ = self.request("POST", "/api/balance/topup", {"amount": 1, "wallet": "ug"})
        self.assertEqual((status, body["detail"]["field"]), (400, "wallet"))
        self.assertEqual(self.request("GET", "/api/balance", key="key-ug")[1], {"balance": D("0"), "currency": "UGX"})
        self.write_keys("key-new acme\n")
        self.adapter.send_signal(signal.SIGHUP)
        deadline = time.time() + 20
        while self.request("GET", "/api/balance", key="key-new")[0] != 200 and time.time() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.request("GET", "/api/balance", key="key-new")[1]["balance"], D("5"))
        self.assertEqual(self.request("GET", "/api/balance", key="key-ug")[0], 401)
        self.write_keys("key-newer acme extra\n")  # a broken file keeps the keys read before
        self.adapter.send_signal(signal.SIGHUP)
        deadline = time.time() + 20
        while "keeping the keys read before" not in self.adapter_log() and time.time() < deadline:
            time.sleep(0.05)
        self.assertIn(":1: want KEY WALLET", self.adapter_log())
        self.assertEqual(self.request("GET", "/api/balance", key="key-new")[0], 200)

    def test_a_flood_of_bad_requests_gets_clear_errors_and_changes_nothing(self):
        d = self.d
        self.seed("5")
        last = d.ctl_json("export")["last_id"]
        bad = [("POST", "/api/balance/topup", b"{", 400), ("POST", "/api/balance/topup", b"[1]", 400),
               ("POST", "/api/balance/topup", {}, 400), ("POST", "/api/balance/topup", {"amount": "abc"}, 400),
               ("POST", "/api/balance/topup", {"amount": -5}, 400), ("POST", "/api/balance/topup", {"amount": 0}, 400),
               ("POST", "/api/balance/topup", {"amount": 0.0000001}, 400),
               ("POST", "/api/balance/topup", b'{"amount": NaN}', 400),
               ("POST", "/api/balance/topup", b'{"amount": 1e999}', 400),
               ("POST", "/api/balance/topup", {"amount": "1\u00002"}, 400),
               ("POST", "/api/balance/topup", {"amount": [1]}, 400),
               ("POST", "/api/balance/topup", b"\xff\xfe", 400),
               ("POST", "/api/messages/bulk-precheck", {"channel": "fax", "recipients": [UG]}, 400),
               ("POST", "/api/messages/bulk-precheck", {"channel": "sms", "recipients": UG}, 400),
               ("POST", "/api/messages/bulk-precheck", {"channel": "sms", "recipients": [UG], "text": 5}, 400),
               ("POST", "/api/messages/bulk-precheck", {"channel": "sms", "recipients": [UG], "segments": "x"}, 400),
               ("POST", "/api/messages/bulk-precheck", {"channel": "sms", "recipients": [UG], "hold": "h"}, 400),
               ("GET", "/api/balance/transactions?page=-1", None, 400),
               ("GET", "/api/balance/transactions?limit=abc", None, 400),
               ("GET", "/api/balance/transactions?limit=5000", None, 400),
               ("GET", "/api/balance/transactions?type=credit", None, 400),
               ("GET", "/api/nosuch", None, 404), ("DELETE", "/api/balance", None, 404),
               ("GET", "/api/balance/topup", None, 404)]
        for _ in range(5):
            for method, path, body, want in bad:
                status, answer, text = self.request(method, path, body)
                self.assertEqual(status, want, (method, path, body, text))
                self.assertEqual(set(answer), {"detail"})
                self.assertTrue(answer["detail"]["code"] and answer["detail"]["message"], text)
        status, body, _ = self.request("POST", "/api/balance/topup", b"x" * 10,
                                       headers={"Content-Length": str(64 << 20)})  # announced, never sent
        self.assertEqual(status, 400)
        for _ in range(20):  # garbage that is not HTTP at all
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                s.sendall(os.urandom(300) + b"\r\n\r\n")
                s.recv(4096)
        self.assertEqual(d.ctl_json("export")["last_id"], last)  # nothing written
        self.assertEqual(d.ctl_json("topup", "list", "acme")["topups"], [])
        self.assertEqual(self.request("GET", "/health", key=None)[:2], (200, {"status": "ok"}))
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_a_burst_of_connections_at_once_is_answered_every_one(self):
        self.seed("5")
        with concurrent.futures.ThreadPoolExecutor(300) as pool:  # more than a listen backlog of 5 holds
            answers = list(pool.map(lambda _: self.request("GET", "/api/balance")[2], range(300)))
        self.assertEqual(answers, ['{"balance": 5, "currency": "USD"}\n'] * 300)

    def test_walletd_stopped_is_503_and_back_when_it_is(self):
        d = self.d
        self.seed("5")
        d.stop()
        for path in ("/health", "/api/balance"):
            status, body, _ = self.request("GET", path)
            self.assertEqual((status, body["detail"]["code"]), (503, "connection_lost"), path)
        d.start()
        self.assertEqual(self.request("GET", "/api/balance")[:2], (200, {"balance": D("5"), "currency": "USD"}))
        self.assertEqual(self.request("GET", "/health", key=None)[0], 200)
        self.assertTrue(re.search(r"GET /api/balance HTTP/1.1\" 503", self.adapter_log()))
