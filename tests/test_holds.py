"""Holds, credit limits, spend controls and partial refunds (README: Holds), and the
store of the previous release upgraded in place."""
import decimal
import os
import shutil
import tempfile
import time

from harness import Daemon, DaemonTest, ROOT, build_release, chain_breaks, request, unhashed, set_clock, utc
import walletd  # noqa: E402 (harness puts contrib/python on the path)

D = decimal.Decimal
UG = "+256712345678"


class Holds(DaemonTest):
    def test_a_hold_protects_a_campaign_while_other_traffic_is_refused(self):
        d = self.d
        self.seed("1")  # 1 USD; an SMS to +256 costs 0.0094
        numbers = os.path.join(d.dir, "numbers.txt")
        with open(numbers, "w") as f:
            f.write("".join("+2567%08d\n" % i for i in range(100)))
        h = d.ctl_json("hold", "create", "acme", "--ref", "cmp-7", "--recipients", numbers, "--channel", "sms")
        self.assertEqual((h["amount"], h["remaining"], h["status"], h["replayed"]), ("0.94", "0.94", "active", False))
        self.assertEqual(d.ctl_json("balance", "acme"),
                         {"balance": "1", "held": "0.94", "available": "0.06", "currency": "USD"})
        spent = 0
        for i in range(10):  # other traffic: six charges fit in what is not held
            r = d.ctl("--json", "charge", "acme", "sms", UG, "other-%d" % i)
            spent += r.returncode == 0
        self.assertEqual(spent, 6)
        e = d.ctl_json("charge", "acme", "sms", UG, "other-x", expect=4)
        self.assertEqual((e["code"], e["currency"]), ("insufficient_balance", "UGX"))
        self.assertEqual(D(e["available"]), (D("0.0036") * D("3723.40")).quantize(D("0.000001")))
        with d.client() as c:  # the campaign is sent in full, from its hold
            for i in range(100):
                t = c.charge(wallet="acme", channel="sms", to="+2567%08d" % i, ref="cmp-%d" % i, hold="cmp-7")
                self.assertEqual(t["hold"], "cmp-7")
            h = c.call("hold.get", wallet="acme", hold="cmp-7")
            self.assertEqual((h["remaining"], h["status"]), (D(0), "active"))
            self.assertEqual(c.balance(wallet="acme")["available"], D("0.0036"))
            self.assertEqual(c.history(wallet="acme", type="sms_charge")["total"], 106)
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_hold_rules_replay_conflict_release_and_list(self):
        d = self.d
        self.seed("10")
        a = d.ctl_json("hold", "create", "acme", "--ref", "h1", "--amount", "4", "--description", "November promo")
        b = d.ctl_json("hold", "create", "acme", "--ref", "h1", "--amount", "4", "--description", "November promo")
        self.assertEqual((b["replayed"], b["expires_at"]), (True, a["expires_at"]))
        self.assertEqual(d.ctl_json("hold", "create", "acme", "--ref", "h1", "--amount", "5", expect=1)["code"],
                         "idempotency_conflict")
        e = d.ctl_json("hold", "create", "acme", "--ref", "h2", "--amount", "6.01", expect=4)
        self.assertEqual((e["required"], e["available"], e["currency"]), ("6.01", "6", "USD"))
        e = d.ctl_json("hold", "create", "acme", "--ref", "h2", "--amount", "1", "--expires-in", str(31 * 86400),
                       expect=1)
        self.assertEqual(e["field"], "expires_in")
        self.assertEqual(d.ctl_json("hold", "create", "acme", "--ref", "h3", expect=1)["field"], "amount")
        d.ctl_json("hold", "create", "acme", "--ref", "h2", "--amount", "1", "--expires-in", "60")
        r = d.ctl_json("hold", "release", "acme", "h1")
        self.assertEqual((r["status"], r["remaining"]), ("released", "4"))
        e = d.ctl_json("hold", "release", "acme", "h1", expect=1)
        self.assertEqual((e["code"], e["hold"], e["status"]), ("hold_closed", "h1", "released"))
        e = d.ctl_json("charge", "acme", "sms", UG, "m1", "--hold", "h1", expect=1)
        self.assertEqual(e["code"], "hold_closed")
        e = d.ctl_json("charge", "acme", "sms", UG, "m1", "--hold", "nope", expect=1)
        self.assertEqual((e["code"], e["hold"]), ("unknown_hold", "nope"))
        self.assertEqual(d.ctl_json("history", "acme")["total"], 1)  # the failures charged nothing
        self.assertEqual([h["hold"] for h in d.ctl_json("hold", "list", "acme")["holds"]], ["h1", "h2"])
        self.assertEqual([h["hold"] for h in d.ctl_json("hold", "list", "acme", "--status", "active")["holds"]], ["h2"])
        self.assertEqual(d.ctl_json("balance", "acme")["available"], "9")
        d.ctl_json("wallet", "update", "acme", "--status", "frozen")
        self.assertEqual(d.ctl_json("hold", "create", "acme", "--ref", "h4", "--amount", "1", expect=1)["code"],
                         "wallet_frozen")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_a_hold_expiring_while_walletd_is_stopped_is_expired_when_it_returns(self):
        d = self.d
        self.seed("10")
        h = d.ctl_json("hold", "create", "acme", "--ref", "short", "--amount", "7", "--expires-in", "2")
        self.assertEqual(d.ctl_json("balance", "acme")["available"], "3")
        d.stop()
        while time.time() < utc(h["expires_at"]) + 1:
            time.sleep(0.2)
        d.start()
        self.assertEqual(d.ctl_json("balance", "acme"),
                         {"balance": "10", "held": "0", "available": "10", "currency": "USD"})
        deadline = time.time() + 10  # the writer ends it by itself, no request needed
        while d.ctl_json("wallet", "get", "acme")["holds_active"] and time.time() < deadline:
            time.sleep(0.1)
        g = d.ctl_json("hold", "get", "acme", "short")
        self.assertEqual((g["status"], g["closed_at"]), ("expired", h["expires_at"]))
        self.assertEqual(d.ctl_json("wallet", "get", "acme")["holds_active"], 0)
        self.assertTrue(d.ctl_json("verify")["ok"])
        self.assertEqual(d.ctl_json("charge", "acme", "sms", UG, "after", "--hold", "short", expect=1)["code"],
                         "hold_closed")

    def test_concurrent_charges_under_one_hold_never_overdraw_it(self):
        d = self.d
        self.seed("0")
        d.ctl_json("credit", "acme", "0.47", "exactly 50 messages")
        d.ctl_json("hold", "create", "acme", "--ref", "all", "--amount", "0.47")
        results = self.pipelines([[request(i, "charge", {"wallet": "acme", "channel": "sms", "to": UG, "hold": "all",
                                                         "ref": "c%d-%d" % (k, i)}) for i in range(20)]
                                  for k in range(6)])
        ok = [r for r in results if r[2] is None]
        self.assertEqual(len(results), 120)
        self.assertEqual(len(ok), 50)
        self.assertEqual({r[2]["code"] for r in results if r[2]}, {"insufficient_balance"})
        g = d.ctl_json("hold", "get", "acme", "all")
        self.assertEqual((g["remaining"], d.ctl_json("balance", "acme")["balance"]), ("0", "0"))
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_a_campaign_in_one_step_holds_its_money_in_the_quotes_commit(self):
        d = self.d
        self.seed("1")  # an SMS to +256 costs 0.0094
        numbers = os.path.join(d.dir, "numbers.txt")
        with open(numbers, "w") as f:
            f.write("".join("+2567%08d\n" % i for i in range(100)))
        p = d.ctl_json("precheck", "acme", "sms", numbers, "--hold", "cmp-1", "--expires_in", "600")
        self.assertEqual((p["sufficient"], p["required"], p["missing"]), (True, "0.94", "0"))
        h = p["hold"]
        self.assertEqual((h["hold"], h["amount"], h["status"], h["replayed"]), ("cmp-1", "0.94", "active", False))
        self.assertEqual(utc(h["expires_at"]) - utc(h["created_at"]), 600)
        self.assertEqual(d.ctl_json("balance", "acme"),
                         {"balance": "1", "held": "0.94", "available": "0.06", "currency": "USD"})
        again = d.ctl_json("precheck", "acme", "sms", numbers, "--hold", "cmp-1", "--expires_in", "600")
        self.assertEqual((again["sufficient"], again["missing"], again["hold"]["replayed"]), (True, "0", True))
        self.assertEqual(again["hold"]["created_at"], h["created_at"])
        short = d.ctl_json("precheck", "acme", "sms", numbers, "--hold", "cmp-2")
        self.assertEqual((short["sufficient"], short["missing"], short["hold"]), (False, "0.88", None))
        with d.client() as c:  # money enough, but a recipient is not valid: no hold either
            r = c.precheck(wallet="acme", channel="sms", recipients=[UG, "0712"], hold="cmp-3")
            self.assertEqual((r["sufficient"], r["hold"], r["invalid"]), (False, None, ["0712"]))
            r = c.precheck(wallet="acme", channel="sms", recipients=[UG], hold=None)  # nil: no hold
            self.assertNotIn("hold", r)
            for params, field in (({"hold": "cmp-4", "at": "2026-01-01T00:00:00Z"}, "at"),
                                  ({"expires_in": 60}, "expires_in"), ({"hold": ""}, "hold"),
                                  ({"hold": "dlr:1"}, "hold"), ({"hold": 7}, "hold"),
                                  ({"hold": "cmp-1", "recipients": [UG]}, "hold")):
                args = {"wallet": "acme", "channel": "sms", "recipients": [UG]}
                args.update(params)
                with self.assertRaises(walletd.WalletdError, msg=params) as e:
                    c.precheck(**args)
                self.assertEqual((e.exception.code, e.exception.field), (
                    "idempotency_conflict" if field == "hold" and params["hold"] == "cmp-1" else "invalid_argument",
                    field), params)
            self.assertEqual(c.balance(wallet="acme")["held"], D("0.94"))
            self.assertEqual([x["hold"] for x in c.call("hold.list", wallet="acme")["holds"]], ["cmp-1"])
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_campaigns_in_one_step_racing_charges_never_hold_more_than_there_is(self):
        d = self.d
        self.seed("0")
        d.ctl_json("credit", "acme", "0.5", "fifty-three messages")
        campaign = ["+2567%08d" % i for i in range(10)]  # 0.094 each
        results = self.pipelines([[request(i, "precheck", {"wallet": "acme", "channel": "sms", "recipients": campaign,
                                                           "hold": "cmp-%d-%d" % (k, i)}) if k % 2 else
                                   request(i, "charge", {"wallet": "acme", "channel": "sms", "to": UG,
                                                         "ref": "c%d-%d" % (k, i)}) for i in range(10)]
                                  for k in range(6)])
        self.assertEqual([r[2] for r in results if r[2] and r[2]["code"] != "insufficient_balance"], [])
        prechecks = [r[3] for r in results if r[2] is None and "sufficient" in r[3]]
        held = sum(1 for p in prechecks if p["hold"])
        charged = sum(1 for r in results if r[2] is None and "sufficient" not in r[3])
        self.assertEqual((len(prechecks), held), (30, sum(1 for p in prechecks if p["sufficient"])))
        b = d.ctl_json("balance", "acme")
        self.assertEqual((D(b["held"]), D(b["balance"])), (D("0.094") * held, D("0.5") - D("0.0094") * charged))
        self.assertGreaterEqual(D(b["available"]), 0)
        self.assertLess(D(b["available"]), D("0.094"))  # a campaign was refused only for want of money
        self.assertTrue(d.ctl_json("verify")["ok"])


