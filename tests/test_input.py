"""Bad input gets a clear error and changes nothing: params a method does not
take, NUL bytes and bad UTF-8 in strings, national numbers, and the cases
README's method notes settle (plan and status nil, WhatsApp segments, integer FX rates,
times with trailing bytes, a numeric socket_group)."""
import decimal
import grp
import os
import re
import stat

from harness import ROOT, Daemon, DaemonTest, request, read_frames

D = decimal.Decimal
UG = "+256712345678"


def methods():
    """Every method of protocol.h's table."""
    with open(os.path.join(ROOT, "protocol.h")) as f:
        return re.findall(r'^X\(M_\w+, \w+, "([a-z.]+)"', f.read(), re.M)


class UnknownParams(DaemonTest):
    def call(self, *frames):
        s = self.d.raw()
        s.sendall(b"".join(request(i, m, p) for i, (m, p) in enumerate(frames)))
        return read_frames(s, len(frames))

    def test_every_method_refuses_a_param_it_does_not_take(self):
        names = methods()
        self.assertGreater(len(names), 25)
        got = self.call(*[(m, {"misspelt_param": "x"}) for m in names])
        for m, f in zip(names, got):
            self.assertEqual((f[2]["code"], f[2]["field"]), ("invalid_argument", "misspelt_param"), m)
            self.assertIn("takes no param 'misspelt_param'", f[2]["message"], m)

    def test_a_misspelt_param_charges_nothing(self):
        d = self.d
        self.seed("1")
        c = {"wallet": "acme", "channel": "sms", "to": UG}
        got = self.call(("charge", dict(c, ref="t1", txt="a long text " * 40)),
                        ("charge", dict(c, ref="t2", segmnets=5)),
                        ("charge.batch", {"items": [dict(c, ref="t3", txt="x" * 400), dict(c, ref="t4")]}),
                        ("wallet.create", {"wallet": "w2", "currency": "USD", "thresold": "5"}),
                        ("rate.import", {"rows": [{"plan": "p", "channel": "sms", "prefix": "1", "price": "1",
                                                   "currency": "USD", "rout": "R"}], "mode": "upsert"}),
                        ("ping", {b"bin-key": 1}))
        self.assertEqual(got[0][2]["field"], "txt")
        self.assertEqual(got[1][2]["field"], "segmnets")
        items = got[2][3]["results"]
        self.assertEqual(items[0]["error"]["field"], "txt")
        self.assertEqual(items[1]["segments"], 1)  # the batch's other item is charged
        self.assertEqual(got[3][2]["field"], "thresold")
        self.assertEqual((got[4][3]["loaded"], got[4][3]["rejected"][0]["error"]["field"]), (0, "rout"))
        self.assertEqual(got[5][2]["field"], "params")  # a key that is not a string
        self.assertEqual(d.ctl_json("history", "acme")["total"], 2)  # the credit and t4
        self.assertEqual(d.ctl_json("wallet", "list")["total"], 1)
        self.assertEqual(d.ctl_json("rate", "list", "--plan", "p")["total"], 0)
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_backup_takes_no_map_key_for_its_file(self):
        f = self.call(("backup", {"file": "/tmp/x"}))[0]
        self.assertEqual((f[2]["code"], f[2]["field"]), ("invalid_argument", "file"))


class Strings(DaemonTest):
    def test_nul_bytes_and_bad_utf8_are_refused_in_every_string_field(self):
        d = self.d
        self.seed("1")
        c = {"wallet": "acme", "channel": "sms", "to": UG, "ref": "ok"}
        cases = [
            ("wallet.create", {"wallet": "a\x00b", "currency": "USD"}, "wallet"),
            ("wallet.create", {"wallet": "acme\x00", "currency": "USD"}, "wallet"),
            ("wallet.create", {"wallet": "nb", "currency": "US\x00"}, "currency"),
            ("wallet.create", {"wallet": "nb", "currency": "USD", "plan": "p\x00"}, "plan"),
            ("charge", dict(c, ref="r\x00x"), "ref"),
            ("charge", dict(c, to="+256\x0012345678"), "to"),
            ("charge", dict(c, text="hi\x00there"), "text"),
            ("charge", dict(c, route="R\x00"), "route"),
            ("charge", dict(c, description="d\x00"), "description"),
            ("credit", {"wallet": "acme", "amount": "1", "reason": "r\x00"}, "reason"),
            ("credit", {"wallet": "acme", "amount": "1\x00", "reason": "r"}, "amount"),
            ("credit", {"wallet": "acme", "amount": "1", "reason": "r", "actor": "bob\x00"}, "actor"),
            ("history", {"wallet": "acme", "since": "2026-11-01T00:00:00Z\x00junk"}, "since"),
            ("history", {"wallet": "acme", "until": "2026-11-01\x00"}, "until"),
            ("fx.set", {"base": "USD", "quote": "KES", "rate": "129\x00.5"}, "rate"),
            ("topup.get", {"ref": "tp_\x00"}, "ref"),
        ]
        s = d.raw()
        s.sendall(b"".join(request(i, m, p) for i, (m, p, _) in enumerate(cases)) +
                  request(99, "charge", dict(c, ref="bad-utf8", text="XY")).replace(b"\xa2XY", b"\xa2\xc3\x28"))
        got = read_frames(s, len(cases) + 1)
        for (m, p, field), f in zip(cases, got):
            self.assertIsNotNone(f[2], (m, p))
            self.assertEqual((f[2]["code"], f[2]["field"]), ("invalid_argument", field), (m, p))
        self.assertEqual((got[-1][2]["code"], got[-1][2]["field"]), ("invalid_argument", "text"))
        self.assertEqual(d.ctl_json("wallet", "list")["total"], 1)
        self.assertEqual(d.ctl_json("history", "acme")["total"], 1)
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "1")


