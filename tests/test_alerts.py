"""Low-balance alerts and top-up receipts: durable notifications, e-mail through a real SMTP server."""
import email
import os
import subprocess
import time

from harness import DaemonTest, HERE, PY, json_files
from test_topups import free_port


class SmtpSink:
    def __init__(self, port, directory):
        self.port, self.dir = port, directory
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([PY, os.path.join(HERE, "smtp_sink.py"), str(self.port), self.dir],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.proc.stdout.readline()

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None

    def messages(self):
        return json_files(self.dir)

    def wait_for(self, count, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.messages()) >= count:
                time.sleep(0.3)  # and no more
                return self.messages()
            time.sleep(0.1)
        return self.messages()


class AlertBase(DaemonTest):
    """A daemon with SMTP pointed at a sink of our own (started by each test)."""

    def setUp(self):
        self.port = free_port()
        self.config = {"smtp_url": "smtp://127.0.0.1:%d" % self.port, "smtp_from": "billing@platform.example",
                       "alert_interval": "1", "smtp_timeout": "5"}
        super().setUp()
        self.sink = SmtpSink(self.port, os.path.join(self.d.dir, "mail"))

    def tearDown(self):
        self.sink.stop()
        super().tearDown()

    def make_wallet(self):
        d = self.d
        d.ctl_json("wallet", "create", "acme", "USD", "--threshold", "5",
                   "--alert-email", "ops@acme.example", "--alert-email", "cfo@acme.example")
        d.ctl_json("credit", "acme", "5.20", "opening")
        d.ctl_json("rate", "set", "default", "sms", "1", "1", "USD")

    def charge(self, ref):
        return self.d.ctl_json("charge", "acme", "sms", "+15550000000", ref)


class Alerts(AlertBase):
    def test_one_email_per_crossing_and_rearm(self):
        self.sink.start()
        self.make_wallet()
        self.charge("a")                       # 5.20 -> 4.20: crossing
        msgs = self.sink.wait_for(1)
        self.assertEqual(len(msgs), 1)
        m = email.message_from_string(msgs[0]["data"])
        self.assertEqual(m["Subject"], "Low balance: acme is at 4.20 USD (threshold 5.00 USD)")
        self.assertEqual(sorted(msgs[0]["to"]), ["cfo@acme.example", "ops@acme.example"])
        self.assertEqual(msgs[0]["from"], "billing@platform.example")
        for h in ("Date", "Message-ID", "From", "To"):
            self.assertIn(h, m)
        self.assertIn("4.20 USD", m.get_payload())
        self.charge("b")                       # 3.20: still below, nothing
        self.d.ctl_json("debit", "acme", "1", "fee")
        time.sleep(1.5)
        self.assertEqual(len(self.sink.messages()), 1)
        notes = self.d.ctl_json("notifications", "acme")["notifications"]
        self.assertEqual([(n["email_state"], n["attempts"]) for n in notes], [("sent", 1)])
        self.d.ctl_json("credit", "acme", "10", "top up")   # 12.20: re-armed
        self.d.ctl_json("debit", "acme", "8", "x")           # 4.20: second crossing
        self.assertEqual(len(self.sink.wait_for(2)), 2)
        self.d.ctl_json("wallet", "update", "acme", "--threshold", "3")  # changing it sends nothing
        time.sleep(1.2)
        self.assertEqual(len(self.sink.messages()), 2)

    def test_smtp_down_then_up_delivers_once(self):
        self.make_wallet()
        self.charge("a")
        deadline = time.time() + 10
        while time.time() < deadline:
            n = self.d.ctl_json("notifications", "acme")["notifications"][0]
            if n["attempts"] >= 1:
                break
            time.sleep(0.2)
        self.assertEqual(n["email_state"], "pending")
        self.assertGreaterEqual(n["attempts"], 1)
        self.assertTrue(n["last_error"])
        self.sink.start()
        self.assertEqual(len(self.sink.wait_for(1, timeout=30)), 1)
        time.sleep(2)
        self.assertEqual(len(self.sink.messages()), 1)
        n = self.d.ctl_json("notifications", "acme")["notifications"][0]
        self.assertEqual(n["email_state"], "sent")
        self.assertGreaterEqual(n["attempts"], 2)

    def test_pending_alert_survives_kill_and_is_sent_once(self):
        self.make_wallet()
        self.charge("a")
        self.d.kill()
        self.sink.start()
        self.d.start()
        self.assertEqual(len(self.sink.wait_for(1)), 1)
        self.d.restart()
        time.sleep(2)
        self.assertEqual(len(self.sink.messages()), 1)


class Reminders(AlertBase):
    def setUp(self):
        super().setUp()
        self.d.config["alert_remind"] = "2"
        self.d.restart()

    def test_reminder_while_still_below_then_none_after_top_up(self):
        self.sink.start()
        self.make_wallet()
        self.charge("a")
        msgs = self.sink.wait_for(2, timeout=15)
        self.assertGreaterEqual(len(msgs), 2)
        second = email.message_from_string(msgs[1]["data"])
        self.assertTrue(second["Subject"].startswith("Reminder: Low balance: acme"))
        self.d.ctl_json("credit", "acme", "100", "top up")
        time.sleep(1)
        count = len(self.sink.messages())
        time.sleep(4)
        self.assertEqual(len(self.sink.messages()), count)


class Receipts(AlertBase):
    def test_a_credited_top_up_sends_one_receipt_also_across_a_restart(self):
        d = self.d
        self.make_wallet()
        tp = d.ctl_json("topup", "create", "acme", "25")
        d.ctl_json("topup", "confirm", tp["ref"], "25", "flutterwave", "FLW-991")
        d.ctl_json("topup", "confirm", tp["ref"], "25", "flutterwave", "FLW-991")  # the gateway's retry
        notes = d.ctl_json("notifications", "acme")["notifications"]
        self.assertEqual([(n["type"], n["amount"], n["provider_ref"], n["email_state"]) for n in notes],
                         [("receipt", "25", "FLW-991", "pending")])  # recorded in the commit of the credit
        d.restart()  # SMTP down until now: the receipt waits, durable
        self.sink.start()
        msgs = self.sink.wait_for(1)
        self.assertEqual(len(msgs), 1)
        m = email.message_from_string(msgs[0]["data"])
        self.assertEqual(m["Subject"], "Payment received: 25.00 USD credited to acme")
        body = m.get_payload()
        self.assertIn("Payment reference: FLW-991", body)
        self.assertIn("New balance:       30.20 USD", body)
        self.assertEqual(sorted(msgs[0]["to"]), ["cfo@acme.example", "ops@acme.example"])
        d.restart()
        time.sleep(1.5)
        self.assertEqual(len(self.sink.messages()), 1)  # sent once, never again
        self.assertEqual(d.ctl_json("notifications", "acme")["notifications"][0]["email_state"], "sent")

    def test_receipts_off_sends_none(self):
        d = self.d
        d.config["receipts"] = "off"
        d.restart()
        self.sink.start()
        self.make_wallet()
        tp = d.ctl_json("topup", "create", "acme", "5")
        d.ctl_json("topup", "confirm", tp["ref"], "5", "paystack", "PS-1")
        time.sleep(1.5)
        self.assertEqual((self.sink.messages(), d.ctl_json("notifications", "acme")["notifications"]), ([], []))


class PaymentProblems(AlertBase):
    def test_a_payment_that_cannot_be_credited_is_kept_mailed_to_ops_and_credited_once_later(self):
        d = self.d
        d.config["ops_emails"] = "ops@platform.example,finance@platform.example"
        d.restart()
        self.sink.start()
        self.make_wallet()
        tp = d.ctl_json("topup", "create", "acme", "10")
        e = d.ctl_json("topup", "confirm", tp["ref"], "15000", "flutterwave", "FLW-7", "--currency", "NGN", expect=1)
        self.assertEqual(e["code"], "no_fx_rate")
        got = d.ctl_json("topup", "get", tp["ref"])
        self.assertEqual((got["status"], got["problem"]["code"]), ("pending", "no_fx_rate"))
        self.assertEqual([t["ref"] for t in d.ctl_json("topup", "list", "acme", "--status", "problem")["topups"]],
                         [tp["ref"]])
        msgs = self.sink.wait_for(1)
        self.assertEqual(len(msgs), 1)
        m = email.message_from_string(msgs[0]["data"])
        self.assertEqual(m["Subject"], "Payment not credited: 15000.00 NGN for wallet acme")
        self.assertEqual(sorted(msgs[0]["to"]), ["finance@platform.example", "ops@platform.example"])
        self.assertIn("FLW-7 (NGN; No exchange rate from NGN to USD)", m.get_payload())
        self.assertEqual(d.ctl_json("history", "acme")["total"], 1)  # nothing credited
        d.ctl_json("fx", "set", "USD", "NGN", "1500")  # staff fix the cause; the gateway retries
        t = d.ctl_json("topup", "confirm", tp["ref"], "15000", "flutterwave", "FLW-7", "--currency", "NGN")
        self.assertEqual((t["transaction"]["amount"], t["topup"]["status"]), ("10", "paid"))
        d.ctl_json("topup", "confirm", tp["ref"], "15000", "flutterwave", "FLW-7", "--currency", "NGN")
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "15.2")  # credited once
        self.assertEqual(d.ctl_json("topup", "list", "acme", "--status", "problem")["topups"], [])
        self.assertEqual(d.ctl_json("topup", "get", tp["ref"])["problem"]["code"], "no_fx_rate")  # the record stays
        self.assertTrue(d.ctl_json("verify")["ok"])