class CreditAndControls(DaemonTest):
    def test_credit_limit_lets_the_balance_go_down_to_minus_it_never_below(self):
        d = self.d
        self.seed("0")
        d.ctl_json("wallet", "update", "acme", "--credit-limit", "0.0188", "--threshold", "-0.01",
                   "--alert-email", "ops@acme.example")
        t1 = d.ctl_json("charge", "acme", "sms", UG, "m1")
        t2 = d.ctl_json("charge", "acme", "sms", UG, "m2")
        self.assertEqual((t1["balance_after"], t2["balance_after"]), ("-0.0094", "-0.0188"))  # exactly -credit_limit
        self.assertEqual(d.ctl_json("charge", "acme", "sms", UG, "m3", expect=4)["available"], "0")
        self.assertEqual(d.ctl_json("debit", "acme", "0.000001", "fee", expect=4)["code"], "insufficient_balance")
        self.assertEqual(len(d.ctl_json("notifications", "acme")["notifications"]), 1)  # crossed -0.01
        e = d.ctl_json("wallet", "update", "acme", "--credit-limit", "0.01", expect=1)
        self.assertEqual(e["field"], "credit_limit")  # it owes 0.0188: the limit cannot go under that
        d.ctl_json("credit", "acme", "1", "top up")
        self.assertEqual(d.ctl_json("wallet", "update", "acme", "--credit-limit", "none")["credit_limit"], "0")
        self.assertTrue(d.ctl_json("verify")["ok"])  # past negative balances are legitimate: a limit was set

    def test_an_update_changes_only_what_it_names_in_every_order(self):
        d = self.d
        self.seed("10")
        d.ctl_json("rate", "set", "default", "sms", "254", "0.01", "USD")
        d.ctl_json("rate", "set", "gold", "sms", "256", "0.01", "USD")
        start = {"plan": "default", "threshold": D("5"), "alert_emails": ["ops@acme.example"], "status": "active",
                 "credit_limit": D("2"), "daily_limit": D("100"), "hourly_messages": 1000,
                 "allowed_prefixes": ["25"], "blocked_prefixes": ["2567"], "guard_range_max": 100,
                 "guard_window": 300, "guard_country_spike": 5, "guard_min_messages": 20, "guard_block": 900,
                 "guard_safe_prefixes": ["2547"]}
        other = {"plan": "gold", "threshold": D("3"), "alert_emails": ["b@acme.example"], "status": "frozen",
                 "credit_limit": D("4"), "daily_limit": D("50"), "hourly_messages": 7,
                 "allowed_prefixes": ["256", "254"], "blocked_prefixes": ["2541"], "guard_range_max": 7,
                 "guard_window": 120, "guard_country_spike": 3, "guard_min_messages": 10, "guard_block": 60,
                 "guard_safe_prefixes": ["2541", "256"]}
        cleared = {"plan": "default", "threshold": None, "alert_emails": [], "credit_limit": D("0"),
                   "daily_limit": None, "hourly_messages": None, "allowed_prefixes": [], "blocked_prefixes": [],
                   "guard_range_max": 0, "guard_window": 600, "guard_country_spike": 0, "guard_min_messages": 50,
                   "guard_block": 1800, "guard_safe_prefixes": []}  # a guard_* setting cleared: the config's
        with d.client() as c:
            def settings():
                w = c.wallet_get(wallet="acme")
                return {k: w[k] for k in start}

            c.wallet_update(wallet="acme", **start)
            self.assertEqual(settings(), start)
            for p in start:
                for q in start:  # p changed, then q: p keeps its new value, the rest their old ones
                    for value in ([other[q]] + ([None] if q in cleared else [])):
                        c.wallet_update(wallet="acme", **{p: other[p]})
                        c.wallet_update(wallet="acme", **{q: value})
                        want = dict(start, **{p: other[p]})
                        want[q] = cleared[q] if value is None else value
                        self.assertEqual(settings(), want, (p, q, value))
                        c.wallet_update(wallet="acme", **start)
            self.assertEqual(settings(), start)
            for p in start:  # the blocklist holds whatever else is updated
                if p not in ("allowed_prefixes", "blocked_prefixes", "status"):
                    c.wallet_update(wallet="acme", **{p: other[p]})
                with self.assertRaises(walletd.DestinationBlocked):
                    c.charge(wallet="acme", channel="sms", to="+256712345678", ref="b-" + p)
                c.wallet_update(wallet="acme", **start)
        self.assertEqual(d.ctl_json("history", "acme")["total"], 1)  # the opening credit only

    def test_limits_count_what_was_spent_before_they_were_set(self):
        d = self.d
        self.seed("10")
        d.ctl_json("rate", "set", "default", "sms", "1", "1", "USD")
        for i in range(4):
            d.ctl_json("charge", "acme", "sms", "+1555000000%d" % i, "h%d" % i)
        d.ctl_json("wallet", "update", "acme", "--hourly-messages", "2")
        e = d.ctl_json("charge", "acme", "sms", "+15550000009", "h9", expect=1)
        self.assertEqual((e["code"], e["limit"], e["used"], e["max"]), ("limit_exceeded", "hourly_messages", "4", "2"))
        d.ctl_json("wallet", "update", "acme", "--hourly-messages", "none", "--daily-limit", "4")
        e = d.ctl_json("charge", "acme", "sms", "+15550000009", "h9", expect=1)
        self.assertEqual((e["limit"], e["used"], e["max"]), ("daily_limit", "4", "4"))
        d.ctl_json("wallet", "update", "acme", "--daily-limit", "5")
        d.ctl_json("charge", "acme", "sms", "+15550000009", "h9")
        d.restart()  # the counts are stored with the wallet
        e = d.ctl_json("charge", "acme", "sms", "+15550000008", "h8", expect=1)
        self.assertEqual((e["limit"], e["used"]), ("daily_limit", "5"))
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_credit_limit_never_leaves_holds_uncovered_nor_leaves_the_amount_range(self):
        d = self.d
        self.seed("0")
        d.ctl_json("wallet", "update", "acme", "--credit-limit", "10")
        d.ctl_json("hold", "create", "acme", "--ref", "cmp", "--amount", "8")
        e = d.ctl_json("wallet", "update", "acme", "--credit-limit", "7.99", expect=1)
        self.assertEqual((e["code"], e["field"]), ("invalid_argument", "credit_limit"))
        self.assertIn("holds", e["message"])
        w = d.ctl_json("wallet", "update", "acme", "--credit-limit", "8")
        self.assertEqual((w["credit_limit"], w["held"], w["available"]), ("8", "8", "0"))
        d.ctl_json("charge", "acme", "sms", UG, "m1", "--hold", "cmp")  # the held money is still there
        d.ctl_json("credit", "acme", "1", "top up")
        big = "9223372036854"  # with a balance of 0.99 it passes the largest amount
        e = d.ctl_json("wallet", "update", "acme", "--credit-limit", big, expect=1)
        self.assertEqual((e["code"], e["field"]), ("invalid_argument", "credit_limit"))
        self.assertEqual(d.ctl_json("wallet", "get", "acme")["credit_limit"], "8")
        e = d.ctl_json("wallet", "create", "beta", "USD", "--credit-limit", "9223372036855", expect=1)
        self.assertEqual(e["field"], "credit_limit")
        d.ctl_json("wallet", "update", "acme", "--threshold", "1")  # other settings need no room
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_blocked_and_allowed_prefixes(self):
        d = self.d
        self.seed("1")
        d.ctl_json("rate", "set", "default", "sms", "254", "0.01", "USD")
        w = d.ctl_json("wallet", "update", "acme", "--block", "2567", "--block", "2541")
        self.assertEqual(w["blocked_prefixes"], ["2567", "2541"])
        e = d.ctl_json("charge", "acme", "sms", "+256712345678", "b1", expect=1)
        self.assertEqual((e["code"], e["prefix"], e["field"]), ("destination_blocked", "2567", "to"))
        d.ctl_json("charge", "acme", "sms", "+256812345678", "b2")
        d.ctl_json("wallet", "update", "acme", "--blocked-prefix", "none", "--allowed-prefix", "2568")
        e = d.ctl_json("charge", "acme", "sms", "+254712345678", "b3", expect=1)
        self.assertEqual((e["code"], e["prefix"]), ("destination_blocked", None))
        with d.client() as c:
            p = c.precheck(wallet="acme", channel="sms", recipients=["+256812345678", "+254712345678", "0712"])
            self.assertEqual((p["blocked"], p["invalid"], p["required"]), (["+254712345678"], ["0712"], D("0.0094")))
            w = c.wallet_update(wallet="acme", allowed_prefixes=None)
        self.assertEqual(w["allowed_prefixes"], [])
        d.ctl_json("charge", "acme", "sms", "+254712345678", "b3")
        for bad in ("0256", "25a", "1" * 16):
            self.assertEqual(d.ctl_json("wallet", "update", "acme", "--block", bad, expect=1)["field"],
                             "blocked_prefixes")
        self.assertEqual(d.ctl_json("history", "acme")["total"], 3)


