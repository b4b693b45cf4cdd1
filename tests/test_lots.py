"""Credit that expires (README: Credit that expires): lots, their draw order, expiry at the second
(walletd's clock set through tests/faults.so), across a restart, and verify over them."""
import decimal
import os
import time

from harness import DaemonTest, set_clock, utc
import walletd  # noqa: E402 (harness puts contrib/python on the path)

D = decimal.Decimal
UG = "+256712345678"
DAY = 86400


class Lots(DaemonTest):
    def lots(self, wallet="acme"):
        return [(x["kind"], x["amount"], x["remaining"]) for x in self.d.ctl_json("wallet", "get", wallet)["lots"]]

    def test_promo_first_then_the_soonest_to_expire_then_the_rest(self):
        d = self.d
        self.seed("10")
        self.assertEqual(d.ctl_json("wallet", "get", "acme")["lots"], [])
        self.assertNotIn("lots", d.ctl_json("balance", "acme"))  # balance answers lots only when there are some
        d.ctl_json("credit", "acme", "3", "paid, 30 days", "--expires-in", "30")
        d.ctl_json("credit", "acme", "2", "paid, 7 days", "--expires-in", "7")
        d.ctl_json("credit", "acme", "5", "welcome offer", "--kind", "promo")
        d.ctl_json("credit", "acme", "1", "promo, 1 day", "--promo", "--expires-in", "1")  # --promo: --kind promo
        self.assertEqual(self.lots(), [("promo", "1", "1"), ("promo", "5", "5"), ("paid", "2", "2"),
                                       ("paid", "3", "3")])
        got = d.ctl_json("wallet", "get", "acme")["lots"]
        self.assertEqual([x["expires_at"] is None for x in got], [False, True, False, False])
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "21")
        self.assertEqual(len(d.ctl_json("balance", "acme")["lots"]), 4)
        d.ctl_json("debit", "acme", "3", "x")  # the promo lot of 1 day, then 2 of the other promo
        self.assertEqual(self.lots(), [("promo", "5", "3"), ("paid", "2", "2"), ("paid", "3", "3")])
        self.charge_sms(100)  # 0.94 from the promo lot
        self.assertEqual(self.lots(), [("promo", "5", "2.06"), ("paid", "2", "2"), ("paid", "3", "3")])
        d.ctl_json("wallet", "create", "shop", "USD", "--parent", "acme")
        d.ctl_json("transfer", "acme", "shop", "6.06", "--ref", "t1")  # a transfer draws them too
        self.assertEqual(self.lots(), [("paid", "3", "1")])
        d.ctl_json("debit", "acme", "1", "x")
        self.assertEqual(self.lots(), [])
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "10")  # the rest, which never expires
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))

    def test_expiry_at_the_second_and_across_a_restart_once(self):
        d = self.d
        t0 = utc("2026-11-15T12:00:00Z")
        clock = d.restart_with_clock(t0)

        def at(t):
            set_clock(clock, t)
        self.seed("10")
        d.ctl_json("credit", "acme", "4", "promo", "--kind", "promo", "--expires-in", "1")
        d.ctl_json("credit", "acme", "3", "paid", "--expires-in", "2")
        d.ctl_json("debit", "acme", "1", "x")  # from the promo lot: 3 of it is left to expire
        at(t0 + DAY - 1)
        d.ctl_json("wallet", "create", "poke", "USD")  # a write wakes the writer
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "16")
        at(t0 + DAY)
        d.ctl_json("wallet", "create", "poke2", "USD")
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "13")
        [e] = d.ctl_json("history", "acme", "--type", "expiry")["transactions"]
        self.assertEqual((e["amount"], e["balance_after"], e["created_at"]), ("-3", "13", "2026-11-16T12:00:00Z"))
        self.assertIn("Promotional credit", e["description"])
        d.stop()
        at(t0 + 3 * DAY)  # the paid lot lapses while walletd is stopped
        d.start()
        d.ctl_json("wallet", "create", "poke3", "USD")
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "10")
        d.restart()
        self.assertEqual(len(d.ctl_json("history", "acme", "--type", "expiry")["transactions"]), 2)  # once each
        self.assertEqual(self.lots(), [])
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))

    def test_a_refund_returns_to_the_lot_the_charge_took_it_from(self):
        d = self.d
        t0 = utc("2026-11-15T12:00:00Z")
        clock = d.restart_with_clock(t0)
        self.seed("1")
        d.ctl_json("credit", "acme", "0.01", "promo", "--promo", "--expires-in", "1")
        d.ctl_json("credit", "acme", "0.05", "paid", "--expires-in", "30")
        d.ctl_json("charge", "acme", "sms", UG, "a")  # 0.0094 of the promo lot
        d.ctl_json("charge", "acme", "sms", UG, "b")  # its last 0.0006, then 0.0088 of the paid one
        self.assertEqual(self.lots(), [("paid", "0.05", "0.0412")])
        d.ctl_json("refund", "acme", "--ref", "b", "--amount", "0.005", "--refund-ref", "r1")
        self.assertEqual(self.lots(), [("paid", "0.05", "0.0462")])  # the last lot it took from, first
        d.ctl_json("refund", "acme", "--ref", "b", "--amount", "0.0044", "--refund-ref", "r2")
        self.assertEqual(self.lots(), [("promo", "0.01", "0.0006"), ("paid", "0.05", "0.05")])
        set_clock(clock, t0 + 2 * DAY)  # the promo lot has lapsed (its 0.0006 went with it)
        d.ctl_json("wallet", "create", "poke", "USD")
        d.ctl_json("refund", "acme", "--ref", "a")  # back to the lapsed lot: it comes back and lapses at once
        d.ctl_json("wallet", "create", "poke2", "USD")
        self.assertEqual(self.lots(), [("paid", "0.05", "0.05")])
        expired = d.ctl_json("history", "acme", "--type", "expiry")["transactions"]
        self.assertEqual(sorted(x["amount"] for x in expired), ["-0.0006", "-0.0094"])
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "1.05")
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))

    def test_a_lot_partly_spent_keeps_what_is_left_as_lots_come_refunds_return_and_walletd_restarts(self):
        """A charge draws on the wallet's first lot as the wallet's record keeps it (README: Credit that
        expires): what is left of it shows, survives a restart, and stays right when a lot that comes
        before it arrives, a refund returns to a lot behind it, or it runs out."""
        d = self.d
        self.seed("0")
        d.ctl_json("credit", "acme", "2", "paid, 30 days", "--expires-in", "30")
        self.charge_sms(10)  # 0.094 of it
        self.assertEqual(self.lots(), [("paid", "2", "1.906")])
        d.restart()
        self.assertEqual(self.lots(), [("paid", "2", "1.906")])
        d.ctl_json("credit", "acme", "1", "paid, 7 days", "--expires-in", "7")  # drawn before it
        self.assertEqual(self.lots(), [("paid", "1", "1"), ("paid", "2", "1.906")])
        d.ctl_json("debit", "acme", "1.5", "x")  # the 7-day lot, then 0.5 of the other
        self.assertEqual(self.lots(), [("paid", "2", "1.406")])
        d.ctl_json("credit", "acme", "0.5", "welcome", "--promo")
        d.ctl_json("charge", "acme", "sms", UG, "c1")  # 0.0094 of the promo lot
        self.assertEqual(self.lots(), [("promo", "0.5", "0.4906"), ("paid", "2", "1.406")])
        d.ctl_json("refund", "acme", "--ref", "m3", "--refund-ref", "r1")  # taken from the 30-day lot
        self.assertEqual(self.lots(), [("promo", "0.5", "0.4906"), ("paid", "2", "1.4154")])
        d.ctl_json("charge", "acme", "sms", UG, "c2")
        self.assertEqual(self.lots(), [("promo", "0.5", "0.4812"), ("paid", "2", "1.4154")])
        d.restart()
        d.ctl_json("debit", "acme", "1.8966", "x")  # both, to the last unit
        self.assertEqual(self.lots(), [])
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "0")
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))

    def test_a_topup_takes_the_wallets_credit_validity_and_bad_input_is_refused(self):
        d = self.d
        self.seed("0")
        self.assertIsNone(d.ctl_json("wallet", "get", "acme")["credit_validity"])
        self.assertEqual(d.ctl_json("wallet", "update", "acme", "--credit-validity", "90")["credit_validity"], 90)
        t = d.ctl_json("topup", "create", "acme", "50")
        d.ctl_json("topup", "confirm", t["ref"], "50", "paystack", "PS-1")
        [lot] = d.ctl_json("balance", "acme")["lots"]
        self.assertEqual((lot["kind"], lot["amount"]), ("paid", "50"))
        d.ctl_json("wallet", "update", "acme", "--credit-validity", "none")
        self.assertIsNone(d.ctl_json("wallet", "get", "acme")["credit_validity"])
        with d.client() as c:
            for params, field in (({"expires_in": 0}, "expires_in"), ({"expires_in": 3651}, "expires_in"),
                                  ({"expires_in": "30"}, "expires_in"), ({"kind": "gift"}, "kind")):
                with self.assertRaises(walletd.InvalidArgument) as e:
                    c.credit(wallet="acme", amount="1", reason="x", **params)
                self.assertEqual(e.exception.field, field)
            with self.assertRaises(walletd.InvalidArgument):
                c.debit(wallet="acme", amount="1", reason="x", expires_in=3)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "50")
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))


