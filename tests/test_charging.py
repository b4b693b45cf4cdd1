"""Charging: the seed example, rates, FX, precheck, quote, refund, concurrency."""
import concurrent.futures
import decimal
import os
import subprocess
import tempfile

from harness import DaemonTest, WALLETCTL, read_frames, request
import walletd  # noqa: E402 (harness puts contrib/python on the path)

D = decimal.Decimal
UG = "+256712345678"


class SeedExample(DaemonTest):
    def test_100_sms_to_uganda_cost_0_94(self):
        d = self.d
        self.seed("1500")
        for i in range(100):
            t = d.ctl_json("charge", "acme", "--channel", "sms", "--to", "+256712345678", "--text", "hi", "--ref", "m-%d" % i)
            self.assertEqual(t["type"], "sms_charge")
            self.assertEqual(t["description"], "SMS to +256712345678 via ESMS_UG (1 seg)")
            self.assertFalse(t["replayed"])
        bal = D(d.ctl_json("balance", "acme")["balance"])
        # Rounding is once per message (README: Money): 100 x 0.0094, which is the billing page's own
        # 1,499.06, within 100 half-micro-units of the unrounded 1500 - 3500/3723.40.
        self.assertEqual(bal, D("1499.06"))
        self.assertLessEqual(abs(bal - (D(1500) - D(3500) / D("3723.40"))), D("0.00005"))
        h = d.ctl_json("history", "acme", "--limit", "200")
        running = D(0)
        for t in reversed(h["transactions"]):
            running += D(t["amount"])
            self.assertEqual(D(t["balance_after"]), running)
        self.assertEqual(h["total"], 101)
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_insufficient_balance_is_exactly_the_spec(self):
        d = self.d
        d.ctl_json("wallet", "create", "ug", "UGX")
        d.ctl_json("credit", "ug", "10", "seed")
        d.ctl_json("rate", "set", "default", "sms", "256", "35", "UGX")
        err = d.ctl_json("charge", "ug", "sms", "+256712345678", "x1", expect=4)
        self.assertEqual(err, {"code": "insufficient_balance",
                               "message": "Insufficient balance. Required: 35 UGX, available: 10 UGX",
                               "required": "35", "available": "10", "currency": "UGX"})
        self.seed("0.002686")
        err = d.ctl_json("charge", "acme", "sms", "+256712345678", "x2", expect=4)
        self.assertEqual(err["available"], "10.001052")
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "0.002686")


