"""export: every transaction once, in id order, while clients charge; walletctl
export --csv as RFC 4180, resumable; created_at never decreasing with the id."""
import calendar
import csv
import io
import os
import subprocess
import threading
import time

from harness import DaemonTest, WALLETCTL, request, read_frames

UG = "+256712345678"


class Export(DaemonTest):
    def test_an_export_while_clients_charge_holds_every_transaction_once(self):
        d = self.d
        for w in ("w0", "w1", "w2", "w3"):
            self.seed("100", wallet=w)

        def client(k):
            s = d.raw()
            for b in range(10):
                items = [{"wallet": "w%d" % k, "channel": "sms", "to": UG, "ref": "c%d-%d-%d" % (k, b, i)}
                         for i in range(50)]
                s.sendall(request(b, "charge.batch", {"items": items}))
                self.assertEqual(read_frames(s, 1, timeout=60)[0][2], None)
            s.close()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        seen, after, done = [], 0, False
        with d.client() as c:
            while not done:  # pages while the clients charge, then to the end
                done = not any(t.is_alive() for t in threads)
                while True:
                    page = c.call("export", after_id=after, limit=37)
                    seen += page["transactions"]
                    if not page["transactions"]:
                        self.assertEqual(page["last_id"], after)
                        break
                    after = page["last_id"]
                    self.assertEqual(after, page["transactions"][-1]["id"])
        for t in threads:
            t.join()
        ids = [t["id"] for t in seen]
        self.assertEqual(ids, sorted(set(ids)))  # in id order, each once
        self.assertEqual(ids, list(range(1, len(ids) + 1)))  # none missed
        self.assertEqual(len(ids), d.ctl_json("verify")["transactions"])
        self.assertEqual(len([t for t in seen if t["type"] == "sms_charge"]), 2000)
        for w in ("w0", "w1", "w2", "w3"):  # each wallet's rows add up to its balance
            total = sum(float(t["amount"]) for t in seen if t["wallet"] == w)
            self.assertAlmostEqual(total, float(d.ctl_json("balance", w)["balance"]), places=6)
        self.assertEqual(d.ctl_json("export", "--limit", "10001", expect=1)["field"], "limit")

    def test_walletctl_export_csv_is_rfc_4180_and_resumable(self):
        d = self.d
        self.seed("10")
        d.ctl_json("credit", "acme", "2", 'goodwill, "sorry"\nline two')
        for i in range(5):
            d.ctl_json("charge", "acme", "sms", UG, "m%d" % i)
        r = subprocess.run([WALLETCTL, "-s", d.sock, "export", "--csv"], capture_output=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith(b"id,created_at,wallet,type,amount,"))
        self.assertEqual(r.stdout.count(b"\r\n"), 8)  # the header and 7 rows end in CRLF; the \n inside is quoted
        rows = list(csv.DictReader(io.StringIO(r.stdout.decode(), newline="")))
        self.assertEqual([int(x["id"]) for x in rows], list(range(1, 8)))
        self.assertEqual(rows[1]["description"], 'goodwill, "sorry"\nline two')
        self.assertEqual((rows[2]["amount"], rows[2]["to"], rows[2]["segments"]), ("-0.0094", UG, "1"))
        rest = list(csv.DictReader(io.StringIO(d.ctl("export", "--csv", "--after-id", "4").stdout, newline="")))
        self.assertEqual(rest, rows[4:])  # resumed after row 4: the same rows, once