class Reminders(DaemonTest):
    def test_seven_days_and_one_day_before_once_each_by_email(self):
        from test_alerts import SmtpSink
        from test_topups import free_port
        d = self.d
        port = free_port()
        sink = SmtpSink(port, os.path.join(d.dir, "mail"))
        sink.start()
        self.addCleanup(sink.stop)
        t0 = utc("2026-11-15T12:00:00Z")
        d.config.update({"smtp_url": "smtp://127.0.0.1:%d" % port, "alert_interval": "1"})
        clock = d.restart_with_clock(t0)

        def at(t):
            set_clock(clock, t)
            d.ctl_json("wallet", "list")  # a read: the writer is woken below
        d.ctl_json("wallet", "create", "acme", "USD", "--alert-email", "owner@acme.example")
        d.ctl_json("credit", "acme", "4", "promo", "--promo", "--expires-in", "8")
        d.ctl_json("credit", "acme", "2", "spent before", "--expires-in", "9")
        d.ctl_json("debit", "acme", "5", "x")  # 4 from the promo lot, 1 from the other: 1 of it is left
        for day in (1, 2, 7, 8):  # 7 days before the first lapses, then 1 day before it and 7 before the other, ...
            at(t0 + day * DAY)
            d.ctl_json("wallet", "create", "poke%d" % day, "USD")
        notes = [n for n in d.ctl_json("notifications", "acme")["notifications"] if n["type"] == "credit_expiring"]
        self.assertEqual(sorted((n["amount"], n["kind"], n["expires_at"]) for n in notes),
                         [("1", "paid", "2026-11-24T12:00:00Z")] * 2)  # the promo lot was spent: none for it
        start = time.time()
        while len(sink.messages()) < 2 and time.time() - start < 30:  # the clock runs on: a retry comes due
            set_clock(clock, t0 + 8 * DAY + int(time.time() - start))
            time.sleep(0.2)
        mail = sink.wait_for(2)
        self.assertEqual(len(mail), 2, d.ctl_json("notifications", "acme"))
        self.assertIn("1.00 USD of paid credit in wallet acme expire at 2026-11-24T12:00:00Z", mail[0]["data"])