class Charging(DaemonTest):
    def test_errors_of_charge(self):
        d = self.d
        self.seed("1")
        e = lambda *a: d.ctl_json("charge", *a, expect=1)  # noqa: E731
        self.assertEqual(e("nobody", "sms", "+256712345678", "r")["code"], "unknown_wallet")
        self.assertEqual(e("acme", "sms", "+254712345678", "r")["code"], "no_rate")
        self.assertEqual(e("acme", "sms", "256-712", "r")["field"], "to")
        self.assertEqual(e("acme", "sms", "+256712345678", "r", "--text", "a", "--segments", "2")["field"], "text")
        d.ctl_json("rate", "set", "default", "sms", "44", "0.03", "GBP")
        self.assertEqual(e("acme", "sms", "+447700900000", "r")["code"], "no_fx_rate")
        d.ctl_json("wallet", "update", "acme", "--status", "frozen")
        self.assertEqual(e("acme", "sms", "+256712345678", "r")["code"], "wallet_frozen")
        self.assertEqual(d.ctl_json("history", "acme")["total"], 1)

    def test_idempotent_ref_and_conflict(self):
        d = self.d
        self.seed("1")
        a = d.ctl_json("charge", "acme", "sms", "+256712345678", "m-1", "--segments", "2")
        b = d.ctl_json("charge", "acme", "sms", "+256712345678", "m-1", "--segments", "2")
        self.assertTrue(b["replayed"])
        self.assertEqual(a["id"], b["id"])
        self.assertEqual(d.ctl_json("charge", "acme", "sms", "+256712345678", "m-1", expect=1)["code"],
                         "idempotency_conflict")
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "0.9812")

    def test_segments_and_routes(self):
        d = self.d
        self.seed("10")
        d.ctl_json("rate", "set", "default", "sms", "2567", "0.001", "USD", "--route", "B")
        d.ctl_json("rate", "set", "default", "sms", "2567", "0.001", "USD", "--route", "A")
        d.ctl_json("rate", "set", "default", "whatsapp", "256", "0.02", "USD")
        t = d.ctl_json("charge", "acme", "sms", "+256712345678", "s1", "--text", "€" + "a" * 159)
        self.assertEqual((t["segments"], t["route"], t["amount"], t["price"]), (2, "A", "-0.002", "0.001"))
        t = d.ctl_json("charge", "acme", "sms", "+256712345678", "s2", "--text", "Привет" * 12)
        self.assertEqual(t["segments"], 2)
        t = d.ctl_json("charge", "acme", "sms", "+256812345678", "s3", "--route", "ESMS_UG")
        self.assertEqual((t["route"], t["amount"]), ("ESMS_UG", "-0.0094"))
        t = d.ctl_json("charge", "acme", "whatsapp", "+256712345678", "w1", "--text", "x" * 500)
        self.assertEqual((t["type"], t["segments"], t["amount"]), ("whatsapp_charge", 1, "-0.02"))
        frame = request(9, "charge", {"wallet": "acme", "channel": "sms", "to": "+256712345678",
                                      "ref": "s4", "text": "XY"}).replace(b"\xa2XY", b"\xa2\xff\xfe")
        s = d.raw()
        s.sendall(frame)
        err = read_frames(s, 1)[0][2]
        self.assertEqual((err["code"], err["field"]), ("invalid_argument", "text"))

    def test_precheck_prices_a_campaign_without_charging(self):
        d = self.d
        self.seed("1")
        d.ctl_json("rate", "set", "default", "sms", "2567", "0.01", "USD")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("+256712345678\n+256812345678\n256712000000\nbogus\n+15551234567\n+256800000000,3\n")
        p = d.ctl_json("precheck", "acme", "sms", f.name)
        os.unlink(f.name)
        self.assertEqual(p["invalid"], ["bogus"])
        self.assertEqual(p["unpriced"], ["+15551234567"])
        by = {b["prefix"]: b for b in p["breakdown"]}
        self.assertEqual((by["2567"]["count"], by["2567"]["subtotal"]), (2, "0.02"))
        self.assertEqual((by["256"]["count"], by["256"]["unit_cost"], by["256"]["subtotal"]), (4, "0.0094", "0.0376"))
        self.assertEqual((p["required"], p["missing"]), ("0.0576", "0"))
        self.assertFalse(p["sufficient"])  # the money is there, but not every recipient can go
        with d.client() as c:
            p = c.precheck(wallet="acme", channel="sms", recipients=["+256712345678", "+256800000000"])
            self.assertEqual((p["sufficient"], p["missing"]), (True, D(0)))
            c.wallet_update(wallet="acme", blocked_prefixes=["2568"])
            p = c.precheck(wallet="acme", channel="sms", recipients=["+256712345678", "+256800000000"])
            self.assertEqual((p["sufficient"], p["blocked"]), (False, ["+256800000000"]))
            c.wallet_update(wallet="acme", blocked_prefixes=None, hourly_messages=1)
            p = c.precheck(wallet="acme", channel="sms", recipients=["+256712345678", "+256800000000"])
            self.assertEqual((p["sufficient"], p["limit_exceeded"]["limit"]), (False, "hourly_messages"))
            c.wallet_update(wallet="acme", hourly_messages=None)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "1")
        big = [{"to": "+2567%08d" % i, "count": 1} for i in range(100000)]
        with d.client() as c:
            p = c.precheck(wallet="acme", channel="sms", recipients=big, text="hello")
        self.assertEqual(p["breakdown"][0]["count"], 100000)
        self.assertEqual((p["required"], p["missing"]), (D("1000"), D("999")))
        self.assertFalse(p["sufficient"])

    def test_quote(self):
        d = self.d
        self.seed("1")
        q = d.ctl_json("quote", "sms", "+256712345678", "10", "--wallet", "acme")
        self.assertEqual((q["messages"], q["unit_cost"], q["currency"]), (1063, "0.0094", "USD"))
        q = d.ctl_json("quote", "sms", "+256712345678", "3500", "--plan", "default", "--currency", "UGX")
        self.assertEqual(q["messages"], 100)

    def test_refund_once_by_txn_or_ref(self):
        d = self.d
        self.seed("1")
        t = d.ctl_json("charge", "acme", "sms", "+256712345678", "m-1")
        r = d.ctl_json("refund", "acme", "--txn", t["id"], "--reason", "DLR failed", "--actor", "bob")
        self.assertEqual((r["type"], r["amount"], r["refund_of"], r["balance_after"]), ("refund", "0.0094", t["id"], "1"))
        e = d.ctl_json("refund", "acme", "--ref", "m-1", expect=1)
        self.assertEqual(e["code"], "already_refunded")
        self.assertEqual(e["refund"]["id"], r["id"])
        self.assertEqual(d.ctl_json("refund", "acme", "--txn", 1, expect=1)["code"], "not_refundable")
        self.assertEqual(d.ctl_json("refund", "acme", "--txn", 999, expect=1)["code"], "unknown_txn")
        t2 = d.ctl_json("charge", "acme", "sms", "+256712345678", "m-2")
        d.ctl_json("wallet", "update", "acme", "--status", "frozen")
        self.assertEqual(d.ctl_json("refund", "acme", "--ref", "m-2")["refund_of"], t2["id"])

    def test_an_operators_deck_prices_by_network_first_then_by_prefix(self):
        d = self.d
        self.seed("10")  # USD; the default plan's SMS to +256 costs 35 UGX (0.0094 USD)
        deck = os.path.join(d.dir, "deck.csv")
        with open(deck, "w") as f:
            f.write("Country,Network,MCCMNC,PriceSubmit,PriceDelivered,Currency,Effective\n"
                    "Uganda,MTN,64110,0.0050,,USD,2026-01-01\n"
                    "Uganda,Airtel,64101,0,0.0040,USD,\n"
                    "Uganda,Lyca,64133,0.0090,,USD,2099-01-01\n"
                    "Kenya,Safaricom,63902,0.0060,0.0010,USD,\n"
                    "Nowhere,,12,0.01,,USD,\n"
                    "Uganda,Africell,64114,0.002,,,\n")
        res = d.ctl_json("rate", "import", deck, "--format", "mccmnc")
        self.assertEqual(res["loaded"], 3)
        self.assertEqual([(r["row"], r["error"]["field"]) for r in res["rejected"]],
                         [(4, "PriceSubmit"), (5, "mccmnc"), (6, "Currency")])
        row = d.ctl_json("rate", "lookup", "sms", UG, "--mccmnc", "64110")
        self.assertEqual((row["mccmnc"], row["prefix"], row["price"], row["settle"]), ("64110", None, "0.005", "send"))
        self.assertEqual(d.ctl_json("rate", "lookup", "sms", UG)["prefix"], "256")
        with d.client() as c:
            def charge(ref, mccmnc=None):
                return c.charge(wallet="acme", channel="sms", to=UG, ref=ref, mccmnc=mccmnc)["amount"]
            self.assertEqual([charge("n1", "64110"), charge("n2"), charge("n3", "64133"), charge("n4", "64199")],
                             [D("-0.005"), D("-0.0094"), D("-0.0094"), D("-0.0094")])  # 64133: from 2099 only
            t = c.charge(wallet="acme", channel="sms", to=UG, ref="n5", mccmnc="64101")  # priced on delivery
            self.assertEqual((t["id"], t["pending"], t["amount"]), (None, True, D("-0.004")))
            self.assertIsNotNone(c.call("delivery", wallet="acme", ref="n5", status="delivered")["txn"])
            items = [{"wallet": "acme", "channel": "sms", "to": UG, "ref": "b%d" % i, "mccmnc": "64110"} for i in range(3)]
            self.assertEqual([r["amount"] for r in c.call("charge.batch", items=items)["results"]], [D("-0.005")] * 3)
            with self.assertRaises(walletd.WalletdError) as e:
                c.charge(wallet="acme", channel="sms", to=UG, ref="bad", mccmnc="6411")
            self.assertEqual((e.exception.code, e.exception.field), ("invalid_argument", "mccmnc"))
            p = c.precheck(wallet="acme", channel="sms", recipients=[{"to": UG, "mccmnc": "64110", "count": 2}, UG])
            self.assertEqual((p["required"], sorted((g["mccmnc"] or "", g["prefix"] or "", g["count"])
                                                    for g in p["breakdown"])), (D("0.0194"), [("", "256", 1), ("64110", "", 2)]))
            q = c.quote(channel="sms", to=UG, amount="1", wallet="acme", mccmnc="64110")
            self.assertEqual((q["messages"], q["mccmnc"], q["prefix"]), (200, "64110", None))
            with self.assertRaises(walletd.WalletdError) as e:
                c.call("rate.set", plan="default", channel="sms", prefix="256", mccmnc="64110", price="1", currency="USD")
            self.assertEqual((e.exception.code, e.exception.field), ("invalid_argument", "prefix"))
            self.assertEqual(c.balance(wallet="acme")["balance"], D("10") - D("0.005") * 4 - D("0.0094") * 3 - D("0.004"))
        listed = d.ctl_json("rate", "list", "--plan", "default")["rates"]
        self.assertEqual([(r["prefix"], r["mccmnc"]) for r in listed],
                         [("256", None), (None, "64101"), (None, "64110"), (None, "64133")])
        with open(deck, "w") as f:  # replace: the deck's networks are now these; the prefix rates stay
            f.write("MCCMNC,PriceSubmit,PriceDelivered,Currency,Effective\n64110,0.0045,,USD,\n")
        self.assertEqual(d.ctl_json("rate", "import", deck, "--format", "mccmnc")["loaded"], 1)
        listed = d.ctl_json("rate", "list", "--plan", "default")["rates"]
        self.assertEqual([(r["prefix"], r["mccmnc"], r["price"]) for r in listed],
                         [("256", None, "35"), (None, "64110", "0.0045")])
        d.ctl_json("rate", "set", "default", "sms", "--mccmnc", "64120", "0.003", "USD")  # one network, by hand
        self.assertEqual(d.ctl_json("rate", "lookup", "sms", UG, "--mccmnc", "64120")["price"], "0.003")
        self.assertEqual(d.ctl_json("rate", "delete", "default", "sms", "--mccmnc", "64120"), {"deleted": True})
        self.assertEqual(d.ctl_json("rate", "lookup", "sms", UG, "--mccmnc", "64120")["prefix"], "256")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_rate_import_export_round_trip(self):
        d = self.d
        self.seed("1")
        rows = ["plan,channel,prefix,route,price,currency,on_failure,failure_fee,mccmnc"]
        policies = ["keep,", "refund,", "fee,0.001"]  # the refund policy goes round the trip too
        rows += ["bulk,sms,%d,R1,0.0%d1,USD,%s," % (2540 + i, i + 1, policies[i % 3]) for i in range(49)]
        rows += ["bulk,sms,,R1,0.05,USD,keep,,64101"]  # a mobile network's rate
        rows += ["bulk,sms,abc,R1,0.01,USD", "bulk,fax,254,R1,0.01,USD", "bulk,sms,254,R1,-1,USD"]
        with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
            f.write("\n".join(rows) + "\n")
        res = d.ctl_json("rate", "import", f.name)
        self.assertEqual(res["loaded"], 50)
        self.assertEqual([(r["row"], r["error"]["field"]) for r in res["rejected"]],
                         [(51, "prefix"), (52, "channel"), (53, "price")])
        out = d.ctl("rate", "export", "--plan", "bulk")
        self.assertEqual(out.returncode, 0)
        self.assertEqual(out.stdout.strip().splitlines(), rows[:51])
        # replace: the plan ends up holding exactly the new rows
        with open(f.name, "w") as g:
            g.write("plan,channel,prefix,route,price,currency\nbulk,sms,255,R2,0.02,USD\n")
        self.assertEqual(d.ctl_json("rate", "import", f.name)["loaded"], 1)
        self.assertEqual(d.ctl_json("rate", "list", "--plan", "bulk")["total"], 1)
        self.assertEqual(d.ctl_json("rate", "list", "--plan", "default")["total"], 1)
        os.unlink(f.name)


