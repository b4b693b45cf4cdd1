"""The Python and Node.js bindings against a real daemon."""
import decimal
import re
import unittest
import os
import subprocess

from harness import DaemonTest, ROOT, WALLETD, PY, walletd

D = decimal.Decimal


class PythonBinding(DaemonTest):
    def test_every_method_with_decimals(self):
        with self.d.client() as w:
            self.assertEqual(w.ping()["api"], 1)
            self.assertEqual(w.wallet_create(wallet="acme", currency="USD", threshold=D("5"))["threshold"], D(5))
            self.assertEqual(w.credit(wallet="acme", amount=D("1500.00"), reason="opening")["balance_after"], D(1500))
            self.assertEqual(w.debit(wallet="acme", amount="0.5", reason="fee")["amount"], D("-0.5"))
            w.rate_set(plan="default", channel="sms", prefix="256", price=D("35"), currency="UGX", route="ESMS_UG")
            self.assertEqual(w.rate_import(rows=[{"plan": "p", "channel": "sms", "prefix": "1", "route": "",
                                                  "price": "0.01", "currency": "USD"}], mode="upsert")["loaded"], 1)
            self.assertEqual(w.rate_list(plan="p")["total"], 1)
            w.rate_delete(plan="p", channel="sms", prefix="1")
            w.fx_set(base="USD", quote="UGX", rate="3723.40")
            self.assertEqual(len(w.fx_list()["rates"]), 1)
            self.assertEqual(w.rate_lookup(wallet="acme", channel="sms", to="+256712345678")["cost"], D("0.0094"))
            t = w.charge(wallet="acme", channel="sms", to="+256712345678", ref="m-1", text="hello")
            self.assertEqual(t["balance_after"], D("1499.4906"))
            res = w.charge_batch(items=[{"wallet": "acme", "channel": "sms", "to": "+256712345678", "ref": "b%d" % i}
                                        for i in range(3)])["results"]
            self.assertEqual(len(res), 3)
            p = w.precheck(wallet="acme", channel="sms", recipients=["+256712345678"], segments=2)
            self.assertEqual(p["required"], D("0.0188"))
            self.assertEqual(w.quote(wallet="acme", channel="sms", to="+256712345678", amount=D("1"))["messages"], 106)
            self.assertEqual(w.refund(wallet="acme", txn=t["id"])["amount"], D("0.0094"))
            top = w.topup_create(wallet="acme", amount=D("10"))
            self.assertFalse(w.topup_confirm(ref=top["ref"], amount="10", provider="flutterwave", provider_ref="1")["replayed"])
            self.assertEqual(w.topup_get(ref=top["ref"])["status"], "paid")
            self.assertEqual(len(w.topup_list(wallet="acme")["topups"]), 1)
            c = w.topup_create(wallet="acme", amount="1")
            self.assertEqual(w.topup_cancel(ref=c["ref"])["status"], "cancelled")
            self.assertEqual(w.history(wallet="acme", limit=2)["total"], 8)
            self.assertEqual(w.wallet_get(wallet="acme")["plan"], "default")
            self.assertEqual(w.wallet_update(wallet="acme", plan="gold")["plan"], "gold")
            self.assertEqual(w.wallet_list()["total"], 1)
            self.assertEqual([(n["type"], n["email_state"]) for n in w.notifications(wallet="acme")["notifications"]],
                             [("receipt", "no_recipient")])  # the top-up's; acme has no alert e-mails
            self.assertEqual(w.wallet_update(wallet="acme", plan=None)["plan"], "default")
            self.assertEqual(w.hold_create(wallet="acme", ref="py-hold", amount=D("2"))["remaining"], D(2))
            self.assertEqual(w.charge(wallet="acme", channel="sms", to="+256712345678", ref="py-h",
                                      hold="py-hold")["hold"], "py-hold")
            self.assertEqual(w.hold_get(wallet="acme", hold="py-hold")["remaining"], D("1.9906"))
            self.assertEqual(len(w.hold_list(wallet="acme")["holds"]), 1)
            self.assertEqual(w.hold_release(wallet="acme", hold="py-hold")["status"], "released")
            self.assertEqual(w.refund(wallet="acme", ref="py-h", amount="0.0047", refund_ref="py-h-1")["amount"],
                             D("0.0047"))
            self.assertEqual(w.refund_batch(items=[{"wallet": "acme", "ref": "py-h"}])["results"][0]["amount"],
                             D("0.0047"))
            self.assertEqual(w.delivery(wallet="acme", ref="py-h", status="delivered")["delivery"]["status"],
                             "delivered")
            self.assertTrue(w.delivery_batch(items=[{"wallet": "acme", "ref": "py-h", "status": "delivered"}])[
                "results"][0]["replayed"])
            with self.assertRaises(walletd.HoldClosed):
                w.charge(wallet="acme", channel="sms", to="+256712345678", ref="py-h2", hold="py-hold")
            w.wallet_update(wallet="acme", guard_range_max=1)
            w.charge(wallet="acme", channel="sms", to="+256700000001", ref="py-g1")
            with self.assertRaises(walletd.DestinationSuspended) as e:
                w.charge(wallet="acme", channel="sms", to="+256700000002", ref="py-g2")
            self.assertEqual((e.exception.details["prefix"], e.exception.details["reason"]), ("256700000", "range_max"))
            self.assertEqual(w.guard_list(wallet="acme")["suspensions"][0]["count"], 2)
            self.assertTrue(w.guard_lift(wallet="acme", prefix="256700000")["lifted"])
            w.wallet_update(wallet="acme", guard_range_max=None)
            self.assertTrue(w.verify()["ok"])
            self.assertGreater(w.stats()["commits"], 0)
            b = w.backup(os.path.join(self.d.dir, "copy.mdb"))
            self.assertGreater(b["bytes"], 0)
            with self.assertRaises(TypeError):
                w.credit(wallet="acme", amount=1.5, reason="floats are refused before they leave")

    def test_error_classes(self):
        self.seed("0")
        with self.d.client() as w:
            w.wallet_create(wallet="ug", currency="UGX")
            w.credit(wallet="ug", amount="10", reason="r")
            with self.assertRaises(walletd.InsufficientBalance) as e:
                w.charge(wallet="ug", channel="sms", to="+256712345678", ref="x")
            self.assertEqual((e.exception.required, e.exception.available, e.exception.currency),
                             (D(35), D(10), "UGX"))
            self.assertIsInstance(e.exception, walletd.WalletdError)
            with self.assertRaises(walletd.UnknownWallet):
                w.balance(wallet="ghost")
            with self.assertRaises(walletd.InvalidArgument) as e:
                w.history(wallet="ug", limit=5000)
            self.assertEqual(e.exception.field, "limit")
            with self.assertRaises(walletd.WalletExists):
                w.wallet_create(wallet="ug", currency="UGX")
            with self.assertRaises(walletd.UnknownMethod):
                w.call("no.such")
        with self.assertRaises(walletd.ConnectionLost):
            walletd.Client(os.path.join(self.d.dir, "nope.sock")).ping()

    def test_pipelining_1000_and_reconnect_after_restart(self):
        self.seed("100")
        w = self.d.client()
        res = w.pipeline([("charge", {"wallet": "acme", "channel": "sms", "to": "+256712345678", "ref": "p%d" % i})
                          for i in range(1000)])
        self.assertEqual(len({r["id"] for r in res}), 1000)
        self.assertEqual(w.balance(wallet="acme")["balance"], D("90.6"))
        self.d.kill()
        with self.assertRaises(walletd.ConnectionLost):
            w.ping()
        self.d.start()
        self.assertEqual(w.balance(wallet="acme")["balance"], D("90.6"))
        w.close()

    def test_send_service_example_runs(self):
        r = subprocess.run([PY, os.path.join(ROOT, "contrib", "examples", "send_service.py")],
                           env=dict(os.environ, WALLETD_SOCKET=self.d.sock), capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("refunded", r.stdout)
        self.assertTrue(self.d.ctl_json("verify")["ok"])


class NodeBinding(DaemonTest):
    def test_node_client_suite(self):
        r = subprocess.run(["node", "--test", "test/"], cwd=os.path.join(ROOT, "contrib", "node"),
                           env=dict(os.environ, WALLETD=WALLETD), capture_output=True, text=True, timeout=300)
        self.assertEqual(r.returncode, 0, r.stdout[-4000:] + r.stderr[-2000:])
        self.assertIn("# fail 0", r.stdout)


class PhpBinding(DaemonTest):
    def test_php_client_against_walletd(self):
        r = subprocess.run(["php", os.path.join(ROOT, "contrib", "php", "test", "client_test.php"), self.d.sock],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stdout, r"^ok: \d+ checks")
        self.assertTrue(self.d.ctl_json("verify")["ok"])


class AsANewUser(DaemonTest):
    def test_php_finds_no_socket_in_var_without_a_warning(self):
        work = self.d.dir  # a dashboard's directory: no ./var in it
        env = {k: v for k, v in os.environ.items() if k != "WALLETD_SOCKET"}
        code = "require %r; echo Walletd\\Client::defaultSocket();" % os.path.join(ROOT, "contrib", "php", "Walletd.php")
        r = subprocess.run(["php", "-d", "error_reporting=E_ALL", "-d", "display_errors=1", "-r", code], cwd=work,
                           env=env, capture_output=True, text=True)
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "/run/walletd/walletd.sock", ""))

    def test_walletctl_says_what_it_tried_and_what_was_meant(self):
        env = {k: v for k, v in os.environ.items() if k != "WALLETD_SOCKET"}
        ctl = os.environ.get("WALLETCTL", os.path.join(ROOT, "walletctl"))
        r = subprocess.run([ctl, "wallet", "creat", "acme", "USD"], capture_output=True, text=True, env=env)
        self.assertEqual(r.returncode, 2)
        self.assertIn("did you mean wallet create?", r.stderr)
        r = subprocess.run([ctl, "wallet"], capture_output=True, text=True, env=env)
        self.assertIn("wallet takes: create, get, update, list", r.stderr)
        for args, extra, says in (([], {}, "(the installed default: no -s, no $WALLETD_SOCKET, no ./var/walletd.sock"),
                                  (["-s", "/nonexistent.sock"], {}, "/nonexistent.sock (from -s)"),
                                  ([], {"WALLETD_SOCKET": "/gone.sock"}, "/gone.sock (from $WALLETD_SOCKET)")):
            r = subprocess.run([ctl] + args + ["ping"], capture_output=True, text=True, cwd=self.d.dir,
                               env=dict(env, **extra))
            self.assertEqual(r.returncode, 3)
            self.assertIn(says, r.stderr)