class LimitsAtTheEdges(DaemonTest):
    """walletd's clock set by a file (tests/faults.so, in the plain build)."""

    def clock(self, when):
        set_clock(self.clock_file, utc(when))

    def setUp(self):
        super().setUp()
        self.clock_file = os.path.join(self.d.dir, "clock")
        self.clock("2026-11-30T23:59:58Z")
        self.d.restart_plain(clock=self.clock_file)

    def test_daily_limit_resets_at_utc_midnight_and_hourly_rolls_by_minute(self):
        d = self.d
        self.seed("100")
        d.ctl_json("rate", "set", "default", "sms", "1", "1", "USD")
        d.ctl_json("wallet", "update", "acme", "--daily-limit", "3")
        for i in range(3):
            d.ctl_json("charge", "acme", "sms", "+15550000%03d" % i, "d%d" % i)
        self.clock("2026-11-30T23:59:59Z")  # the day's last second
        e = d.ctl_json("charge", "acme", "sms", "+15550000999", "d3", expect=1)
        self.assertEqual((e["code"], e["limit"], e["max"], e["used"], e["resets_at"]),
                         ("limit_exceeded", "daily_limit", "3", "3", "2026-12-01T00:00:00Z"))
        with d.client() as c:
            p = c.precheck(wallet="acme", channel="sms", recipients=["+15550000999"])
        self.assertEqual(p["limit_exceeded"]["limit"], "daily_limit")
        self.clock("2026-12-01T00:00:00Z")  # a new UTC day
        d.ctl_json("charge", "acme", "sms", "+15550000999", "d3")
        d.ctl_json("wallet", "update", "acme", "--daily-limit", "none", "--hourly-messages", "2")
        self.clock("2026-12-01T01:05:30Z")  # the charges of 23:59 and 00:00 are out of the rolling hour
        d.ctl_json("charge", "acme", "sms", "+15550001000", "h1")
        self.clock("2026-12-01T01:10:30Z")
        d.ctl_json("charge", "acme", "sms", "+15550001001", "h2")
        e = d.ctl_json("charge", "acme", "sms", "+15550001002", "h3", expect=1)
        self.assertEqual((e["limit"], e["max"], e["used"], e["resets_at"]),
                         ("hourly_messages", "2", "2", "2026-12-01T02:05:00Z"))
        self.clock("2026-12-01T02:04:59Z")  # the hour since 01:05 has not rolled yet
        self.assertEqual(d.ctl_json("charge", "acme", "sms", "+15550001002", "h3", expect=1)["code"],
                         "limit_exceeded")
        self.clock("2026-12-01T02:05:00Z")  # the 01:05 message leaves the rolling hour
        d.ctl_json("charge", "acme", "sms", "+15550001002", "h3")
        self.assertEqual(d.ctl_json("charge", "acme", "sms", "+15550001003", "h4", expect=1)["resets_at"],
                         "2026-12-01T02:10:00Z")
        self.assertEqual(d.ctl_json("history", "acme", "--type", "sms_charge")["total"], 7)
        self.assertTrue(d.ctl_json("verify")["ok"])