class ClockGoesBack(DaemonTest):
    def test_created_at_never_decreases_with_the_id(self):
        d = self.d
        clock = os.path.join(d.dir, "clock")
        t0 = calendar.timegm(time.strptime("2026-11-15T12:00:00Z", "%Y-%m-%dT%H:%M:%SZ"))
        with open(clock, "w") as f:
            f.write(str(t0))
        d.restart_plain(clock=clock)
        self.seed("10")
        a = d.ctl_json("charge", "acme", "sms", UG, "a")
        with open(clock, "w") as f:
            f.write(str(t0 - 3600))  # the clock steps back an hour
        b = d.ctl_json("charge", "acme", "sms", UG, "b")
        self.assertEqual((b["id"], b["created_at"]), (a["id"] + 1, a["created_at"]))
        with open(clock, "w") as f:
            f.write(str(t0 + 60))
        c = d.ctl_json("charge", "acme", "sms", UG, "c")
        self.assertEqual(c["created_at"], "2026-11-15T12:01:00Z")
        since = d.ctl_json("history", "acme", "--since", "2026-11-15T12:00:00Z", "--type", "sms_charge")
        self.assertEqual([t["ref"] for t in since["transactions"]], ["c", "b", "a"])


class UsageReport(DaemonTest):
    def test_usage_by_country_route_channel_plan_and_wallet_adds_up(self):
        d = self.d
        clock = os.path.join(d.dir, "clock")
        day = calendar.timegm(time.strptime("2026-11-10T00:00:00Z", "%Y-%m-%dT%H:%M:%SZ"))

        def at(seconds):
            with open(clock, "w") as f:
                f.write(str(day + seconds))
        at(-60)  # the day before
        d.restart_plain(clock=clock)
        self.seed("100")
        self.seed("100000", wallet="ug")  # 100,000 USD: a second wallet, same currency
        d.ctl_json("wallet", "update", "ug", "--plan", "gold")
        d.ctl_json("rate", "set", "gold", "sms", "256", "0.02", "USD")
        d.ctl_json("rate", "set", "default", "sms", "254", "0.01", "USD", "--route", "KE1")
        d.ctl_json("rate", "set", "default", "whatsapp", "1", "0.05", "USD")
        d.ctl_json("charge", "acme", "sms", UG, "before")  # outside the day
        at(10)
        d.ctl_json("charge", "acme", "sms", UG, "a1", "--segments", "3")     # 0.0282, 256, ESMS_UG
        d.ctl_json("charge", "acme", "sms", "+254712345678", "a2")           # 0.01, 254, KE1
        d.ctl_json("charge", "acme", "whatsapp", "+15551234567", "a3")       # 0.05, 1
        d.ctl_json("charge", "ug", "sms", UG, "u1", "--segments", "2")       # 0.04, 256, gold
        d.ctl_json("refund", "acme", "--ref", "a1", "--amount", "0.0094", "--refund-ref", "r1")
        d.ctl_json("refund", "acme", "--ref", "before")  # in the day, of a charge before it: its group
        at(86400)
        d.ctl_json("charge", "acme", "sms", UG, "after")  # the next day: outside
        span = ("2026-11-10", "2026-11-11")

        def report(by):
            rows = d.ctl_json("report", "usage", *span, by)["rows"]
            return {r["key"]: (r["currency"], r["messages"], r["segments"], r["charged"], r["refunded"], r["net"])
                    for r in rows}
        self.assertEqual(report("country"), {
            "1": ("USD", 1, 1, "0.05", "0", "0.05"),
            "254": ("USD", 1, 1, "0.01", "0", "0.01"),
            "256": ("USD", 2, 5, "0.0682", "0.0188", "0.0494")})
        self.assertEqual(report("route")["KE1"][3], "0.01")
        self.assertEqual(report("channel")["whatsapp"][1:4], (1, 1, "0.05"))
        self.assertEqual(report("plan")["gold"], ("USD", 1, 2, "0.04", "0", "0.04"))
        wallets = report("wallet")
        self.assertEqual(sorted(wallets), ["acme", "ug"])
        # net per wallet is what its history says the day's charges and refunds came to
        for w, row in wallets.items():
            txns = d.ctl_json("history", w, "--since", span[0], "--until", span[1], "--type", "sms_charge",
                              "--type", "whatsapp_charge", "--type", "refund")["transactions"]
            self.assertAlmostEqual(float(row[5]), -sum(float(t["amount"]) for t in txns), places=6)
        e = d.ctl_json("report", "usage", *span, "planet", expect=1)
        self.assertEqual(e["field"], "group_by")
