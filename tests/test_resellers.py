"""Resellers (README: Resellers): a reseller's children, transfers both ways in
one commit, never overselling, racing charges."""
import decimal
import random
import threading

from harness import DaemonTest
import walletd  # noqa: E402 (harness puts contrib/python on the path)

D = decimal.Decimal
UG = "+256712345678"


class Resellers(DaemonTest):
    def test_a_reseller_moves_money_to_a_child_and_back_and_never_oversells(self):
        d = self.d
        self.seed("100", wallet="agency")
        self.assertEqual(d.ctl_json("wallet", "create", "shop", "USD", "--parent", "agency")["parent"], "agency")
        d.ctl_json("wallet", "create", "other", "USD")
        refused = [d.ctl_json("wallet", "create", "shop-eur", "EUR", "--parent", "agency", expect=1),
                   d.ctl_json("wallet", "create", "grandchild", "USD", "--parent", "shop", expect=1),
                   d.ctl_json("wallet", "create", "orphan", "USD", "--parent", "nobody", expect=1)]
        self.assertEqual([(r["code"], r["field"]) for r in refused],
                         [("invalid_argument", "currency"), ("invalid_argument", "parent"),
                          ("unknown_wallet", "parent")])
        self.assertIsNone(d.ctl_json("wallet", "get", "agency")["parent"])

        t = d.ctl_json("transfer", "agency", "shop", "30", "--ref", "t1", "--reason", "May bundle")
        out, into = t["transfer_out"], t["transfer_in"]
        self.assertEqual((out["type"], out["wallet"], out["amount"], out["balance_after"], out["counterpart"]),
                         ("transfer_out", "agency", "-30", "70", into["id"]))
        self.assertEqual((into["type"], into["wallet"], into["amount"], into["balance_after"], into["counterpart"]),
                         ("transfer_in", "shop", "30", "30", out["id"]))
        self.assertEqual((out["description"], into["description"], t["replayed"]),
                         ("Transfer to shop: May bundle", "Transfer from agency: May bundle", False))
        again = d.ctl_json("transfer", "agency", "shop", "30", "--ref", "t1")
        self.assertEqual((again["transfer_out"]["id"], again["transfer_in"]["id"], again["replayed"]),
                         (out["id"], into["id"], True))
        self.assertEqual(d.ctl_json("transfer", "agency", "shop", "31", "--ref", "t1", expect=1)["code"],
                         "idempotency_conflict")
        back = d.ctl_json("transfer", "shop", "agency", "10", "--ref", "back-1")  # a child gives back
        self.assertEqual((back["transfer_out"]["wallet"], back["transfer_in"]["balance_after"]), ("shop", "80"))

        with d.client() as c:  # nobody sends more than it may spend, held money included
            c.call("hold.create", wallet="agency", ref="cmp", amount="60")
            with self.assertRaises(walletd.InsufficientBalance) as e:
                c.transfer(from_="agency", to="shop", amount="20.01", ref="t2")
            self.assertEqual(e.exception.available, D("20"))
            with self.assertRaises(walletd.InsufficientBalance):
                c.transfer(from_="shop", to="agency", amount="20.01", ref="t3")
            c.transfer(from_="agency", to="shop", amount="20", ref="t4")
            with self.assertRaises(walletd.InvalidArgument) as e:  # neither parent nor child
                c.transfer(from_="agency", to="other", amount="1", ref="t5")
            self.assertEqual(e.exception.field, "to")
            c.wallet_update(wallet="shop", status="frozen")
            with self.assertRaises(walletd.WalletFrozen):
                c.transfer(from_="shop", to="agency", amount="1", ref="t6")
            c.wallet_update(wallet="shop", status="active")
            # a transfer's ref is no charge's: no report, refund or charge takes it
            with self.assertRaises(walletd.UnknownTxn):
                c.delivery(wallet="agency", ref="t1", status="failed")
            with self.assertRaises(walletd.NotRefundable):
                c.refund(wallet="agency", ref="t1")
            with self.assertRaises(walletd.IdempotencyConflict):
                c.charge(wallet="agency", channel="sms", to=UG, ref="t1")
        children = d.ctl_json("wallet", "list", "--parent", "agency")
        self.assertEqual(([(w["wallet"], w["balance"]) for w in children["wallets"]], children["total"]),
                         ([("shop", "40")], 1))
        self.assertEqual(d.ctl_json("wallet", "list", "--parent", "nobody", expect=1)["code"], "unknown_wallet")
        self.assertEqual([x["type"] for x in d.ctl_json("history", "shop", "--type", "transfer_in")["transactions"]],
                         ["transfer_in", "transfer_in"])
        with d.client() as c:  # report.usage of a reseller's children only
            c.call("hold.release", wallet="agency", hold="cmp")
            for i, w in enumerate(("shop", "shop", "agency", "other")):
                if w == "other":
                    d.ctl_json("credit", "other", "1", "to charge")
                c.charge(wallet=w, channel="sms", to=UG, ref="u%d" % i)
        rows = d.ctl_json("report", "usage", "2000-01-01", "2100-01-01", "wallet", "--parent", "agency")["rows"]
        self.assertEqual([(r["key"], r["messages"]) for r in rows], [("shop", 2)])
        self.assertEqual(len(d.ctl_json("report", "usage", "2000-01-01", "2100-01-01", "wallet")["rows"]), 3)
        totals = d.ctl_json("statement", "agency")["totals"]
        self.assertEqual((totals["transfer_out"], totals["transfer_in"]), ("-50", "10"))
        self.assertEqual([d.ctl_json("balance", w)["balance"] for w in ("agency", "shop")], ["59.9906", "39.9812"])
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_transfers_racing_charges_on_six_connections_never_oversell(self):
        d = self.d
        self.seed("20", wallet="agency")  # an SMS to +256 costs 0.0094 USD: together they ask for about 27
        children = ["c0", "c1", "c2"]
        for child in children:
            d.ctl_json("wallet", "create", child, "USD", "--parent", "agency")
        moved, charged, errors = [], [], []

        def transfers(k):
            rnd = random.Random(k)
            with d.client() as c:
                for i in range(60):
                    amount = D(rnd.randint(1, 20)) / 100
                    try:
                        c.transfer(from_="agency", to=children[k], amount=str(amount), ref="t%d-%d" % (k, i))
                        moved.append((children[k], amount))
                    except walletd.InsufficientBalance:
                        pass
                    except Exception as e:  # noqa: BLE001 (the test reports it)
                        errors.append(e)

        def charges(k):
            with d.client() as c:
                for i in range(300):
                    try:
                        t = c.charge(wallet="agency", channel="sms", to=UG, ref="m%d-%d" % (k, i))
                        charged.append(D(t["amount"]))
                    except walletd.InsufficientBalance:
                        pass
                    except Exception as e:  # noqa: BLE001
                        errors.append(e)
        threads = [threading.Thread(target=transfers, args=(k,)) for k in range(3)]
        threads += [threading.Thread(target=charges, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        agency = D(d.ctl_json("balance", "agency")["balance"])
        self.assertGreaterEqual(agency, 0)
        self.assertEqual(agency, D(20) - sum(a for _, a in moved) + sum(charged))  # charged amounts are negative
        for child in children:
            self.assertEqual(D(d.ctl_json("balance", child)["balance"]), sum(a for w, a in moved if w == child))
        self.assertTrue(moved and charged)
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))


