"""Automatic top-up: a local HTTP server answers as Paystack's and Flutterwave's APIs do (success,
decline, an answer that never comes, a late one); the webhook receiver and the SMTP sink are real."""
import hashlib
import hmac
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.parse
import urllib.request

from harness import DaemonTest, ROOT, PY
from test_readme import WALLETCTL_DIR, indented, readme
from test_alerts import SmtpSink
from test_topups import free_port
from walletd import WalletdError

AUTO = "below=5,amount=20,provider=paystack,authorization=AUTH_8dfhjjdt,email=ops@acme.example"


class Gateway:
    """Paystack's /transaction/charge_authorization and /transaction/verify/REF, Flutterwave's
    /v3/tokenized-charges and /v3/transactions/verify_by_reference.  mode: success, decline, or
    late (a charge is made, its answer comes after walletd stopped waiting).  hold: an Event a
    successful answer waits for.  charges: the bodies of the charges asked for, in order."""

    def __init__(self):
        self.mode, self.hold, self.charges, self.paid, self.headers = "success", None, [], {}, []
        gw = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                gw.headers.append(self.headers.get("Authorization"))
                url = urllib.parse.urlparse(self.path)
                if url.path.startswith("/transaction/verify/"):
                    self.answer(gw.lookup(url.path.rsplit("/", 1)[1], "paystack"))
                elif url.path == "/v3/transactions/verify_by_reference":
                    self.answer(gw.lookup(urllib.parse.parse_qs(url.query)["tx_ref"][0], "flutterwave"))
                else:
                    self.answer((404, {}))

            def do_POST(self):
                gw.headers.append(self.headers.get("Authorization"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                gw.charges.append(dict(body, path=self.path))
                paystack = self.path == "/transaction/charge_authorization"
                ref = body["reference" if paystack else "tx_ref"]
                if gw.mode == "decline":
                    data = {"status": "failed", "reference": ref, "gateway_response": "Insufficient Funds",
                            "processor_response": "Insufficient Funds"}
                    return self.answer((200, {"status": True, "data": data} if paystack else
                                        {"status": "success", "data": data}))
                gw.paid[ref] = dict(body, id=4000 + len(gw.paid))
                if gw.mode == "late":
                    time.sleep(2.5)  # walletd's gateway_timeout is 1 s
                if gw.hold:
                    gw.hold.wait(30)
                self.answer(gw.lookup(ref, "paystack" if paystack else "flutterwave"))

            def answer(self, status_body):
                status, body = status_body
                raw = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:
                    pass  # walletd stopped waiting

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def lookup(self, ref, provider):
        p = self.paid.get(ref)
        if p is None:
            return (400, {"status": False, "message": "Transaction reference not found"} if provider == "paystack"
                    else {"status": "error", "message": "No transaction was found for this id"})
        if provider == "paystack":
            return (200, {"status": True, "message": "Charge attempted", "data": {
                "id": p["id"], "reference": ref, "amount": p["amount"], "currency": p["currency"],
                "status": "success", "gateway_response": "Approved"}})
        return (200, {"status": "success", "message": "Charge successful", "data": {
            "id": p["id"], "tx_ref": ref, "amount": p["amount"], "currency": p["currency"], "status": "successful"}})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class AutoTopUp(DaemonTest):
    def setUp(self):
        self.gw = Gateway()
        self.smtp_port = free_port()
        self.config = {"paystack_api_url": self.gw.url, "flutterwave_api_url": self.gw.url,
                       "gateway_timeout": "1", "alert_interval": "1", "smtp_url": "smtp://127.0.0.1:%d" % self.smtp_port,
                       "smtp_from": "billing@platform.example", "ops_emails": "ops@platform.example",
                       "receipts": "off"}
        super().setUp()
        for name in ("paystack", "flutterwave"):
            path = os.path.join(self.d.dir, name + ".secret")
            with open(path, "w") as f:
                f.write("sk_test_%s\n" % name)
            self.d.config[name + "_secret_file"] = path
        self.d.restart()
        self.sink = SmtpSink(self.smtp_port, os.path.join(self.d.dir, "mail"))
        self.sink.start()

    def tearDown(self):
        self.sink.stop()
        self.gw.close()
        super().tearDown()

    def wait_for(self, what, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            got = what()
            if got:
                return got
            time.sleep(0.05)
        self.fail("timed out")

    def autos(self, wallet="acme"):
        return [t for t in self.d.ctl_json("topup", "list", wallet)["topups"] if t["auto"]]

    def start_wallet(self, balance="10", auto=AUTO):
        d = self.d
        d.ctl_json("wallet", "create", "acme", "USD", "--alert-email", "owner@acme.example")
        d.ctl_json("credit", "acme", balance, "opening balance")
        return d.ctl_json("wallet", "update", "acme", "--auto-topup", auto)

    def test_a_crossing_tops_up_once_and_rearms(self):
        d = self.d
        w = self.start_wallet()
        self.assertEqual(w["auto_topup"], {"below": "5", "amount": "20", "to": None, "provider": "paystack",
                                           "authorization": "...jjdt", "email": "ops@acme.example",
                                           "max_per_day": 3, "active": True, "failures": 0})
        d.ctl_json("debit", "acme", "4", "x")  # 6: above
        time.sleep(0.5)
        self.assertEqual(self.gw.charges, [])
        d.ctl_json("debit", "acme", "2", "x")  # 4: below
        self.wait_for(lambda: d.ctl_json("balance", "acme")["balance"] == "24")
        [t] = self.autos()
        self.assertEqual((t["status"], t["amount"], t["credited"], t["provider"]), ("paid", "20", "20", "paystack"))
        self.assertEqual(self.gw.charges, [{"path": "/transaction/charge_authorization",
                                            "authorization_code": "AUTH_8dfhjjdt", "email": "ops@acme.example",
                                            "amount": 2000, "reference": t["ref"], "currency": "USD"}])
        self.assertEqual(set(self.gw.headers), {"Bearer sk_test_paystack"})
        d.ctl_json("debit", "acme", "1", "x")  # 23, then 3: below again after being above
        time.sleep(0.5)
        self.assertEqual(len(self.gw.charges), 1)
        d.ctl_json("debit", "acme", "20", "x")
        self.wait_for(lambda: d.ctl_json("balance", "acme")["balance"] == "23")
        self.assertEqual(len(self.gw.charges), 2)
        credits = [x for x in d.ctl_json("history", "acme")["transactions"] if x["type"] == "credit"]
        self.assertEqual([x["description"] for x in credits], ["Automatic top-up via Paystack"] * 2)
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_to_through_flutterwave_and_a_lost_answer_charged_once(self):
        d = self.d
        self.gw.mode = "late"
        self.start_wallet("10", "below=5,to=50,provider=flutterwave,authorization=flw-t1nf-5b0f,email=a@acme.example")
        d.ctl_json("debit", "acme", "6.5", "x")  # 3.50: tops up by 46.50 to 50
        self.wait_for(lambda: d.ctl_json("balance", "acme")["balance"] == "50", timeout=30)
        self.assertEqual(len(self.gw.charges), 1)  # the retry found it paid by its reference
        charge = self.gw.charges[0]
        self.assertEqual((charge["path"], charge["token"], charge["amount"], charge["currency"]),
                         ("/v3/tokenized-charges", "flw-t1nf-5b0f", 46.5, "USD"))
        [t] = self.autos()
        self.assertEqual((t["amount"], t["credited"], t["provider_ref"]), ("46.5", "46.5", "4000"))
        self.assertEqual(d.ctl_json("wallet", "get", "acme")["auto_topup"]["failures"], 0)
        self.assertTrue(d.ctl_json("verify")["ok"])

    def webhook(self, ref, amount):
        """The gateway's charge.success event, through the real webhook receiver."""
        port = free_port()
        env = dict(os.environ, WALLETD_SOCKET=self.d.sock, PAYSTACK_SECRET_KEY="sk_test_paystack",
                   WEBHOOK_LISTEN="127.0.0.1:%d" % port)
        hook = subprocess.Popen([PY, os.path.join(ROOT, "contrib", "payments", "webhook.py")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            hook.stdout.readline()
            body = json.dumps({"event": "charge.success", "data": {
                "id": 4000, "reference": ref, "amount": amount, "currency": "USD", "status": "success"}}).encode()
            sig = hmac.new(b"sk_test_paystack", body, hashlib.sha512).hexdigest()
            req = urllib.request.Request("http://127.0.0.1:%d/paystack" % port, data=body,
                                         headers={"x-paystack-signature": sig})
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        finally:
            hook.terminate()
            hook.wait()
            hook.stdout.close()

    def test_exactly_once_whether_the_webhook_or_the_answer_comes_first(self):
        d = self.d
        self.gw.hold = threading.Event()
        self.start_wallet()
        d.ctl_json("debit", "acme", "6", "x")
        self.wait_for(lambda: self.gw.charges)
        [t] = self.autos()
        self.assertEqual(self.webhook(t["ref"], 2000), 200)  # the webhook first
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "24")
        self.gw.hold.set()  # then the API's answer
        self.wait_for(lambda: d.ctl_json("wallet", "get", "acme")["auto_topup"]["failures"] == 0 and
                      not [n for n in d.ctl_json("notifications", "acme")["notifications"]
                           if n["type"] == "auto_topup" and n["email_state"] == "pending"])
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "24")
        d.ctl_json("debit", "acme", "20", "x")  # 4: the answer first, then the webhook
        self.wait_for(lambda: d.ctl_json("balance", "acme")["balance"] == "24")
        second = [x for x in self.autos() if x["ref"] != t["ref"]][0]
        self.assertEqual(self.webhook(second["ref"], 2000), 200)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "24")
        self.assertEqual(len(self.gw.charges), 2)
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_three_declines_turn_it_off_and_email(self):
        d = self.d
        self.gw.mode = "decline"
        self.start_wallet()
        d.ctl_json("debit", "acme", "6", "x")
        w = self.wait_for(lambda: (lambda w: w if not w["auto_topup"]["active"] else None)(
            d.ctl_json("wallet", "get", "acme")))
        self.assertEqual(w["auto_topup"]["failures"], 3)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "4")
        tops = self.autos()
        self.assertEqual(len(tops), 3)
        self.assertEqual({c["reference"] for c in self.gw.charges}, {t["ref"] for t in tops})
        self.assertTrue(all(t["status"] == "cancelled" and t["problem"]["code"] == "declined" for t in tops))
        mail = self.wait_for(lambda: self.sink.messages())
        self.assertEqual(sorted(mail[0]["to"]), ["ops@platform.example", "owner@acme.example"])
        self.assertIn("Automatic top-up turned off for wallet acme", mail[0]["data"])
        self.assertIn("Insufficient Funds", mail[0]["data"])
        d.ctl_json("debit", "acme", "1", "x")  # off: no more charges
        time.sleep(0.5)
        self.assertEqual(len(self.gw.charges), 3)
        self.gw.mode = "success"  # set again: on, and below already, so it tops up
        d.ctl_json("wallet", "update", "acme", "--auto-topup", AUTO)
        self.wait_for(lambda: d.ctl_json("balance", "acme")["balance"] == "23")
        d.ctl_json("wallet", "update", "acme", "--no-auto-topup")
        self.assertIsNone(d.ctl_json("wallet", "get", "acme")["auto_topup"])
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_max_per_day(self):
        d = self.d
        self.start_wallet("10", AUTO + ",max_per_day=2")
        for i in range(3):
            d.ctl_json("debit", "acme", d.ctl_json("balance", "acme")["balance"], "x")  # to 0: below
            if i < 2:
                self.wait_for(lambda: d.ctl_json("balance", "acme")["balance"] == "20")
        time.sleep(1)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "0")
        self.assertEqual(len(self.autos()), 2)
        self.assertEqual(len(self.gw.charges), 2)

    def test_bad_settings_are_refused_and_change_nothing_else(self):
        d = self.d
        self.start_wallet()
        d.ctl_json("wallet", "update", "acme", "--threshold", "2", "--blocked-prefixes", "2567")
        before = d.ctl_json("wallet", "get", "acme")
        with d.client() as c:
            for auto, field in (("x", "auto_topup"), ({"below": "1"}, "auto_topup.provider"),
                                ({"below": "5", "amount": "1", "to": "9", "provider": "paystack",
                                  "authorization": "A", "email": "a@b.example"}, "auto_topup.amount"),
                                ({"below": "5", "to": "4", "provider": "paystack", "authorization": "A",
                                  "email": "a@b.example"}, "auto_topup.to"),
                                ({"below": "5", "amount": "1", "provider": "stripe", "authorization": "A",
                                  "email": "a@b.example"}, "auto_topup.provider"),
                                ({"below": "5", "amount": "1", "provider": "paystack", "authorization": "A",
                                  "email": "nope"}, "auto_topup.email"),
                                ({"below": "5", "amount": "1", "provider": "paystack", "authorization": "A\0B",
                                  "email": "a@b.example"}, "auto_topup.authorization"),
                                ({"below": "5", "amount": "1", "provider": "paystack", "authorization": "A",
                                  "email": "a@b.example", "max_per_day": 0}, "auto_topup.max_per_day"),
                                ({"below": 5, "amount": 1, "provider": "paystack", "authorization": "A",
                                  "email": "a@b.example", "colour": "red"}, "auto_topup")):
                with self.assertRaises(WalletdError) as e:
                    c.call("wallet.update", wallet="acme", auto_topup=auto)
                self.assertEqual((e.exception.code, e.exception.field), ("invalid_argument", field), e.exception)
        self.assertEqual(d.ctl_json("wallet", "get", "acme"), before)
        d.ctl_json("wallet", "update", "acme", "--auto-topup", AUTO.replace("amount=20", "amount=30"))
        after = d.ctl_json("wallet", "get", "acme")
        self.assertEqual(after["auto_topup"]["amount"], "30")
        self.assertEqual({k: v for k, v in after.items() if k != "auto_topup"},
                         {k: v for k, v in before.items() if k != "auto_topup"})
        d.ctl_json("wallet", "update", "acme", "--threshold", "3")
        self.assertEqual(d.ctl_json("wallet", "get", "acme")["auto_topup"], after["auto_topup"])
        self.assertEqual(d.ctl("wallet", "update", "acme", "--auto-topup", "below").returncode, 2)

    def test_the_readme_line_as_written(self):
        d = self.d
        d.ctl_json("wallet", "create", "acme", "USD")
        d.ctl_json("credit", "acme", "10", "opening balance")
        [line] = indented(readme(), "--auto-topup")
        env = dict(os.environ, WALLETD_SOCKET=d.sock, PATH=WALLETCTL_DIR + ":" + os.environ["PATH"])
        r = subprocess.run(["sh", "-c", line], env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.wait_for(lambda: d.ctl_json("balance", "acme")["balance"] == "210")  # 10 is below 50 already
        self.assertEqual([(c["amount"], c["email"]) for c in self.gw.charges], [(20000, "billing@acme.example")])

    def test_a_cancelled_request_is_not_charged(self):
        d = self.d
        d.config["alert_interval"] = "3"  # the retry after a decline comes 3 s later
        d.restart()
        self.gw.mode = "decline"
        self.start_wallet()
        d.ctl_json("debit", "acme", "6", "x")
        self.wait_for(lambda: len(self.gw.charges) == 1)

        def retry_made():  # with the decline's commit, which cancels the first (pending until then)
            autos = self.autos()
            return [t for t in autos if t["status"] == "pending"] if len(autos) == 2 else None
        retry = self.wait_for(retry_made)[0]
        d.ctl_json("topup", "cancel", retry["ref"])  # staff stop it before its retry
        self.gw.mode = "success"
        time.sleep(5)
        self.assertEqual(len(self.gw.charges), 1)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "4")
        self.assertEqual(d.ctl_json("wallet", "get", "acme")["auto_topup"]["failures"], 1)
