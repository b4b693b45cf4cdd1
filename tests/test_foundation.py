"""Foundation: wallets and ledger through walletctl, restart, the wire protocol."""
import subprocess
import time

from harness import DaemonTest, request, read_frames, msgpack, walletd, WALLETCTL


class WalletsAndLedger(DaemonTest):
    def test_walletctl_creates_credits_debits_and_lists(self):
        d = self.d
        w = d.ctl_json("wallet", "create", "acme", "USD", "--threshold", "5", "--alert-email", "ops@acme.example")
        self.assertEqual(w["balance"], "0")
        self.assertEqual(w["plan"], "default")
        self.assertEqual(w["alert_emails"], ["ops@acme.example"])
        self.assertEqual(d.ctl_json("wallet", "create", "acme", "USD", expect=1)["code"], "wallet_exists")
        t = d.ctl_json("credit", "acme", "100.50", "opening", "--actor", "alice")
        self.assertEqual((t["type"], t["amount"], t["balance_after"]), ("manual_credit", "100.5", "100.5"))
        self.assertEqual(t["actor"]["name"], "alice")
        t = d.ctl_json("debit", "acme", "0.5", "fee")
        self.assertEqual((t["type"], t["amount"], t["balance_after"]), ("manual_debit", "-0.5", "100"))
        err = d.ctl_json("debit", "acme", "100.000001", "too much", expect=4)
        self.assertEqual(err["code"], "insufficient_balance")
        self.assertEqual(d.ctl_json("balance", "acme"), {"balance": "100", "held": "0", "available": "100", "currency": "USD"})
        d.ctl_json("wallet", "create", "beta", "KES")
        lst = d.ctl_json("wallet", "list", "--limit", "1", "--page", "1")
        self.assertEqual(lst["total"], 2)
        self.assertEqual([x["wallet"] for x in lst["wallets"]], ["beta"])
        u = d.ctl_json("wallet", "update", "acme", "--threshold", "none", "--status", "frozen")
        self.assertIsNone(u["threshold"])
        self.assertEqual(u["status"], "frozen")
        self.assertEqual(d.ctl_json("debit", "acme", "1", "x", expect=1)["code"], "wallet_frozen")
        self.assertEqual(d.ctl_json("credit", "acme", "1", "x")["balance_after"], "101")

    def test_history_filters_and_pages(self):
        d = self.d
        d.ctl_json("wallet", "create", "acme", "USD")
        for i in range(30):
            d.ctl_json("credit" if i % 3 else "debit", "acme", "1" if i % 3 else "0.25", "n%d" % i) if i else \
                d.ctl_json("credit", "acme", "10", "first")
        h = d.ctl_json("history", "acme", "--limit", "5")
        self.assertEqual(h["total"], 30)
        self.assertEqual([t["id"] for t in h["transactions"]], [30, 29, 28, 27, 26])
        h = d.ctl_json("history", "acme", "--page", "5", "--limit", "5")
        self.assertEqual([t["id"] for t in h["transactions"]], [5, 4, 3, 2, 1])
        h = d.ctl_json("history", "acme", "--type", "manual_debit")
        self.assertEqual(h["total"], 9)
        self.assertTrue(all(t["type"] == "manual_debit" for t in h["transactions"]))
        h = d.ctl_json("history", "acme", "--before-id", "3")
        self.assertEqual([t["id"] for t in h["transactions"]], [2, 1])
        h = d.ctl_json("history", "acme", "--since", "2000-01-01T00:00:00Z", "--until", "2000-01-02T00:00:00Z")
        self.assertEqual(h["total"], 0)
        running = 0
        for t in reversed(d.ctl_json("history", "acme", "--limit", "1000")["transactions"]):
            running += float(t["amount"])
            self.assertAlmostEqual(float(t["balance_after"]), running, places=6)
            for k in ("id", "wallet", "type", "amount", "balance_after", "currency", "description", "created_at"):
                self.assertIn(k, t)
        self.assertEqual(d.ctl_json("history", "acme", "--limit", "1001", expect=1)["field"], "limit")

    def test_restart_loses_nothing(self):
        d = self.d
        d.ctl_json("wallet", "create", "acme", "USD")
        for i in range(20):
            d.ctl_json("credit", "acme", "%d.25" % i, "c%d" % i)
        before = (d.ctl_json("balance", "acme"), d.ctl_json("history", "acme", "--limit", "100"))
        self.assertEqual(d.stop(), 0)
        d.start()
        after = (d.ctl_json("balance", "acme"), d.ctl_json("history", "acme", "--limit", "100"))
        self.assertEqual(before, after)
        v = d.ctl_json("verify")
        self.assertTrue(v["ok"])
        self.assertEqual(v["transactions"], 20)
        d.kill()
        d.start()
        self.assertEqual(d.ctl_json("balance", "acme"), before[0])
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_walletctl_help_usage_and_exit_codes(self):
        d = self.d
        r = d.ctl("help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("charge", r.stdout)
        r = d.ctl("help", "charge")
        self.assertIn("idempotent", r.stdout)
        self.assertEqual(d.ctl("balance").returncode, 2)
        self.assertEqual(d.ctl("nosuch").returncode, 2)
        self.assertEqual(d.ctl("balance", "nobody").returncode, 1)
        r = subprocess.run([WALLETCTL, "-s", "/nonexistent/x.sock", "ping"], capture_output=True)
        self.assertEqual(r.returncode, 3)
        r = d.ctl("wallet", "create", "acme", "USD")
        self.assertIn("balance: 0.00", r.stdout)


class Protocol(DaemonTest):
    config = {"max_frame": "1M"}

    def test_pipelined_requests_answer_in_order(self):
        s = self.d.raw()
        s.sendall(b"".join(request(i, "ping") for i in range(200)) +
                  msgpack.packb([2, "nvim_subscribe", ["x"]]) + request(999, "ping"))
        frames = read_frames(s, 201)
        self.assertEqual([f[1] for f in frames], list(range(200)) + [999])
        self.assertTrue(all(f[0] == 1 and f[2] is None for f in frames))

    def test_wrong_frames_get_errors_and_keep_the_connection(self):
        s = self.d.raw()
        s.sendall(msgpack.packb(5) + request(1, "nosuch") + request(2, "balance", {"wallet": 5}) +
                  msgpack.packb([0, 3, "ping", 7]) + request(4, "credit", {"wallet": "x", "amount": 1.5, "reason": "r"}) +
                  msgpack.packb([0, 5, b"ping", []], use_bin_type=True) + request(6, "wallet.create", {"wallet": "a b", "currency": "USD"}))
        f = read_frames(s, 7)
        self.assertEqual(f[0][2]["code"], "malformed_request")
        self.assertEqual(f[1][2]["code"], "unknown_method")
        self.assertEqual((f[2][2]["code"], f[2][2]["field"]), ("invalid_argument", "wallet"))
        self.assertEqual((f[3][2]["code"], f[3][2]["field"]), ("invalid_argument", "params"))
        self.assertEqual((f[4][2]["code"], f[4][2]["field"]), ("invalid_argument", "amount"))
        self.assertEqual(f[5][3]["version"], walletd.Client(self.d.sock).ping()["version"])
        self.assertEqual(f[6][2]["field"], "wallet")

    def test_garbage_closes_only_that_connection(self):
        other = self.d.client()
        other.ping()
        s = self.d.raw()
        s.sendall(request(1, "ping") + b"\xc1\xc1\xc1garbage")
        f = read_frames(s, 3)
        self.assertEqual(len(f), 2)
        self.assertIsNone(f[0][2])
        self.assertEqual(f[1][2]["code"], "malformed_request")
        self.assertEqual(s.recv(10), b"")  # closed
        self.assertEqual(other.ping()["api"], 1)

    def test_frame_too_large_is_refused_with_its_msgid(self):
        s = self.d.raw()
        big = request(77, "wallet.create", {"wallet": "x", "currency": "USD", "plan": "p" * (2 << 20)})
        try:
            s.sendall(big)
        except (BrokenPipeError, ConnectionResetError):
            pass
        f = read_frames(s, 1)
        self.assertEqual(f[0][1], 77)
        self.assertEqual(f[0][2]["code"], "frame_too_large")
        self.assertEqual(self.d.client().ping()["api"], 1)

    def test_truncated_frame_then_close_changes_nothing(self):
        s = self.d.raw()
        s.sendall(request(1, "wallet.create", {"wallet": "half", "currency": "USD"})[:-3])
        s.close()
        time.sleep(0.2)
        with self.assertRaises(walletd.UnknownWallet):
            self.d.client().balance(wallet="half")

    def test_many_connections_at_once(self):
        socks = [self.d.raw() for _ in range(200)]
        for i, s in enumerate(socks):
            s.sendall(request(i, "ping"))
        for i, s in enumerate(socks):
            self.assertEqual(read_frames(s, 1)[0][1], i)
        for s in socks:
            s.close()