class SharedChildren(DaemonTest):
    """A child created shared holds no money of its own: each charge draws what it lacks from the parent."""

    def test_charges_draw_on_the_parent_within_the_childs_controls_and_monthly_cap(self):
        d = self.d
        self.seed("1", wallet="agency")
        shop = d.ctl_json("wallet", "create", "shop", "USD", "--parent", "agency", "--shared")
        self.assertEqual((shop["shared"], shop["balance"], shop["available"]), (True, "0", "1"))
        self.assertFalse(d.ctl_json("wallet", "get", "agency")["shared"])
        self.assertEqual(d.ctl_json("wallet", "create", "lone", "USD", "--shared", expect=1)["field"], "shared")
        with d.client() as c:
            t = c.charge(wallet="shop", channel="sms", to=UG, ref="m1")
            self.assertEqual((t["wallet"], t["amount"], t["balance_after"]), ("shop", D("-0.0094"), D("0")))
            self.assertEqual(c.balance(wallet="agency")["balance"], D("0.9906"))
            self.assertEqual(c.charge(wallet="shop", channel="sms", to=UG, ref="m1")["replayed"], True)
            # its own controls: a blocked prefix, a daily limit, its month's cap on what it draws
            c.wallet_update(wallet="shop", blocked_prefixes=["2567"])
            with self.assertRaises(walletd.DestinationBlocked):
                c.charge(wallet="shop", channel="sms", to=UG, ref="m2")
            c.wallet_update(wallet="shop", blocked_prefixes=[], credit_limit="0.02")
            c.charge(wallet="shop", channel="sms", to=UG, ref="m3")  # 0.0188 drawn this month
            with self.assertRaises(walletd.LimitExceeded) as e:
                c.charge(wallet="shop", channel="sms", to=UG, ref="m4")
            self.assertEqual((e.exception.limit, e.exception.used, e.exception.max), ("credit_limit", "0.0188", "0.02"))
            self.assertEqual(c.balance(wallet="shop")["available"], D("0.0012"))
            # money moves out of it only by charges; a transfer into it is its own, drawn first
            for call, params in (("hold.create", {"wallet": "shop", "ref": "h", "amount": "0.01"}),
                                 ("debit", {"wallet": "shop", "amount": "0.01", "reason": "x"}),
                                 ("transfer", {"from": "shop", "to": "agency", "amount": "0.01", "ref": "t0"})):
                with self.assertRaises(walletd.InvalidArgument) as e:
                    c.call(call, **params)
                self.assertIn("is shared", e.exception.message)
            c.transfer(from_="agency", to="shop", amount="0.01", ref="t1")
            c.charge(wallet="shop", channel="sms", to=UG, ref="m4")  # from its own 0.01: no draw
            self.assertEqual((c.balance(wallet="shop")["balance"], c.balance(wallet="agency")["balance"]),
                             (D("0.0006"), D("0.9712")))
            c.refund(wallet="shop", ref="m3")  # back to the child's own money, drawn first next time
            self.assertEqual(c.balance(wallet="shop")["balance"], D("0.01"))
            c.wallet_update(wallet="agency", status="frozen")
            with self.assertRaises(walletd.WalletFrozen):
                c.charge(wallet="shop", channel="sms", to=UG, ref="m5", description="x" * 200)
            c.wallet_update(wallet="agency", status="active")
        out = [x for x in d.ctl_json("history", "agency")["transactions"] if x["type"] == "transfer_out"]
        self.assertEqual([x["description"] for x in out[-2:]],
                         ["Charge of shop: SMS to +256712345678 via ESMS_UG (1 seg)"] * 2)
        self.assertEqual([x["ref"] for x in out[-2:]], ["m3", "m1"])
        rows = d.ctl_json("statement", "agency")["transactions"]  # the parent's statement: each child's charges
        self.assertEqual(len([t for t in rows if t["description"].startswith("Charge of shop: SMS to")]), 2)
        ins = [x["description"] for x in d.ctl_json("history", "shop")["transactions"] if x["type"] == "transfer_in"]
        self.assertEqual(ins, ["Transfer from agency", "Drawn from agency", "Drawn from agency"])
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))

    def test_shared_children_racing_on_six_connections_never_take_the_parent_below_zero(self):
        d = self.d
        self.seed("2", wallet="agency")  # 212 SMS at 0.0094; six connections ask for 600
        for k in range(3):
            d.ctl_json("wallet", "create", "c%d" % k, "USD", "--parent", "agency", "--shared")
        charged, errors = [], []

        def charges(k):
            with d.client() as c:
                for i in range(100):
                    try:
                        charged.append(D(c.charge(wallet="c%d" % (k % 3), channel="sms", to=UG,
                                                  ref="m%d-%d" % (k, i))["amount"]))
                    except walletd.InsufficientBalance:
                        pass
                    except Exception as e:  # noqa: BLE001 (the test reports it)
                        errors.append(e)
        threads = [threading.Thread(target=charges, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(len(charged), 212)
        agency = D(d.ctl_json("balance", "agency")["balance"])
        self.assertEqual(agency, D(2) + sum(charged))
        self.assertEqual([d.ctl_json("balance", "c%d" % k)["balance"] for k in range(3)], ["0"] * 3)
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))
