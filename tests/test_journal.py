"""The journal and checkpoints (README: Durability): a killed walletd applies its
journal again at start, checkpoints reuse the journal's files, durability = lmdb
applies and removes the journal, a backup copied over a journaled store is refused."""
import glob
import os
import shutil
import threading
import time

from harness import DaemonTest

UG = "+256712345678"


def journal_files(d):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(d.store, "journal.*")))


class Journal(DaemonTest):
    config = {"checkpoint_interval": "600000", "checkpoint_bytes": "1G"}  # no checkpoint but at start and stop

    def refs(self):
        with self.d.client() as c:
            return {t["ref"] for t in c.history(wallet="acme", type="sms_charge", limit=1000)["transactions"]}

    def test_a_killed_walletd_applies_its_journal_again_at_start(self):
        d = self.d
        self.seed("100")
        self.charge_sms(300)
        j = d.ctl_json("stats")["journal"]
        self.assertEqual((j["durability"], j["checkpoints"], j["replayed_at_start"]), ("journal", 1, 0))
        self.assertGreater(j["journal_bytes"], 300 * 100)
        d.kill()
        d.start()
        j = d.ctl_json("stats")["journal"]
        self.assertGreaterEqual(j["replayed_at_start"], 1)  # the seeding and the charges, since the checkpoint at start
        self.assertIn("records after the checkpoint applied again", d.read_log())
        self.assertEqual(len(self.refs()), 300)
        self.assertTrue(d.ctl_json("verify")["ok"])
        d.restart()  # a clean stop checkpoints last: nothing to apply again
        self.assertEqual(d.ctl_json("stats")["journal"]["replayed_at_start"], 0)
        self.assertEqual(len(self.refs()), 300)

    def test_durability_lmdb_applies_the_journal_and_removes_it(self):
        d = self.d
        self.seed("100")
        self.charge_sms(200)
        self.assertEqual(journal_files(d), ["journal.0", "journal.1", "journal.2", "journal.3"])
        d.kill()
        d.config["durability"] = "lmdb"
        d.start()
        self.assertIn("the journal is applied and removed", d.read_log())
        self.assertEqual(journal_files(d), [])
        self.assertFalse(os.path.exists(os.path.join(d.store, "checkpoint")))
        self.assertEqual(d.ctl_json("stats")["journal"]["checkpoint_age_ms"], None)
        self.assertEqual(len(self.refs()), 200)
        d.ctl_json("charge", "acme", "sms", UG, "under-lmdb")
        d.kill()  # LMDB's own syncs: nothing to apply again
        d.config["durability"] = "journal"
        d.start()
        self.assertEqual(len(self.refs()), 201)
        self.assertTrue(d.ctl_json("verify")["ok"])

    def test_a_backup_copied_over_a_journaled_store_is_refused(self):
        d = self.d
        self.seed("100")
        backup = os.path.join(d.dir, "backup.mdb")
        d.ctl_json("backup", backup)
        key = d.ctl_json("ping")["ledger_key"]
        self.charge_sms(100)
        d.stop()
        shutil.copy(backup, os.path.join(d.store, "data.mdb"))  # the old way: over the store
        with self.assertRaises(RuntimeError):
            d.start()
        self.assertIn("to restore a backup, start walletd on a directory holding only the backup, as data.mdb (and ledger.key)", d.read_log())
        d.restore_backup(backup)  # the README's way
        d.start()
        self.assertEqual((len(self.refs()), d.ctl_json("balance", "acme")["balance"]), (0, "100"))
        self.assertEqual(d.ctl_json("ping")["ledger_key"], key)  # statements still signed by the published key
        self.assertTrue(d.ctl_json("verify")["ok"])


class Checkpoints(DaemonTest):
    config = {"checkpoint_interval": "100", "checkpoint_bytes": "1M"}  # segments of 512 KiB

    def test_checkpoints_reuse_the_journal_files_and_a_kill_loses_nothing(self):
        d = self.d
        self.seed("1000")
        self.charge_sms(30000)  # ~6 MB of records: three laps of the four files of 512 KiB
        j = d.ctl_json("stats")["journal"]
        self.assertGreater(j["journal_bytes"], 5 << 20)
        self.assertGreaterEqual(j["checkpoints"], 3)
        self.assertLess(j["checkpoint_age_ms"], 5000)
        for name in journal_files(d):  # reused, not grown: a segment, an entry past it, the zeros ahead
            self.assertLess(os.path.getsize(os.path.join(d.store, name)), (512 << 10) + (1 << 20), name)
        d.kill()
        d.start()
        with d.client() as c:
            self.assertEqual(c.history(wallet="acme", type="sms_charge", limit=1)["total"], 30000)
        self.assertTrue(d.ctl_json("verify")["ok"])


class Pipeline(DaemonTest):
    def test_no_answer_reveals_a_write_before_its_record_is_synced(self):
        # the writer commits LMDB before the syncer syncs the journal (the next batch runs
        # meanwhile): a read of what it wrote must wait for the sync, as the write's answer does
        d = self.d
        self.seed("10")
        d.restart_plain(sync_ms=400)  # every fdatasync 0.4 s longer
        done = {}

        def charge():
            with d.client() as c:
                c.charge(wallet="acme", channel="sms", to=UG, ref="slow")
                done["charge"] = time.time()

        t = threading.Thread(target=charge)
        start = time.time()
        t.start()
        time.sleep(0.15)  # the charge is committed in LMDB by now, its sync under way
        with d.client() as c:
            balance = c.balance(wallet="acme")["balance"]
            read_at = time.time()
        t.join()
        if str(balance) == "10":  # the read came before the charge was committed: nothing to hold
            self.assertLess(read_at, done["charge"])
        else:
            self.assertGreaterEqual(read_at - start, 0.35, "a read showed a write not yet durable")
            self.assertGreaterEqual(read_at, done["charge"] - 0.05)
        self.assertEqual(str(d.ctl_json("balance", "acme")["balance"]), "9.9906")

