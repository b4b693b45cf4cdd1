"""Group commit and charge.batch: each request atomic on its own inside one commit."""
import decimal
import os
import random
import threading
import time

from harness import DaemonTest, request, read_frames

D = decimal.Decimal


class GroupCommit(DaemonTest):
    def test_two_charges_in_one_batch_exceeding_the_balance(self):
        d = self.d
        self.seed("0")
        d.ctl_json("credit", "acme", "0.01", "room for one")
        s = d.raw()
        c = {"wallet": "acme", "channel": "sms", "to": "+256712345678"}
        s.sendall(request(1, "charge", dict(c, ref="a")) + request(2, "charge", dict(c, ref="b")) +
                  request(3, "balance", {"wallet": "acme"}))
        f = read_frames(s, 3)
        self.assertIsNone(f[0][2])
        self.assertEqual(f[1][2]["code"], "insufficient_balance")
        self.assertEqual(f[2][3]["balance"], "0.0006")  # the read after the writes sees them
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_a_failing_request_leaves_no_trace_while_neighbours_commit(self):
        d = self.d
        self.seed("1")
        s = d.raw()
        c = {"wallet": "acme", "channel": "sms", "to": "+256712345678"}
        s.sendall(request(1, "charge", dict(c, ref="x1")) +
                  request(2, "charge", dict(c, ref="x2", to="+19995550000")) +   # no_rate
                  request(3, "refund", {"wallet": "acme", "ref": "nope"}) +       # unknown_txn
                  request(4, "charge", dict(c, ref="x1", segments=3)) +           # idempotency_conflict
                  request(5, "charge", dict(c, ref="x3")))
        f = read_frames(s, 5)
        self.assertEqual([x[2] and x[2]["code"] for x in f],
                         [None, "no_rate", "unknown_txn", "idempotency_conflict", None])
        h = d.ctl_json("history", "acme")
        self.assertEqual([t.get("ref") for t in h["transactions"]], ["x3", "x1", None])
        self.assertEqual(f[4][3]["id"], f[0][3]["id"] + 1)  # no id was burnt by the failures
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_a_deep_pipeline_of_writes_failing_and_not_commits_each_alone(self):
        # 4,096 writes of every kind in one connection's pipeline, a third of them
        # failing after their lookups: each failure leaves nothing, each success is
        # stored once, and the batch costs what its requests do (it took seconds
        # under ASan while each write ran in a nested transaction of its own)
        d = self.d
        self.seed("0")
        frames, expect = [], []
        for i in range(4096):
            k = i % 6
            if k == 0:
                frames.append(request(i, "credit", {"wallet": "acme", "amount": "2", "reason": "r"}))
                expect.append(None)
            elif k == 1:
                frames.append(request(i, "debit", {"wallet": "acme", "amount": "1000000", "reason": "r"}))
                expect.append("insufficient_balance")
            elif k == 2:
                frames.append(request(i, "wallet.create", {"wallet": "w%d" % (i // 6), "currency": "USD"}))
                expect.append(None)
            elif k == 3:
                frames.append(request(i, "wallet.create", {"wallet": "acme", "currency": "USD"}))
                expect.append("wallet_exists")
            elif k == 4:
                frames.append(request(i, "debit", {"wallet": "acme", "amount": "1", "reason": "r"}))
                expect.append(None)
            else:
                frames.append(request(i, "topup.confirm", {"ref": "tp_none", "amount": "1",
                                                            "provider": "x", "provider_ref": "y"}))
                expect.append("unknown_topup")
        s = d.raw()
        s.sendall(b"".join(frames))
        got = read_frames(s, len(frames), timeout=60)
        self.assertEqual([m[1] for m in got], list(range(len(frames))))
        self.assertEqual([m[2] and m[2]["code"] for m in got], expect)
        credits, debits, creates = (len(range(k, 4096, 6)) for k in (0, 4, 2))
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], str(credits * 2 - debits))
        self.assertEqual(d.ctl_json("history", "acme")["total"], credits + debits)
        self.assertEqual(d.ctl_json("wallet", "list", "--limit", "1000")["total"], 1 + creates)
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_charge_batch_mixes_results_in_order(self):
        d = self.d
        self.seed("0")
        d.ctl_json("credit", "acme", "0.02", "room for two")
        c = {"wallet": "acme", "channel": "sms", "to": "+256712345678"}
        items = [dict(c, ref="b1"), dict(c, ref="b2", to="bad"), dict(c, ref="b3"), dict(c, ref="b1"),
                 dict(c, ref="b4"), dict(c, ref="b5", wallet="ghost"), "not a map"]
        with d.client() as cl:
            res = cl.charge_batch(items=items)["results"]
        self.assertEqual(len(res), 7)
        self.assertEqual(res[0]["ref"], "b1")
        self.assertEqual(res[1]["error"]["field"], "to")
        self.assertEqual(res[2]["balance_after"], D("0.0012"))
        self.assertTrue(res[3]["replayed"])
        self.assertEqual(res[4]["error"]["code"], "insufficient_balance")
        self.assertEqual(res[5]["error"]["code"], "unknown_wallet")
        self.assertEqual(res[6]["error"]["code"], "invalid_argument")
        self.assertEqual(d.ctl_json("balance", "acme")["balance"], "0.0012")
        with d.client() as cl:
            with self.assertRaises(Exception) as e:
                cl.charge_batch(items=[dict(c, ref="z%d" % i) for i in range(1001)])
            self.assertEqual(e.exception.code, "invalid_argument")

    def test_each_threshold_crossing_in_one_commit_notifies_once(self):
        # cross, re-arm by a credit, cross again, stay below: two notifications, each
        # naming its own charge, though all of it may share one commit
        d = self.d
        self.seed("0.02")
        d.ctl_json("wallet", "update", "acme", "--threshold", "0.015", "--alert-emails", "ops@example.com")
        s = d.raw()
        c = {"wallet": "acme", "channel": "sms", "to": "+256712345678"}
        s.sendall(request(1, "charge", dict(c, ref="a")) +
                  request(2, "credit", {"wallet": "acme", "amount": "0.01", "reason": "top-up"}) +
                  request(3, "charge", dict(c, ref="b")) + request(4, "charge", dict(c, ref="c")) +
                  request(5, "notifications", {"wallet": "acme"}))
        f = read_frames(s, 5)
        self.assertEqual([x[2] for x in f], [None] * 5)
        self.assertEqual([x[3]["balance_after"] for x in f[:4]], ["0.0106", "0.0206", "0.0112", "0.0018"])
        notes = f[4][3]["notifications"]
        self.assertEqual(sorted(n["txn"] for n in notes), [f[0][3]["id"], f[2][3]["id"]])
        self.assertEqual(sorted(n["balance"] for n in notes), ["0.0106", "0.0112"])

    def test_pipelined_writes_share_commits(self):
        d = self.d
        self.seed("100")
        with d.client() as cl:
            before = cl.stats()["commits"]
            res = cl.pipeline([("charge", {"wallet": "acme", "channel": "sms", "to": "+256712345678",
                                           "ref": "p%d" % i}) for i in range(500)])
            self.assertTrue(all(not isinstance(r, Exception) for r in res))
            self.assertEqual([r["balance_after"] for r in res][-1], D("100") - D("0.0094") * 500)
            stats = cl.stats()
        self.assertLess(stats["commits"] - before, 500)
        self.assertGreater(stats["max_batch"], 1)


class WriterShare(DaemonTest):
    config = {"batch_max": "1"}  # one request a commit

    def test_a_connection_pipelining_does_not_hold_up_the_others(self):
        # a connection has two commits' worth (2 x batch_max) with the writer at a time;
        # the rest waits in its own queue. One pipelining 1,000 batches of 1,000 items
        # used to hold another client's charge 1.3 s; now ~20 ms
        d = self.d
        d.restart_plain(sync_ms=10)
        self.seed("1000")
        d.ctl_json("wallet", "create", "other", "USD")
        d.ctl_json("credit", "other", "10", "x")
        c = {"channel": "sms", "to": "+256712345678"}
        hog = d.raw()
        n = 200
        hog.sendall(b"".join(request(i, "charge", dict(c, wallet="acme", ref="h%d" % i)) for i in range(n)))
        time.sleep(0.2)  # read and decoded by now; commits take 10 ms each
        other = d.raw()
        other.sendall(request(1, "charge", dict(c, wallet="other", ref="o")))
        mine = read_frames(other, 1, timeout=60)[0][3]["id"]
        ids = [a[3]["id"] for a in read_frames(hog, n, timeout=60)]
        after = sum(i > mine for i in ids)
        self.assertGreater(after, n // 2, (after, n))  # it used to wait for all of them
        self.assertTrue(d.ctl_json("verify")["ok"])


class Bench(DaemonTest):
    def test_walletctl_bench_self_check_and_verify(self):
        d = self.d
        r = d.ctl("bench", "-n", "2000", "-c", "8", "--wallets", "5")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("self-check: balances match the answered charges", r.stdout)
        self.assertIn("charges/s", r.stdout)
        out = d.ctl_json("bench", "-n", "200", "-c", "2", "--batch", "10", "--wallets", "3")
        self.assertTrue(out["self_check"])
        self.assertEqual(out["errors"], {})
        # the run's writer figures: each commit a batch of requests, its durable commit part of its time
        self.assertGreaterEqual(out["mean_batch"], 1)
        self.assertGreater(out["mean_commit_us"], 0)
        self.assertLessEqual(out["mean_commit_us"], out["mean_batch_us"])
        self.assertTrue(d.ctl_json("verify")["ok"])
        # bench wallets live in their own namespace, and a run leaves no money behind:
        # its wallets are debited to zero and frozen, its rate deleted
        wallets = d.ctl_json("wallet", "list")["wallets"]
        self.assertEqual(len(wallets), 8)
        for w in wallets:
            self.assertTrue(w["wallet"].startswith("bench-"), w)
            self.assertEqual((w["balance"], w["status"]), ("0", "frozen"), w)
        self.assertEqual(d.ctl_json("rate", "list")["rates"], [])

class WrittenAhead(DaemonTest):
    def written_ahead(self):
        """The file commits write into, and the bytes they have written of it."""
        return os.path.join(self.d.store, "journal.0"), self.d.ctl_json("stats")["journal"]["journal_bytes"]

    def test_store_file_is_written_ahead_and_survives_a_kill(self):
        d = self.d
        out = d.ctl_json("bench", "-n", "3000", "-c", "8", "--wallets", "5", "--random-refs")
        self.assertTrue(out["self_check"])
        path, used = self.written_ahead()
        deadline = time.time() + 10
        while os.stat(path).st_size < used + (8 << 20) and time.time() < deadline:
            time.sleep(0.05)
        # zeros kept past the last commit's bytes, so a commit never makes the file longer
        self.assertGreaterEqual(os.stat(path).st_size, used + (8 << 20))
        self.seed("1")
        c = {"wallet": "acme", "channel": "sms", "to": "+256712345678"}
        with d.client() as cl:
            first = [cl.charge(**dict(c, ref=r)) for r in ("m-0002", "zz-9", "m-0001", "a-7")]
        d.kill()
        d.start()
        self.assertTrue(d.ctl_json("verify")["ok"])
        with d.client() as cl:
            again = [cl.charge(**dict(c, ref=r)) for r in ("m-0002", "zz-9", "m-0001", "a-7")]
        self.assertEqual([t["id"] for t in again], [t["id"] for t in first])
        self.assertTrue(all(t["replayed"] for t in again))


class MixedTraffic(DaemonTest):
    def test_random_mixed_traffic_matches_the_store_answer_for_answer(self):
        # Six clients pipeline a random mix of writes that collide on purpose (shared
        # refs, refunds racing each other, freezes, debits past the balance), so group
        # commits mix successes and failures. Every transaction an answer calls new is
        # in the store exactly once, the store holds nothing no one was told of, and
        # each connection's new ids rise in its request order.
        d = self.d
        wallets = ["w%d" % i for i in range(4)]
        for w in wallets:
            self.seed("0.3", wallet=w)
        refs = ["r%d" % i for i in range(150)]

        def charge(rng):
            return {"wallet": rng.choice(wallets), "channel": "sms", "to": "+256712345678",
                    "ref": rng.choice(refs), "segments": rng.choice([1, 1, 1, 2])}

        def random_request(rng):
            op = rng.random()
            if op < 0.45:
                return "charge", charge(rng)
            if op < 0.6:
                return "charge.batch", {"items": [charge(rng) for _ in range(rng.randint(1, 12))]}
            if op < 0.7:
                return "refund", {"wallet": rng.choice(wallets), "ref": rng.choice(refs)}
            if op < 0.8:
                return "credit", {"wallet": rng.choice(wallets), "amount": "0.0%d" % rng.randint(1, 9),
                                  "reason": "top"}
            if op < 0.9:
                return "debit", {"wallet": rng.choice(wallets), "amount": "0.0%d" % rng.randint(1, 9),
                                 "reason": "fee"}
            if op < 0.95:
                return "wallet.update", {"wallet": rng.choice(wallets[1:]),
                                         "status": rng.choice(["active", "active", "frozen"])}
            return "balance", {"wallet": rng.choice(wallets)}

        expected = {"insufficient_balance", "idempotency_conflict", "already_refunded", "unknown_txn",
                    "wallet_frozen"}
        new, seen, failures = {}, [], []

        def client(seed):
            rng = random.Random(seed)
            s = d.raw()
            msgid, mine = 0, []
            try:
                for _ in range(40):
                    sent = [random_request(rng) for _ in range(rng.randint(1, 20))]
                    s.sendall(b"".join(request(msgid + i, m, p) for i, (m, p) in enumerate(sent)))
                    answers = read_frames(s, len(sent), timeout=60)
                    if len(answers) != len(sent):
                        failures.append("client %d: %d answers to %d requests" % (seed, len(answers), len(sent)))
                        return
                    for i, ((method, _), a) in enumerate(zip(sent, answers)):
                        if a[1] != msgid + i:
                            failures.append("client %d: answer %d out of order" % (seed, a[1]))
                        err, res = a[2], a[3]
                        items = res["results"] if method == "charge.batch" and err is None else [
                            {"error": err} if err else res]
                        for it in items:
                            if "error" in it:
                                if it["error"]["code"] not in expected:
                                    failures.append("%s: %r" % (method, it["error"]))
                            elif "id" in it:
                                seen.append(it)
                                if not it.get("replayed"):
                                    mine.append(it["id"])
                    msgid += len(sent)
            finally:
                s.close()
            if mine != sorted(mine):
                failures.append("client %d: new ids out of request order" % seed)
            for t in mine:
                if t in new:
                    failures.append("transaction %d answered as new twice" % t)
                new[t] = seed

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(failures, [])
        stored = {}
        for w in wallets:
            page = d.ctl_json("history", w, "--limit", "1000")
            self.assertLess(len(page["transactions"]), 1000)
            for t in page["transactions"]:
                stored[t["id"]] = t
        answered = {t["id"]: t for t in seen}
        opening = {i for i, t in stored.items() if t.get("description") == "opening balance"}
        self.assertEqual(len(opening), 4)
        self.assertEqual(set(stored) - opening, set(new))  # nothing lost, nothing untold
        for i, t in answered.items():  # replays name the stored transaction, as stored
            for k in ("wallet", "type", "amount", "balance_after", "ref"):
                self.assertEqual(str(t.get(k)), str(stored[i].get(k)), (i, k))
        kinds = {stored[i]["type"] for i in new}
        self.assertEqual(kinds, {"sms_charge", "refund", "manual_credit", "manual_debit"})
        self.assertTrue(any(t.get("replayed") for t in seen))
        refunded = [t["refund_of"] for t in stored.values() if t["type"] == "refund"]
        self.assertEqual(len(refunded), len(set(refunded)))  # each charge refunded once at most
        self.assertTrue(d.ctl_json("verify")["ok"])


class LmdbWrittenAhead(WrittenAhead):
    """The same with durability = lmdb: LMDB's own file is written ahead."""
    config = {"durability": "lmdb"}

    def written_ahead(self):
        return os.path.join(self.d.store, "data.mdb"), self.d.ctl_json("stats")["store"]["map_used"]

