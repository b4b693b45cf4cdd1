"""Delivery reports and the refund policy of each rate row: delivery and delivery.batch
against a real walletd, every policy on SMS and WhatsApp, partial parts, replays and
conflicts, and a storm of reports while charges go on."""
import decimal
import os
import shlex
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from harness import DaemonTest, ROOT
from test_topups import free_port

D = decimal.Decimal
UG = "+256712345678"


class Delivery(DaemonTest):
    def setUp(self):
        super().setUp()
        d = self.d
        d.ctl_json("wallet", "create", "acme", "USD")
        d.ctl_json("credit", "acme", "100", "opening")
        d.ctl_json("fx", "set", "USD", "UGX", "3723.40")
        # a plan a policy: the price 35 UGX an SMS part (0.0094 USD), 0.02 USD a WhatsApp message
        for plan, policy in (("keep", []), ("refund", ["--on-failure", "refund"]),
                             ("fee", ["--on-failure", "fee", "--failure-fee", "5"])):
            d.ctl_json("rate", "set", plan, "sms", "256", "35", "UGX", *policy)
            fee = ["--on-failure", "fee", "--failure-fee", "0.005"] if plan == "fee" else policy
            d.ctl_json("rate", "set", plan, "whatsapp", "256", "0.02", "USD", *fee)

    def on_plan(self, plan):
        self.d.ctl_json("wallet", "update", "acme", "--plan", plan)

    def balance(self):
        return D(self.d.ctl_json("balance", "acme")["balance"])

    def test_each_policy_on_sms_and_whatsapp(self):
        d = self.d
        # plan, channel, segments, report, failed_parts: the refund expected
        cases = [("keep", "sms", 2, "failed", None, None),
                 ("refund", "sms", 3, "failed", None, "0.0282"),
                 ("refund", "sms", 3, "rejected", 2, "0.0188"),
                 ("refund", "sms", 3, "delivered", None, None),
                 ("refund", "whatsapp", 1, "expired", None, "0.02"),
                 ("fee", "sms", 2, "failed", None, "0.017457"),     # 0.0188 less 5 UGX (0.001343)
                 ("fee", "whatsapp", 1, "failed", None, "0.015"),   # 0.02 less 0.005
                 ("keep", "whatsapp", 1, "expired", None, None)]
        for i, (plan, channel, segments, status, parts, refund) in enumerate(cases):
            self.on_plan(plan)
            args = ["--segments", str(segments)] if channel == "sms" else []
            charge = d.ctl_json("charge", "acme", channel, UG, "m%d" % i, *args)
            before = self.balance()
            report = ["--failed-parts", str(parts)] if parts else []
            r = d.ctl_json("delivery", "acme", "m%d" % i, status, "--error", "absent subscriber", *report)
            dlr = r["delivery"]
            self.assertEqual((r["txn"], dlr["status"], dlr["failed_parts"], dlr["error"], r["replayed"]),
                             (charge["id"], status, parts, "absent subscriber", False), cases[i])
            if refund is None:
                self.assertIsNone(r["refund"], cases[i])
                self.assertEqual(self.balance(), before)
                continue
            self.assertEqual((r["refund"]["type"], r["refund"]["amount"], r["refund"]["refund_of"]),
                             ("refund", refund, charge["id"]), cases[i])
            self.assertTrue(r["refund"]["description"].endswith(": delivery %s: absent subscriber" % status))
            self.assertEqual(self.balance(), before + D(refund))
        # the charge carries its report in history, statement and export; a charge without one does not
        d.ctl_json("charge", "acme", "sms", UG, "unreported")
        for name, rows in (("history", d.ctl_json("history", "acme", "--limit", "100")["transactions"]),
                           ("statement", d.ctl_json("statement", "acme")["transactions"]),
                           ("export", d.ctl_json("export")["transactions"])):
            charges = {t["ref"]: t for t in rows if t["type"].endswith("_charge")}
            self.assertEqual(len(charges), len(cases) + 1, name)
            self.assertNotIn("delivery", charges["unreported"], name)
            for i, (plan, channel, segments, status, parts, refund) in enumerate(cases):
                self.assertEqual(charges["m%d" % i]["delivery"]["status"], status, name)
                self.assertEqual(charges["m%d" % i]["delivery"]["failed_parts"], parts, name)
                self.assertEqual(charges["m%d" % i]["delivery"]["error"], "absent subscriber", name)
        # the policy is the one the charge was priced with: changing the rate later changes nothing
        self.on_plan("refund")
        d.ctl_json("charge", "acme", "sms", UG, "late")
        d.ctl_json("rate", "set", "refund", "sms", "256", "35", "UGX", "--on-failure", "keep")
        self.assertEqual(d.ctl_json("delivery", "acme", "late", "failed")["refund"]["amount"], "0.0094")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_the_first_report_stands(self):
        d = self.d
        self.on_plan("refund")
        d.ctl_json("charge", "acme", "sms", UG, "m1")
        first = d.ctl_json("delivery", "acme", "m1", "failed", "--error", "e1")
        again = d.ctl_json("delivery", "acme", "m1", "failed", "--error", "e1")
        self.assertTrue(again["replayed"])
        self.assertEqual((again["refund"]["id"], again["delivery"]), (first["refund"]["id"], first["delivery"]))
        for other in (["delivered"], ["failed"], ["failed", "--error", "e2"], ["failed", "--error", "e1",
                                                                                "--failed-parts", "1"]):
            e = d.ctl_json("delivery", "acme", "m1", *other, expect=1)
            self.assertEqual((e["code"], e["txn"]), ("idempotency_conflict", first["txn"]), other)
        self.assertEqual(d.ctl_json("history", "acme", "--type", "refund")["total"], 1)  # refunded once
        # what is left of a charge refunded by hand is all a failure gives back; nothing left, nothing
        d.ctl_json("charge", "acme", "sms", UG, "m2", "--segments", "2")
        d.ctl_json("refund", "acme", "--ref", "m2", "--amount", "0.01", "--refund-ref", "by-hand")
        self.assertEqual(d.ctl_json("delivery", "acme", "m2", "failed")["refund"]["amount"], "0.0088")
        d.ctl_json("charge", "acme", "sms", UG, "m3")
        d.ctl_json("refund", "acme", "--ref", "m3")
        self.assertIsNone(d.ctl_json("delivery", "acme", "m3", "failed")["refund"])
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_bad_reports_are_refused_and_change_nothing(self):
        d = self.d
        self.on_plan("refund")
        d.ctl_json("charge", "acme", "sms", UG, "m1", "--segments", "2")
        last = d.ctl_json("export")["last_id"]
        e = lambda *a: d.ctl_json("delivery", *a, expect=1)  # noqa: E731
        self.assertEqual(e("acme", "nosuch", "failed")["code"], "unknown_txn")
        self.assertEqual(e("nobody", "m1", "failed")["code"], "unknown_wallet")
        self.assertEqual(e("acme", "m1", "lost")["field"], "status")
        self.assertEqual(e("acme", "m1", "failed", "--failed-parts", "3")["field"], "failed_parts")
        self.assertEqual(e("acme", "m1", "failed", "--failed-parts", "0")["field"], "failed_parts")
        self.assertEqual(e("acme", "m1", "delivered", "--failed-parts", "1")["field"], "failed_parts")
        self.assertEqual(e("acme", "m1", "failed", "--error", "x" * 257)["field"], "error")
        with d.client() as c:
            for params in ({"wallet": "acme", "ref": "m1", "status": "failed", "parts": 1},
                           {"wallet": "acme", "ref": "m1", "status": 3},
                           {"wallet": "acme", "ref": "m1", "status": "fail\0ed"}):
                self.assertRaises(Exception, c.call, "delivery", **params)
        self.assertEqual(d.ctl_json("export")["last_id"], last)
        e = d.ctl_json("rate", "set", "refund", "sms", "44", "1", "USD", "--failure-fee", "1", expect=1)
        self.assertEqual(e["field"], "failure_fee")
        e = d.ctl_json("rate", "set", "refund", "sms", "44", "1", "USD", "--on-failure", "fee", expect=1)
        self.assertEqual(e["field"], "failure_fee")
        self.assertEqual(d.ctl_json("rate", "set", "refund", "sms", "44", "1", "USD", "--on-failure", "never",
                                    expect=1)["field"], "on_failure")

    def test_a_new_price_keeps_the_rows_policy(self):
        d = self.d
        d.ctl_json("rate", "set", "fee", "sms", "256", "40", "UGX")  # a price change names no policy
        row = d.ctl_json("rate", "lookup", "sms", UG, "--plan", "fee")
        self.assertEqual((row["price"], row["on_failure"], row["failure_fee"]), ("40", "fee", "5"))
        d.ctl_json("rate", "set", "fee", "sms", "256", "40", "UGX", "--failure-fee", "6")
        self.assertEqual(d.ctl_json("rate", "lookup", "sms", UG, "--plan", "fee")["failure_fee"], "6")
        listed = [r for r in d.ctl_json("rate", "list", "--plan", "fee")["rates"] if r["channel"] == "sms"]
        self.assertEqual([(r["on_failure"], r["failure_fee"]) for r in listed], [("fee", "6")])
        d.ctl_json("rate", "set", "fee", "sms", "256", "40", "UGX", "--on-failure", "keep")
        row = d.ctl_json("rate", "lookup", "sms", UG, "--plan", "fee")
        self.assertEqual((row["on_failure"], row["failure_fee"]), ("keep", None))
        rows = [{"plan": "imported", "channel": "sms", "prefix": "256", "price": "35", "currency": "UGX",
                 "on_failure": "fee", "failure_fee": "1"}]
        with d.client() as c:
            self.assertEqual(c.call("rate.import", rows=rows, mode="upsert")["loaded"], 1)
        row = d.ctl_json("rate", "lookup", "sms", UG, "--plan", "imported")
        self.assertEqual((row["on_failure"], row["failure_fee"]), ("fee", "1"))

    def test_a_storm_of_reports_in_batches_while_charges_go_on(self):
        d = self.d
        self.on_plan("refund")
        d.ctl_json("credit", "acme", "10000", "for the storm")
        n, size = 100000, 1000
        refs = ["s%d" % i for i in range(n)]
        with d.client() as c:
            for i in range(0, n, size):
                items = [{"wallet": "acme", "channel": "sms", "to": UG, "ref": r} for r in refs[i:i + size]]
                self.assertTrue(all("error" not in x for x in c.call("charge.batch", items=items)["results"]))
        others = []

        def charge_on():
            with d.client() as c:
                for i in range(2000):
                    others.append(c.charge(wallet="acme", channel="sms", to=UG, ref="o%d" % i)["amount"])

        t = threading.Thread(target=charge_on)
        t.start()
        refunded = D(0)
        with d.client() as c:
            for i in range(0, n, size):  # every other report failed: half the storm refunds
                items = [{"wallet": "acme", "ref": r, "status": "failed" if k % 2 else "delivered"}
                         for k, r in enumerate(refs[i:i + size], i)]
                results = c.call("delivery.batch", items=items)["results"]
                self.assertEqual(len(results), size)
                refunded += sum(r["refund"]["amount"] for r in results if r["refund"])
                again = c.call("delivery.batch", items=items[:10])["results"]  # a redelivered batch: replays
                self.assertTrue(all(r["replayed"] for r in again))
        t.join()
        self.assertEqual(len(others), 2000)
        self.assertEqual(refunded, D("0.0094") * (n // 2))
        self.assertEqual(self.balance(), D("10100") - D("0.0094") * (n + 2000) + refunded)
        self.assertEqual(d.ctl_json("history", "acme", "--type", "refund")["total"], n // 2)
        self.assertTrue(d.ctl_json("verify")["ok"])


class DlrReceiver(DaemonTest):
    """contrib/examples/dlr_receiver.py as a real process, sent requests shaped as Kannel's dlr-url
    calls and Jasmin's DLR POSTs are."""

    def setUp(self):
        super().setUp()
        d = self.d
        self.seed("100")
        d.ctl_json("rate", "set", "default", "sms", "256", "35", "UGX", "--on-failure", "refund")
        self.port = free_port()
        with open(os.path.join(ROOT, "README.md")) as f:  # the README's line, but for port and socket
            line, = [x.strip() for x in f if x.startswith("    /usr/bin/python3 contrib/examples/dlr_receiver")]
        line = line.replace("8083", str(self.port)).replace("/run/walletd/walletd.sock", d.sock)
        self.receiver = subprocess.Popen(shlex.split(line), cwd=ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        self.assertIn("dlr_receiver on", self.receiver.stdout.readline())

    def tearDown(self):
        self.receiver.terminate()
        self.receiver.communicate()
        super().tearDown()

    def send(self, path, form=None):
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.port, path), data=data)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def report(self, ref):
        t = [t for t in self.d.ctl_json("history", "acme", "--limit", "100")["transactions"] if t.get("ref") == ref]
        return t[0].get("delivery")

    def test_kannel_and_jasmin_reports_become_deliveries(self):
        d = self.d
        for ref in ("k1", "k2", "k3", "k4", "k5", "j1", "j2", "j3"):
            d.ctl_json("charge", "acme", "sms", UG, ref)
        answer = "id:0123 sub:001 dlvrd:%s submit date:2612070900 done date:2612070901 stat:%s err:%s text:hi"
        kannel = "/kannel?wallet=acme&ref=%s&type=%s&answer=%s"
        q = urllib.parse.quote
        self.assertEqual(self.send(kannel % ("k1", 8, q("ACK/"))), (200, "not final\n"))  # at the SMSC
        self.assertIsNone(self.report("k1"))
        self.assertEqual(self.send(kannel % ("k1", 1, q(answer % ("001", "DELIVRD", "000")))), (200, "recorded\n"))
        self.assertEqual(self.send(kannel % ("k1", 1, q(answer % ("001", "DELIVRD", "000")))),
                         (200, "already recorded\n"))
        self.assertEqual(self.send(kannel % ("k2", 2, q(answer % ("000", "UNDELIV", "001")))), (200, "recorded\n"))
        self.assertEqual(self.send(kannel % ("k3", 16, "")), (200, "recorded\n"))  # the SMSC refused it
        self.assertEqual(self.send(kannel % ("k4", 2, q(answer % ("000", "EXPIRED", "000")))), (200, "recorded\n"))
        self.assertEqual((self.report("k1")["status"], self.report("k2")["status"], self.report("k2")["error"],
                          self.report("k3")["status"], self.report("k4")["status"]),
                         ("delivered", "failed", "err:001", "rejected", "expired"))
        jasmin = "/jasmin?wallet=acme&ref=%s"
        taken = {"id": "16fd2706-8baf-433b-82eb-8c7fada847da", "message_status": "ESME_ROK", "level": "3"}
        self.assertEqual(self.send(jasmin % "j1", taken), (200, "ACK/Jasmin"))
        self.assertIsNone(self.report("j1"))
        final = dict(taken, id_smsc="2567", message_status="DELIVRD", subdate="2612070900",
                     donedate="2612070901", sub="001", dlvrd="001", err="000", text="Hello foo bar")
        self.assertEqual(self.send(jasmin % "j1", final), (200, "ACK/Jasmin"))
        self.assertEqual(self.send(jasmin % "j2", dict(final, message_status="UNDELIV", err="034")),
                         (200, "ACK/Jasmin"))
        self.assertEqual(self.send(jasmin % "j3", dict(taken, level="1", message_status="ESME_RINVNUMDESTS")),
                         (200, "ACK/Jasmin"))
        self.assertEqual((self.report("j1")["status"], self.report("j2")["status"], self.report("j2")["error"],
                          self.report("j3")["status"], self.report("j3")["error"]),
                         ("delivered", "failed", "err:34", "rejected", "ESME_RINVNUMDESTS"))
        refunds = d.ctl_json("history", "acme", "--type", "refund")["transactions"]
        self.assertEqual(sorted(t["description"].split(": ", 1)[1] for t in refunds),
                         ["delivery expired", "delivery failed: err:001", "delivery failed: err:34",
                          "delivery rejected", "delivery rejected: ESME_RINVNUMDESTS"])
        self.assertEqual(self.send(kannel % ("nosuch", 1, "")), (200, "unknown charge\n"))
        self.assertEqual(self.send("/kannel?type=1")[0], 400)  # no wallet and ref
        self.assertEqual(self.send(jasmin % "k5", dict(final, message_status="UNDELIV", err="1"))[1], "ACK/Jasmin")
        self.assertEqual(self.send(kannel % ("k5", 1, ""))[0], 400)  # another report of k5: a conflict, no ACK
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_reports_that_arrive_together_share_a_commit(self):
        d = self.d
        n = 300
        with d.client() as c:
            c.call("charge.batch", items=[{"wallet": "acme", "channel": "sms", "to": UG, "ref": "b%d" % i}
                                          for i in range(n)])
        before = d.ctl_json("stats")["requests"].get("delivery.batch", {}).get("calls", 0)
        answers = []

        def one(i):
            try:
                answers.append(self.send("/kannel?wallet=acme&ref=b%d&type=2&answer=%s" % (i, "stat%3AUNDELIV")))
            except OSError as e:  # so that a refused or timed-out connection fails the test by name
                answers.append(repr(e))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(answers, [(200, "recorded\n")] * n)
        calls = d.ctl_json("stats")["requests"]["delivery.batch"]["calls"] - before
        self.assertLess(calls, n)  # batched: fewer calls than reports
        self.assertEqual(d.ctl_json("history", "acme", "--type", "refund")["total"], n)
        d.stop()
        self.assertEqual(self.send("/kannel?wallet=acme&ref=b1&type=1&answer=")[0], 503)  # a gateway retries
        d.start()
        self.assertEqual(self.send("/kannel?wallet=acme&ref=b1&type=2&answer=stat%3AUNDELIV"),
                         (200, "already recorded\n"))


class SettleOnDelivery(DaemonTest):
    def setUp(self):
        super().setUp()
        d = self.d
        self.seed("10")  # USD; 35 UGX a message; USD UGX 3723.40
        d.ctl_json("wallet", "update", "acme", "--plan", "settle")
        d.ctl_json("rate", "set", "settle", "sms", "256", "35", "UGX", "--settle", "delivery")
        # the WhatsApp model: not charged if undelivered, not even when no report comes
        d.ctl_json("rate", "set", "settle", "whatsapp", "256", "0.02", "USD", "--settle", "delivery",
                   "--pending-timeout-action", "release")

    def money(self):
        b = self.d.ctl_json("balance", "acme")
        return D(b["balance"]), D(b["held"]), D(b["available"])

    def charges(self):
        return {t["ref"]: t for t in self.d.ctl_json("history", "acme", "--limit", "100")["transactions"]
                if t["type"].endswith("_charge")}

    def test_held_until_the_report_then_charged_at_the_held_price_or_released(self):
        d = self.d
        row = d.ctl_json("rate", "lookup", "sms", UG, "--plan", "settle")
        self.assertEqual((row["settle"], row["pending_timeout"], row["pending_timeout_action"]),
                         ("delivery", 72 * 3600, "charge"))
        t = d.ctl_json("charge", "acme", "sms", UG, "p1")
        self.assertEqual((t["id"], t["pending"], t["amount"], t["balance_after"], t["replayed"]),
                         (None, True, "-0.0094", "10", False))
        self.assertEqual(self.money(), (D("10"), D("0.0094"), D("9.9906")))
        again = d.ctl_json("charge", "acme", "sms", UG, "p1")
        self.assertEqual((again["id"], again["pending"], again["replayed"]), (None, True, True))
        self.assertEqual(self.charges(), {})  # nothing charged yet
        d.ctl_json("rate", "set", "settle", "sms", "256", "70", "UGX")  # the price doubles meanwhile
        d.ctl_json("wallet", "update", "acme", "--threshold", "9.995")
        self.assertEqual(d.ctl_json("notifications", "acme")["notifications"], [])  # held: not spent yet
        r = d.ctl_json("delivery", "acme", "p1", "delivered")
        self.assertEqual([n["type"] for n in d.ctl_json("notifications", "acme")["notifications"]], ["low_balance"])
        self.assertIsNotNone(r["txn"])
        self.assertEqual(self.charges()["p1"]["amount"], "-0.0094")  # at the price it was held at
        self.assertEqual(self.charges()["p1"]["delivery"]["status"], "delivered")
        self.assertEqual(self.money(), (D("9.9906"), D("0"), D("9.9906")))
        self.assertEqual(d.ctl_json("charge", "acme", "sms", UG, "p1")["id"], r["txn"])  # now the transaction
        d.ctl_json("charge", "acme", "whatsapp", UG, "w1")
        self.assertEqual(self.money()[1], D("0.02"))
        r = d.ctl_json("delivery", "acme", "w1", "failed", "--error", "not on WhatsApp")
        self.assertEqual((r["txn"], r["refund"], r["delivery"]["status"]), (None, None, "failed"))
        self.assertEqual(self.money(), (D("9.9906"), D("0"), D("9.9906")))  # released: never charged
        self.assertNotIn("w1", self.charges())
        replay = d.ctl_json("charge", "acme", "whatsapp", UG, "w1")
        self.assertEqual((replay["id"], replay["pending"], replay["replayed"]), (None, False, True))
        self.assertEqual(d.ctl_json("delivery", "acme", "w1", "delivered", expect=1)["code"], "idempotency_conflict")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_what_is_held_cannot_be_spent_twice_and_survives_a_restart(self):
        d = self.d
        d.ctl_json("wallet", "create", "small", "USD", "--plan", "settle")
        d.ctl_json("credit", "small", "0.03", "opening")
        d.ctl_json("charge", "small", "whatsapp", UG, "a")
        self.assertEqual(d.ctl_json("charge", "small", "whatsapp", UG, "b", expect=4)["code"],
                         "insufficient_balance")  # 0.03 less 0.02 held: 0.01 left
        self.assertEqual(d.ctl_json("charge", "small", "whatsapp", UG, "b", "--hold", "h", expect=1)["field"], "hold")
        self.assertEqual(d.ctl_json("hold", "create", "small", "--ref", "dlr:x", "--amount", "0.001",
                                    expect=1)["field"], "ref")
        self.assertEqual(d.ctl_json("hold", "release", "small", "dlr:a", expect=1)["field"], "hold")
        d.restart()
        self.assertEqual(D(d.ctl_json("balance", "small")["held"]), D("0.02"))
        self.assertIsNotNone(d.ctl_json("delivery", "small", "a", "delivered")["txn"])
        self.assertEqual(d.ctl_json("balance", "small")["balance"], "0.01")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_no_report_in_time_is_settled_by_walletd_as_the_rate_says(self):
        d = self.d
        d.ctl_json("wallet", "update", "acme", "--threshold", "9.995")  # crossed when walletd charges s1
        for channel, price in (("sms", "35"), ("whatsapp", "0.02")):
            currency = "UGX" if channel == "sms" else "USD"
            action = ["--pending-timeout-action", "release"] if channel == "whatsapp" else []
            d.ctl_json("rate", "set", "settle", channel, "256", price, currency, "--pending-timeout", "2", *action)
        d.ctl_json("charge", "acme", "sms", UG, "s1")
        with d.client() as c:  # twenty timing out in one writer turn
            items = [{"wallet": "acme", "channel": "whatsapp", "to": UG, "ref": "w%d" % i} for i in range(1, 21)]
            self.assertTrue(all("error" not in x for x in c.call("charge.batch", items=items)["results"]))
        self.assertEqual(self.money()[1], D("0.4094"))
        deadline = time.time() + 30
        while self.money()[1] != 0 and time.time() < deadline:
            time.sleep(0.2)
        self.assertEqual(self.money(), (D("9.9906"), D("0"), D("9.9906")))  # s1 charged, w1 to w20 released
        notes = d.ctl_json("notifications", "acme")["notifications"]  # s1's charge crossed the threshold
        self.assertEqual([(n["type"], n["balance"]) for n in notes], [("low_balance", "9.9906")])
        self.assertEqual(set(self.charges()), {"s1"})
        held = d.ctl_json("hold", "list", "acme")["holds"]
        self.assertEqual({h["status"] for h in held}, {"released"})  # settled, not merely expired
        self.assertEqual(d.ctl_json("charge", "acme", "whatsapp", UG, "w1")["pending"], False)
        late = d.ctl_json("delivery", "acme", "s1", "failed")  # a late report: recorded, the rate keeps the money
        self.assertEqual((late["txn"], late["refund"]), (self.charges()["s1"]["id"], None))
        self.assertTrue(d.ctl_json("verify")["ok"])
