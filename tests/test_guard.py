"""The fraud brake against SMS pumping: a range or a calling code suspended past its count
(walletd's clock set by a file), refused as destination_suspended while other destinations
charge, doubled on repeat, safe prefixes, lift, risk_check, precheck's blocked, the e-mails
(a real SMTP server) and the event (a real HTTP server)."""
import json
import os
import subprocess
import time

from harness import DaemonTest, HERE, PY, json_files, set_clock, utc
import walletd  # noqa: E402 (harness puts contrib/python on the path)
from test_alerts import SmtpSink
from test_topups import free_port

UG = "+256712345%03d"  # a number of the range 256712345


class Brake(DaemonTest):
    def setUp(self):
        self.smtp, self.hook = free_port(), free_port()
        self.config = {"smtp_url": "smtp://127.0.0.1:%d" % self.smtp, "alert_interval": "1", "smtp_timeout": "5",
                       "ops_emails": "fraud@platform.example", "webhook_url": "http://127.0.0.1:%d/" % self.hook}
        super().setUp()
        d = self.d
        self.clock_file = os.path.join(d.dir, "clock")
        self.clock("2026-12-07T10:00:00Z")
        d.config["webhook_secret_file"] = os.path.join(d.dir, "webhook.secret")
        with open(d.config["webhook_secret_file"], "w") as f:
            f.write("whsec_test_42\n")
        d.restart_plain(clock=self.clock_file)
        d.ctl_json("wallet", "create", "acme", "USD", "--alert-email", "ops@acme.example")
        d.ctl_json("credit", "acme", "1000", "opening")
        d.ctl_json("fx", "set", "USD", "UGX", "3723.40")
        d.ctl_json("rate", "set", "default", "sms", "256", "35", "UGX")
        d.ctl_json("rate", "set", "default", "sms", "44", "0.04", "USD")
        self.sink = SmtpSink(self.smtp, os.path.join(d.dir, "mail"))
        self.posts = os.path.join(d.dir, "posts")
        self.hooks = subprocess.Popen([PY, os.path.join(HERE, "hook_sink.py"), str(self.hook), self.posts, "0"],
                                      stdout=subprocess.PIPE)
        self.hooks.stdout.readline()

    def tearDown(self):
        self.sink.stop()
        self.hooks.terminate()
        self.hooks.wait()
        super().tearDown()

    def clock(self, when):
        set_clock(self.clock_file, utc(when))

    def charge(self, to, ref, expect=0, **kw):
        args = sum((["--" + k.replace("_", "-"), v] for k, v in kw.items()), [])
        return self.d.ctl_json("charge", "acme", "sms", to, ref, *args, expect=expect)

    def charges(self):
        return self.d.ctl_json("history", "acme", "--type", "sms_charge")["total"]

    def test_a_pumping_burst_to_one_range_is_suspended_while_other_ranges_charge(self):
        d = self.d
        self.sink.start()
        d.ctl_json("wallet", "update", "acme", "--guard-range-max", "5")
        for i in range(5):
            self.charge(UG % i, "p%d" % i)
        e = self.charge(UG % 5, "p5", expect=1)
        self.assertEqual((e["code"], e["prefix"], e["until"], e["reason"]),
                         ("destination_suspended", "256712345", "2026-12-07T10:30:00Z", "range_max"))
        self.assertIn("6 messages counted, 5 allowed", e["message"])
        self.assertEqual(self.charges(), 5)  # the refused one changed nothing
        self.assertEqual(self.charge(UG % 6, "p6", expect=1)["code"], "destination_suspended")
        self.assertEqual(self.charge("+256712346000", "other")["amount"], "-0.0094")  # the next range charges
        self.assertEqual(self.charge("+447700900123", "uk")["amount"], "-0.04")
        listed, = d.ctl_json("guard", "list", "acme")["suspensions"]
        self.assertEqual(listed, {"prefix": "256712345", "reason": "range_max", "since": "2026-12-07T10:00:00Z",
                                  "until": "2026-12-07T10:30:00Z", "repeats": 0, "count": 6, "limit": 5})
        with d.client() as c:
            p = c.precheck(wallet="acme", channel="sms", recipients=[UG % 99, "+256712346001"])
        self.assertEqual((p["blocked"], p["sufficient"]), (["+256712345099"], False))

        # the e-mails, to the wallet and to ops, and the event: once
        mails = self.sink.wait_for(2)
        self.assertEqual(sorted(m["to"][0] for m in mails), ["fraud@platform.example", "ops@acme.example"])
        self.assertTrue(all("Messages to +256712345 paused for wallet acme" in m["data"] for m in mails))
        self.assertTrue(all("until 2026-12-07T10:30:00Z" in m["data"] for m in mails))
        notes = d.ctl_json("notifications", "acme")["notifications"]
        self.assertEqual(sorted((n["type"], n["prefix"], n["reason"], n["emails"]) for n in notes),
                         [("destination_suspended", "256712345", "range_max", "fraud@platform.example"),
                          ("destination_suspended", "256712345", "range_max", "ops@acme.example")])
        deadline = time.time() + 20
        while time.time() < deadline and not json_files(self.posts):
            time.sleep(0.1)
        event, = [json.loads(p["body"]) for p in json_files(self.posts)]
        self.assertEqual((event["type"], event["wallet"], event["data"]),
                         ("destination_suspended", "acme", {"prefix": "256712345", "reason": "range_max",
                          "until": "2026-12-07T10:30:00Z", "repeats": 0, "count": 6, "limit": 5}))

        # it ends on time; the traffic goes on, and the next suspension lasts twice as long
        self.clock("2026-12-07T10:30:00Z")
        self.assertEqual(d.ctl_json("guard", "list", "acme")["suspensions"], [])
        for i in range(5):
            self.charge(UG % (10 + i), "q%d" % i)
        e = self.charge(UG % 15, "q5", expect=1)
        self.assertEqual(e["until"], "2026-12-07T11:30:00Z")  # 3,600 s: doubled
        self.assertEqual(d.ctl_json("guard", "list", "acme")["suspensions"][0]["repeats"], 1)

        # admin may send one message past it; a client may not say so
        self.assertEqual(self.charge(UG % 16, "admin", risk_check="false")["amount"], "-0.0094")
        d.config.update(client_users="nobody", socket_group="nogroup")
        d.restart_plain(clock=self.clock_file)
        r = d.ctl("--json", "charge", "acme", "sms", UG % 17, "client", "--risk-check", "false", user="nobody:nogroup")
        self.assertEqual(json.loads(r.stdout)["code"], "permission_denied")
        with d.client() as c:
            item = {"wallet": "acme", "channel": "sms", "to": UG % 18, "ref": "b", "risk_check": False}
            self.assertEqual(c.charge_batch(items=[item])["results"][0]["error"]["field"], "risk_check")

        # lift: it ends now, and the range's count starts afresh (5 more before the next)
        self.assertEqual(d.ctl_json("guard", "lift", "acme", "256712345"), {"prefix": "256712345", "lifted": True})
        self.assertEqual(d.ctl_json("guard", "lift", "acme", "256712345"), {"prefix": "256712345", "lifted": False})
        for i in range(5):
            self.charge(UG % (20 + i), "r%d" % i)
        self.assertEqual(self.charge(UG % 25, "r5", expect=1)["until"], "2026-12-07T11:00:00Z")  # lifted: not a repeat
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_safe_prefixes_are_never_suspended_and_the_brake_is_per_wallet(self):
        d = self.d
        d.ctl_json("wallet", "create", "beta", "USD")
        d.ctl_json("credit", "beta", "10", "opening")
        d.config.update(guard_range_max="3", guard_safe_prefixes="2567123")
        d.restart_plain(clock=self.clock_file)
        for i in range(10):  # the config's safe prefix
            self.charge(UG % i, "s%d" % i)
        d.ctl_json("wallet", "update", "acme", "--guard-safe-prefixes", "44")  # its own list replaces the config's
        for i in range(3):
            self.charge(UG % (10 + i), "t%d" % i)
        self.assertEqual(self.charge(UG % 13, "t3", expect=1)["code"], "destination_suspended")
        for i in range(10):
            self.charge("+4477009001%02d" % i, "u%d" % i)
        w = d.ctl_json("wallet", "update", "acme", "--guard-safe-prefixes", "none", "--guard-range-max", "0")
        self.assertEqual((w["guard_safe_prefixes"], w["guard_range_max"]), (["2567123"], 0))
        self.charge(UG % 14, "t4")  # the brake off for this wallet: nothing suspended, nothing refused
        self.assertEqual(d.ctl_json("guard", "list", "acme")["suspensions"], [])
        for i in range(3):  # another wallet counts its own messages to the same range
            d.ctl_json("charge", "beta", "sms", "+256712999%03d" % i, "v%d" % i)
        self.assertEqual(d.ctl_json("charge", "beta", "sms", "+256712999009", "v3", expect=1)["prefix"], "256712999")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_a_country_spike_against_the_last_seven_days_suspends_its_calling_code(self):
        d = self.d
        # a baseline: 1,440 messages to Uganda on each of the 7 days before (10 per 10-minute window),
        # counted while the spike cannot trip (guard_min_messages far above)
        d.ctl_json("wallet", "update", "acme", "--guard-country-spike", "5", "--guard-min-messages", "1000000")
        with d.client() as c:
            for day in range(7):
                self.clock("2026-12-%02dT12:00:00Z" % (day + 1))
                for part in (0, 1):
                    items = [{"wallet": "acme", "channel": "sms", "to": "+2567%08d" % (day * 10000 + i),
                              "ref": "d%d-%d" % (day, i)} for i in range(part * 720, part * 720 + 720)]
                    self.assertFalse([r for r in c.charge_batch(items=items)["results"] if "error" in r])
        self.clock("2026-12-08T00:00:00Z")
        d.ctl_json("wallet", "update", "acme", "--guard-min-messages", "20")  # a write: the day's counts written
        d.restart_plain(clock=self.clock_file)  # the baseline is in the store, not only in memory
        self.clock("2026-12-08T09:00:00Z")
        for i in range(50):  # 5 times the usual 10 a window, from many ranges
            self.charge("+25670%07d" % (i * 1000), "s%d" % i)
        e = self.charge("+256709999999", "s50", expect=1)
        self.assertEqual((e["code"], e["prefix"], e["reason"], e["until"]),
                         ("destination_suspended", "256", "country_spike", "2026-12-08T09:30:00Z"))
        self.assertIn("51 messages counted, 50 allowed", e["message"])
        self.assertEqual(self.charge("+447700900123", "uk")["amount"], "-0.04")  # another country charges
        d.ctl_json("wallet", "create", "fresh", "USD")  # no history: below guard_min_messages nothing is a spike
        d.ctl_json("credit", "fresh", "10", "opening")
        d.ctl_json("wallet", "update", "fresh", "--guard-country-spike", "5", "--guard-min-messages", "20")
        for i in range(19):
            d.ctl_json("charge", "fresh", "sms", "+25671%07d" % (i * 1000), "f%d" % i)
        self.assertEqual(d.ctl_json("charge", "fresh", "sms", "+256719999999", "f19", expect=1)["prefix"], "256")
        self.assertEqual(d.ctl_json("guard", "lift", "acme", "256")["lifted"], True)
        self.charge("+256709999999", "s50")
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_bad_settings_and_lifts_are_refused_and_change_nothing(self):
        d = self.d
        before = d.ctl_json("wallet", "get", "acme")
        bad = [("--guard-range-max", "1000001"), ("--guard-window", "0"),
               ("--guard-window", "86401"), ("--guard-country-spike", "1001"), ("--guard-min-messages", "0"),
               ("--guard-block", "0"), ("--guard-block", "2592001"), ("--guard-safe-prefixes", "0256"),
               ("--guard-safe-prefixes", "25a")]
        for flag, value in bad:
            e = d.ctl_json("wallet", "update", "acme", "--hourly-messages", "9", flag, value, expect=1)
            self.assertEqual((e["code"], e["field"]), ("invalid_argument", flag[2:].replace("-", "_")), (flag, value))
        with d.client() as c:
            for value in ("5", True, [], "\x00", -1):
                with self.assertRaises(walletd.InvalidArgument):
                    c.wallet_update(wallet="acme", guard_window=value)
            for prefix in ("", "0", "1234567890123456", "25\x006", 256):
                with self.assertRaises(walletd.InvalidArgument):
                    c.guard_lift(wallet="acme", prefix=prefix)
            with self.assertRaises(walletd.UnknownWallet):
                c.guard_lift(wallet="nosuch", prefix="256")
            with self.assertRaises(walletd.InvalidArgument):
                c.charge(wallet="acme", channel="sms", to=UG % 1, ref="x", risk_check="no")
        self.assertEqual(d.ctl_json("wallet", "get", "acme"), before)
        d.config.update(client_users="nobody", staff_users="daemon", socket_group="nogroup")
        d.restart_plain(clock=self.clock_file)
        r = d.ctl("--json", "wallet", "update", "acme", "--guard-range-max", "1", user="daemon:nogroup")
        self.assertEqual(json.loads(r.stdout)["code"], "permission_denied")  # a wallet's limits are admin's
        r = d.ctl("--json", "guard", "lift", "acme", "256", user="nobody:nogroup")
        self.assertEqual(json.loads(r.stdout)["code"], "permission_denied")
        r = d.ctl("--json", "guard", "list", "acme", user="nobody:nogroup")
        self.assertEqual(json.loads(r.stdout), {"suspensions": []})
        self.assertEqual(d.ctl_json("wallet", "get", "acme"), before)