class EveryCode(unittest.TestCase):
    def test_every_error_code_has_its_class_in_each_client(self):
        with open(os.path.join(ROOT, "protocol.h")) as f:
            codes = re.findall(r'^X\(E_\w+, *\d+, "(\w+)"\)', f.read(), re.M)
        self.assertGreater(len(codes), 15)
        with open(os.path.join(ROOT, "contrib", "node", "index.js")) as f:
            node = f.read()
        with open(os.path.join(ROOT, "contrib", "php", "Walletd.php")) as f:
            php = f.read()
        for code in codes:
            name = "".join(p.capitalize() for p in code.split("_"))
            self.assertEqual(walletd.error_class(code).code, code)
            self.assertIn("export const %s = errorClass('%s');" % (name, code), node)
            self.assertIn("class %s extends WalletdError { const CODE = '%s'; }" % (name, code), php)

    def test_every_method_is_a_method_of_each_client(self):
        with open(os.path.join(ROOT, "protocol.h")) as f:
            wire = re.findall(r'^X\(M_\w+, \w+, "([a-z.]+)"', f.read(), re.M)
        self.assertGreater(len(wire), 40)
        with open(os.path.join(ROOT, "contrib", "node", "index.js")) as f:
            node = set(re.findall(r"\b\w+: '([a-z.]+)'", f.read()))
        with open(os.path.join(ROOT, "contrib", "php", "Walletd.php")) as f:
            php = set(re.findall(r"'\w+' => '([a-z.]+)'", f.read()))
        for name in wire:
            self.assertTrue(hasattr(walletd.Client, name.replace(".", "_")), "Python: %s" % name)
            if name != "backup":  # it passes the file as a descriptor: Python's alone (README)
                self.assertIn(name, node, "Node.js")
                self.assertIn(name, php, "PHP")