class PartialRefunds(DaemonTest):
    def test_partial_refunds_add_up_to_the_charge_never_more(self):
        d = self.d
        self.seed("1")
        t = d.ctl_json("charge", "acme", "sms", UG, "m3", "--segments", "3")  # 0.0282
        e = d.ctl_json("refund", "acme", "--ref", "m3", "--amount", "0.0094", expect=1)
        self.assertEqual(e["field"], "refund_ref")  # a partial refund needs its idempotency key
        r1 = d.ctl_json("refund", "acme", "--ref", "m3", "--amount", "0.0094", "--refund-ref", "dlr-1")
        again = d.ctl_json("refund", "acme", "--ref", "m3", "--amount", "0.0094", "--refund-ref", "dlr-1")
        self.assertEqual((again["id"], again["replayed"], r1["replayed"]), (r1["id"], True, False))
        self.assertEqual(d.ctl_json("refund", "acme", "--ref", "m3", "--amount", "0.0001", "--refund-ref", "dlr-1",
                                    expect=1)["code"], "idempotency_conflict")
        self.assertEqual(d.ctl_json("refund", "acme", "--txn", t["id"], "--amount", "0.0189", "--refund-ref", "x",
                                    expect=1)["field"], "amount")  # only 0.0188 is left
        rest = d.ctl_json("refund", "acme", "--txn", t["id"])  # all that is left
        self.assertEqual((rest["amount"], rest["description"].split(" of ")[0]), ("0.0188", "Refund"))
        e = d.ctl_json("refund", "acme", "--ref", "m3", expect=1)
        self.assertEqual((e["code"], e["refund"]["id"], [x["id"] for x in e["refunds"]]),
                         ("already_refunded", r1["id"], [r1["id"], rest["id"]]))
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "1")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_partial_refunds_racing_from_several_clients_never_exceed_the_charge(self):
        d = self.d
        self.seed("1")
        t = d.ctl_json("charge", "acme", "sms", UG, "big", "--segments", "5")  # 0.047: five parts of 0.0094
        answers = self.pipelines([[request(i, "refund", {"wallet": "acme", "txn": t["id"], "amount": "0.0094",
                                                         "refund_ref": "dlr-%d" % ((k + i) % 8)}) for i in range(8)]
                                  for k in range(6)])
        made = {a[3]["id"] for a in answers if a[2] is None and not a[3]["replayed"]}
        self.assertEqual(len(made), 5)
        self.assertEqual({a[2]["code"] for a in answers if a[2]}, {"already_refunded"})
        for a in answers:  # a replay names a refund that was made
            if a[2] is None:
                self.assertIn(a[3]["id"], made)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "1")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_refund_batch_refunds_a_delivery_report_storm_in_one_commit(self):
        d = self.d
        self.seed("20")
        self.charge_sms(1000)
        before = d.ctl_json("stats")["commits"]
        items = [{"wallet": "acme", "ref": "m%d" % i, "reason": "DLR failed"} for i in range(1000)]
        items[5] = {"wallet": "acme", "ref": "nope"}
        items[7] = {"wallet": "acme", "ref": "m6"}  # m6 twice: the second finds it refunded
        with d.client() as c:
            res = c.call("refund.batch", items=items)["results"]
        self.assertEqual(d.ctl_json("stats")["commits"], before + 1)
        self.assertEqual(res[5]["error"]["code"], "unknown_txn")
        self.assertEqual(res[7]["error"]["code"], "already_refunded")
        self.assertEqual(sum("error" not in r for r in res), 998)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], str(D(20) - D("0.0094") * 2))
        self.assertTrue(d.ctl_json("verify")["ok"])