def charge_proc(sock, wallet, start, count, ref_prefix="p"):
    """One client process's loop: walletctl charges; returns exit codes."""
    codes = []
    for i in range(start, start + count):
        r = subprocess.run([WALLETCTL, "-s", sock, "charge", wallet, "sms", "+256712345678",
                            "%s-%d" % (ref_prefix, i)], capture_output=True)
        codes.append(r.returncode)
    return codes


class Concurrency(DaemonTest):
    def test_parallel_clients_charge_exactly_n(self):
        d = self.d
        self.seed("0")
        d.ctl_json("credit", "acme", "0.094", "exactly ten charges")
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(charge_proc, d.sock, "acme", k * 5, 5) for k in range(6)]
            codes = sum((f.result() for f in futures), [])
        self.assertEqual(codes.count(0), 10)
        self.assertEqual(codes.count(4), 20)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "0")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_same_ref_from_many_clients_charges_once(self):
        d = self.d
        self.seed("1")

        def one(_):
            with d.client() as c:
                return c.charge(wallet="acme", channel="sms", to="+256712345678", ref="dup")
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(16)))
        self.assertEqual(len({r["id"] for r in results}), 1)
        self.assertEqual(sum(1 for r in results if not r["replayed"]), 1)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "0.9906")


class Currencies(DaemonTest):
    config = {"currencies": "CRD"}

    def test_iso_4217_codes_and_configured_units_only(self):
        d = self.d
        e = d.ctl_json("wallet", "create", "acme", "KSH", expect=1)
        self.assertEqual((e["code"], e["field"]), ("invalid_argument", "currency"))
        self.assertIn("nearest: KES", e["message"])
        self.assertEqual(d.ctl_json("rate", "set", "default", "sms", "254", "1", "XYZ", expect=1)["field"], "currency")
        self.assertEqual(d.ctl_json("wallet", "create", "credits", "CRD")["currency"], "CRD")  # a platform's unit
        d.ctl_json("wallet", "create", "acme", "KES")
        self.assertEqual(d.ctl_json("wallet", "list")["total"], 2)
        self.d.config["currencies"] = "CR1"
        self.d.write_config()
        self.d.stop()
        with self.assertRaises(RuntimeError):
            self.d.start()
        self.assertIn("'currencies' takes 3-letter upper-case codes", self.d.read_log())
        self.d.config["currencies"] = "CRD"
        self.d.start()

    def test_fx_set_says_both_directions_and_refuses_a_reversed_pair(self):
        d = self.d
        r = d.ctl("fx", "set", "USD", "UGX", "3723.40")
        self.assertIn("1 USD = 3,723.40 UGX; 1 UGX = 0.000268572 USD", r.stdout)
        for base, quote, rate in (("UGX", "USD", "3723.40"), ("USD", "UGX", "40000"), ("USD", "UGX", "372"),
                                  ("UGX", "USD", "0.0000268")):
            e = d.ctl_json("fx", "set", base, quote, rate, expect=1)
            self.assertEqual((e["code"], e["field"]), ("invalid_argument", "rate"), (base, quote, rate))
            self.assertIn("reversed", e["message"])
        self.assertEqual(d.ctl_json("fx", "list")["rates"][0]["rate"], "3723.4")  # nothing changed
        self.assertEqual(d.ctl_json("fx", "set", "USD", "UGX", "3800")["rate"], "3800")  # a real move
        self.assertEqual(d.ctl_json("fx", "set", "UGX", "USD", "0.0003")["meaning"],
                         "1 UGX = 0.0003 USD; 1 USD = 3,333.33 UGX")  # the reverse pair, near its inverse
        f = d.ctl_json("fx", "set", "USD", "UGX", "3723.40", "--force")
        self.assertEqual(f["rate"], "3723.4")
        with d.client() as c:
            self.assertEqual(c.fx_set(base="USD", quote="UGX", rate="37234", force=False)["rate"], "37234")  # 10x: not more

