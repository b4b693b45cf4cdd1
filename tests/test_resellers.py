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