class Upgrade(DaemonTest):
    """A store written by an earlier release (commit 609647a, layout 4) opens, keeps
    every wallet and transaction, and passes verify; then it takes holds and limits."""
    PREVIOUS = "609647a"
    LIBS = ["msgpack", "lmdb", "libcurl"]

    def setUp(self):
        self.work = tempfile.mkdtemp(prefix="walletd-upgrade-")
        self.old = build_release(self.PREVIOUS, self.LIBS, self.work)
        self.d = Daemon()
        self.d.binary = self.old  # the previous release makes the store
        self.d.start()

    def tearDown(self):
        super().tearDown()
        shutil.rmtree(self.work, ignore_errors=True)

    def reopen(self):
        """Stops the previous release and starts this one on its store."""
        self.d.stop()
        self.d.binary = os.environ.get("WALLETD", os.path.join(ROOT, "walletd"))
        self.d.start()

    def test_a_store_of_the_previous_release_upgrades_in_place(self):
        d = self.d
        self.seed("50")
        d.ctl_json("wallet", "create", "beta", "UGX", "--threshold", "100", "--alert-email", "a@b.example")
        d.ctl_json("credit", "beta", "1000", "opening")
        self.charge_sms(300)
        d.ctl_json("refund", "acme", "--ref", "m7")
        tp = d.ctl_json("topup", "create", "acme", "5")
        d.ctl_json("topup", "confirm", tp["ref"], "5", "paystack", "PS-1")
        d.ctl_json("charge", "beta", "sms", UG, "u1", "--segments", "26")  # 910 UGX: 90 left, under its threshold
        before = {w: d.ctl_json("wallet", "get", w) for w in ("acme", "beta")}
        hist = d.ctl_json("history", "acme", "--limit", "1000")
        old_verify = d.ctl_json("verify")
        self.assertTrue(old_verify["ok"])
        self.reopen()
        self.assertIn("to layout 6 (journaled", d.read_log())
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["wallets"], v["transactions"], v["breaches"]),
                         (True, 2, old_verify["transactions"], []))
        for w in ("acme", "beta"):
            now = d.ctl_json("wallet", "get", w)
            for k, val in before[w].items():
                self.assertEqual(now[k], val, (w, k))
            self.assertEqual((now["held"], now["credit_limit"], now["daily_limit"]), ("0", "0", None))
        now = d.ctl_json("history", "acme", "--limit", "1000")
        self.assertEqual((unhashed(now), chain_breaks(now["transactions"])), (hist, []))  # chained at the upgrade
        self.assertEqual(len(d.ctl_json("notifications", "beta")["notifications"]), 1)
        e = d.ctl_json("refund", "acme", "--ref", "m7", expect=1)  # refunded under the old layout
        self.assertEqual((e["code"], len(e["refunds"])), ("already_refunded", 1))
        self.assertEqual(d.ctl_json("charge", "acme", "sms", UG, "m8")["replayed"], True)  # its refs too
        d.ctl_json("hold", "create", "acme", "--ref", "after", "--amount", "1")
        d.ctl_json("wallet", "update", "acme", "--credit-limit", "10", "--daily-limit", "5")
        d.ctl_json("charge", "acme", "sms", UG, "new", "--hold", "after")
        self.assertTrue(d.ctl_json("verify")["ok"])
        d.restart()
        self.assertNotIn("to layout", d.read_log().split("stopped")[-1])  # once
        self.assertTrue(d.ctl_json("verify")["ok"])