class NationalNumbers(DaemonTest):
    def test_a_national_number_is_invalid_not_unpriced(self):
        d = self.d
        self.seed("1")
        e = d.ctl_json("charge", "acme", "--channel", "sms", "--to", "0712345678", "--text", "hi", "--ref", "n-1",
                       expect=1)
        self.assertEqual((e["code"], e["field"]), ("invalid_argument", "to"))
        self.assertIn("+256712345678", e["message"])
        e = d.ctl_json("charge", "acme", "sms", "+0712345678", "n-2", expect=1)
        self.assertEqual(e["field"], "to")
        with d.client() as cl:
            p = cl.precheck(wallet="acme", channel="sms", recipients=["0712345678", UG, "+0712"])
        self.assertEqual(sorted(p["invalid"]), ["+0712", "0712345678"])
        self.assertEqual(p["unpriced"], [])
        self.assertEqual(sum(b["count"] for b in p["breakdown"]), 1)
        e = d.ctl_json("rate", "set", "default", "sms", "0256", "1", "USD", expect=1)
        self.assertEqual(e["field"], "prefix")
        self.assertEqual(d.ctl_json("history", "acme")["total"], 1)


class SpecSettles(DaemonTest):
    def test_wallet_update_plan_nil_is_default_and_status_nil_is_refused(self):
        d = self.d
        d.ctl_json("wallet", "create", "acme", "USD", "--plan", "gold", "--threshold", "5")
        with d.client() as cl:
            self.assertEqual(cl.wallet_update(wallet="acme", threshold="7")["plan"], "gold")  # absent: kept
            w = cl.wallet_update(wallet="acme", plan=None)
            self.assertEqual((w["plan"], w["threshold"]), ("default", D("7")))
            s = d.raw()
            s.sendall(request(1, "wallet.update", {"wallet": "acme", "status": None, "plan": "silver"}))
            err = read_frames(s, 1)[0][2]
        self.assertEqual((err["code"], err["field"]), ("invalid_argument", "status"))
        w = d.ctl_json("wallet", "get", "acme")
        self.assertEqual((w["plan"], w["status"]), ("default", "active"))  # nothing of the refused update

    def test_whatsapp_segments_other_than_one_are_refused(self):
        d = self.d
        self.seed("1")
        d.ctl_json("rate", "set", "default", "whatsapp", "256", "0.02", "USD")
        e = d.ctl_json("charge", "acme", "whatsapp", UG, "w1", "--segments", "3", expect=1)
        self.assertEqual((e["code"], e["field"]), ("invalid_argument", "segments"))
        t = d.ctl_json("charge", "acme", "whatsapp", UG, "w2", "--segments", "1")
        self.assertEqual((t["segments"], t["amount"]), (1, "-0.02"))
        s = d.raw()
        s.sendall(request(1, "precheck", {"wallet": "acme", "channel": "whatsapp", "recipients": [UG], "segments": 2}))
        self.assertEqual(read_frames(s, 1)[0][2]["field"], "segments")
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "0.98")

    def test_fx_rate_may_be_a_msgpack_integer(self):
        d = self.d
        s = d.raw()
        s.sendall(request(1, "fx.set", {"base": "USD", "quote": "UGX", "rate": 3723}) +
                  request(2, "fx.set", {"base": "USD", "quote": "KES", "rate": 0}) +
                  request(3, "fx.set", {"base": "USD", "quote": "TZS", "rate": -5}) +
                  request(4, "fx.set", {"base": "USD", "quote": "RWF", "rate": 1.5}))
        got = read_frames(s, 4)
        self.assertEqual(got[0][3]["rate"], "3723")
        self.assertEqual([g[2]["field"] for g in got[1:]], ["rate", "rate", "rate"])
        self.assertEqual([r["quote"] for r in d.ctl_json("fx", "list")["rates"]], ["UGX"])

    def test_times_with_trailing_bytes_are_refused(self):
        d = self.d
        self.seed("1")
        for bad in ("2026-11-01T00:00:00Zjunk", "2026-11-01T00:00:00Z ", "2026-11-01x", "2026-11-01T00:00:00+03:00:00"):
            e = d.ctl_json("history", "acme", "--since", bad, expect=1)
            self.assertEqual((e["code"], e["field"]), ("invalid_argument", "since"), bad)
        self.assertEqual(d.ctl_json("history", "acme", "--since", "2026-11-01T00:00:00+03:00")["total"], 1)


class SocketGroup(DaemonTest):
    def setUp(self):
        pass  # each test starts its own

    def tearDown(self):
        pass

    def test_socket_group_takes_a_numeric_gid(self):
        gid = 4242
        while True:
            try:
                grp.getgrgid(gid)
                gid += 1
            except KeyError:
                break  # a gid with no entry in /etc/group: only a number can name it
        d = Daemon({"socket_group": str(gid)})
        try:
            d.start()
            st = os.stat(d.sock)
            self.assertEqual((st.st_gid, stat.S_IMODE(st.st_mode)), (gid, 0o660))
            self.assertNotIn("cannot give", d.read_log())
            self.assertEqual(d.stop(), 0)
        finally:
            d.cleanup()