class UpgradeFromTheJournallessRelease(Upgrade):
    """The same from the release before the journal (commit b9704a6, layout 5, LMDB synced
    at every commit): with its spend controls set, and counted, before the upgrade."""
    PREVIOUS = "b9704a6"
    LIBS = ["msgpack", "lmdb", "libcurl", "jansson", "libcrypto", "libnats"]

    def test_limits_set_before_the_upgrade_keep_counting(self):
        d = self.d
        self.seed("50")
        d.ctl_json("rate", "set", "default", "sms", "1", "1", "USD")
        d.ctl_json("wallet", "update", "acme", "--hourly-messages", "3", "--daily-limit", "10", "--block", "2567")
        for i in range(2):
            d.ctl_json("charge", "acme", "sms", "+1555000000%d" % i, "h%d" % i)
        self.reopen()
        self.assertIn("to layout 6 (journaled", d.read_log())
        w = d.ctl_json("wallet", "get", "acme")
        self.assertEqual((w["hourly_messages"], w["daily_limit"], w["blocked_prefixes"]), (3, "10", ["2567"]))
        d.ctl_json("charge", "acme", "sms", "+15550000002", "h2")  # the third of the hour
        e = d.ctl_json("charge", "acme", "sms", "+15550000003", "h3", expect=1)
        self.assertEqual((e["limit"], e["used"]), ("hourly_messages", "3"))
        self.assertEqual(d.ctl_json("charge", "acme", "sms", UG, "b1", expect=1)["code"], "destination_blocked")
        d.kill()  # journaled from the upgrade on
        d.start()
        self.assertEqual(d.ctl_json("charge", "acme", "sms", "+15550000003", "h3", expect=1)["used"], "3")
        self.assertTrue(d.ctl_json("verify")["ok"])


class UpgradeFromTheReleaseBeforeTheBrake(Upgrade):
    """The same from the release before the fraud brake (commit cc5af37, layout 6): its wallets,
    with every spend control and a charge held for its report, open and take the brake."""
    PREVIOUS = "cc5af37"
    LIBS = UpgradeFromTheJournallessRelease.LIBS

    def test_a_store_of_the_previous_release_upgrades_in_place(self):
        d = self.d
        self.seed("50")
        d.ctl_json("wallet", "update", "acme", "--hourly-messages", "300", "--daily-limit", "10", "--block", "2541",
                   "--allow", "25,1", "--threshold", "1", "--alert-email", "ops@acme.example")
        d.ctl_json("rate", "set", "default", "whatsapp", "256", "0.02", "USD", "--settle", "delivery")
        self.charge_sms(100)
        d.ctl_json("charge", "acme", "whatsapp", "+256712345678", "w1")  # held for its report
        before = d.ctl_json("wallet", "get", "acme")
        hist = d.ctl_json("history", "acme", "--limit", "1000")
        digest = d.ctl_json("verify")["digest"]
        self.reopen()
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["digest"]), (True, digest))
        now = d.ctl_json("wallet", "get", "acme")
        for k, val in before.items():
            self.assertEqual(now[k], val, k)
        self.assertEqual((now["guard_range_max"], now["guard_safe_prefixes"]), (0, []))
        now = d.ctl_json("history", "acme", "--limit", "1000")
        self.assertEqual((unhashed(now), chain_breaks(now["transactions"])), (hist, []))
        self.assertEqual(d.ctl_json("delivery", "acme", "w1", "delivered")["delivery"]["status"], "delivered")
        d.ctl_json("wallet", "update", "acme", "--guard-range-max", "2", "--guard-safe-prefixes", "2567123")
        for i in range(2):
            d.ctl_json("charge", "acme", "sms", "+256700000%03d" % i, "g%d" % i)
        self.assertEqual(d.ctl_json("charge", "acme", "sms", "+256700000009", "g2", expect=1)["code"],
                         "destination_suspended")
        self.assertEqual(d.ctl_json("wallet", "get", "acme")["hourly_messages"], 300)
        d.restart()
        self.assertTrue(d.ctl_json("verify")["ok"])
        self.assertEqual(len(d.ctl_json("guard", "list", "acme")["suspensions"]), 1)


class UpgradeFromTheReleaseBeforeTheChain(Upgrade):
    """The same from the release before the hash chain (commit 688ed99, layout 6): every
    transaction, a charge held for its report among them, is chained when the store opens;
    what comes after is chained on."""
    PREVIOUS = "688ed99"
    LIBS = UpgradeFromTheJournallessRelease.LIBS

    def test_a_store_of_the_previous_release_upgrades_in_place(self):
        d = self.d
        self.seed("50")
        d.ctl_json("wallet", "create", "beta", "UGX")
        d.ctl_json("credit", "beta", "1000", "opening")
        d.ctl_json("rate", "set", "default", "whatsapp", "256", "0.02", "USD", "--settle", "delivery")
        self.charge_sms(40)
        d.ctl_json("refund", "acme", "--ref", "m7")
        d.ctl_json("debit", "acme", "1", "a correction")
        d.ctl_json("charge", "beta", "sms", UG, "b1")
        d.ctl_json("charge", "acme", "whatsapp", UG, "w1")  # held for its report
        hist = {w: d.ctl_json("history", w, "--limit", "1000") for w in ("acme", "beta")}
        self.assertNotIn("hash", hist["acme"]["transactions"][0])
        digest = d.ctl_json("verify")["digest"]
        self.reopen()
        self.assertIn("to layout 7 (every transaction hash-chained)", d.read_log())
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["digest"], v["breaches"]), (True, digest, []))
        for w in ("acme", "beta"):
            now = d.ctl_json("history", w, "--limit", "1000")
            self.assertEqual((unhashed(now), chain_breaks(now["transactions"])), (hist[w], []))
        d.ctl_json("delivery", "acme", "w1", "delivered")
        d.ctl_json("charge", "acme", "sms", UG, "after")
        d.restart()
        self.assertNotIn("to layout", d.read_log().split("stopped")[-1])  # once
        txns = d.ctl_json("history", "acme", "--limit", "1000")["transactions"]
        self.assertEqual((len(txns), chain_breaks(txns)), (len(hist["acme"]["transactions"]) + 2, []))
        self.assertTrue(d.ctl_json("verify")["ok"])


class UpgradeFromTheReleaseBeforeLots(Upgrade):
    """The same from the release before resellers' shared children, credit lots and automatic
    top-up (commit 0483335, layout 7): it opens as it is, then its wallets take all three."""
    PREVIOUS = "0483335"
    LIBS = UpgradeFromTheJournallessRelease.LIBS

    def test_a_store_of_the_previous_release_upgrades_in_place(self):
        d = self.d
        self.seed("50")
        d.ctl_json("wallet", "create", "shop", "USD", "--parent", "acme")
        d.ctl_json("transfer", "acme", "shop", "5", "--ref", "t1")
        self.charge_sms(40)
        d.ctl_json("charge", "shop", "sms", UG, "s1")
        before = {w: d.ctl_json("wallet", "get", w) for w in ("acme", "shop")}
        hist = d.ctl_json("history", "acme", "--limit", "1000")
        digest = d.ctl_json("verify")["digest"]
        self.reopen()
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["digest"], v["breaches"]), (True, digest, []))
        for w in ("acme", "shop"):
            now = d.ctl_json("wallet", "get", w)
            self.assertEqual({k: now[k] for k in before[w]}, before[w])
            self.assertEqual((now["lots"], now["shared"], now["auto_topup"]), ([], False, None))
        self.assertEqual(d.ctl_json("history", "acme", "--limit", "1000"), hist)
        d.ctl_json("wallet", "create", "kiosk", "USD", "--parent", "acme", "--shared")
        d.ctl_json("credit", "acme", "2", "promo", "--promo", "--expires-in", "30")
        d.ctl_json("charge", "kiosk", "sms", UG, "k1")  # drawn from acme, from its promo lot
        self.assertEqual(d.ctl_json("wallet", "get", "acme")["lots"][0]["remaining"], "1.9906")
        d.restart()
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))

class UpgradeFromTheFirstReleaseWithLots(Upgrade):
    """The same from the first release with credit lots (commit bdef9e9): its charges' entries keep what
    they took from lots, and their delivery policies, in the form that release wrote; a refund and a
    report after the upgrade read them, and its lots are drawn on as before."""
    PREVIOUS = "bdef9e9"
    LIBS = UpgradeFromTheJournallessRelease.LIBS

    def test_a_store_of_the_previous_release_upgrades_in_place(self):
        d = self.d
        self.seed("1")
        d.ctl_json("rate", "set", "refund", "sms", "256", "35", "UGX", "--on-failure", "refund")
        d.ctl_json("credit", "acme", "0.01", "welcome", "--promo", "--expires-in", "30")
        d.ctl_json("credit", "acme", "0.05", "paid", "--expires-in", "60")
        d.ctl_json("charge", "acme", "sms", UG, "a")  # 0.0094 of the promo lot
        d.ctl_json("charge", "acme", "sms", UG, "b")  # its last 0.0006, then 0.0088 of the paid one
        d.ctl_json("wallet", "update", "acme", "--plan", "refund")
        d.ctl_json("charge", "acme", "sms", UG, "c")  # 0.0094 of the paid one, refunded if it fails
        lots = d.ctl_json("wallet", "get", "acme")["lots"]
        self.assertEqual([x["remaining"] for x in lots], ["0.0318"])
        digest = d.ctl_json("verify")["digest"]
        self.reopen()
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["digest"], v["breaches"]), (True, digest, []))
        self.assertEqual(d.ctl_json("wallet", "get", "acme")["lots"], lots)
        d.ctl_json("refund", "acme", "--ref", "b", "--refund-ref", "r1")  # back to both lots, the last first
        self.assertEqual([x["remaining"] for x in d.ctl_json("wallet", "get", "acme")["lots"]], ["0.0006", "0.0406"])
        r = d.ctl_json("delivery", "acme", "c", "failed")
        self.assertEqual(r["delivery"]["status"], "failed")
        self.assertEqual([x["remaining"] for x in d.ctl_json("wallet", "get", "acme")["lots"]], ["0.0006", "0.05"])
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "1.0506")
        d.ctl_json("charge", "acme", "sms", UG, "d")  # the promo lot's 0.0006, then the paid one
        d.restart()
        self.assertEqual([x["remaining"] for x in d.ctl_json("wallet", "get", "acme")["lots"]], ["0.0412"])
        v = d.ctl_json("verify")
        self.assertEqual((v["ok"], v["breaches"]), (True, []))

