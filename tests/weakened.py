"""The power-cut model judges the journal (make weakentest): walletd.c built weakened
on purpose, one way at a time, must each lose or break something under the power cuts
of test_ops.PowerCut, which the real build passes.  Each way is a text substitution
of walletd.c; a substitution that no longer applies fails this script.
    /usr/bin/python3 tests/weakened.py [CUTS]"""
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WEAKENED = {
    "no checkpoint pin (LMDB may reuse the checkpoint's pages)": [
        ("\tjournal.pin = c->pin;\n", "\tjournal.pin = NULL;\n\tmdb_txn_abort(c->pin);\n"),
        ("\tjournal.durable_segment = f->next.segment;\n\tjournal.durable_number = f->number;\n\treturn 0;",
         "\tjournal.durable_segment = f->next.segment;\n\tjournal.durable_number = f->number;\n"
         "\tmdb_txn_abort(journal.pin);\n\tjournal.pin = NULL;\n\treturn 0;"),
    ],
    "no restore (LMDB's newest meta page trusted)": [
        ("\tif (store_restore(f) != 0)\n\t\treturn -1;", "\t/* weakened: no restore */"),
        ("\tif ((uint64_t)mdb_txn_id(journal.pin) != f->txnid) {", "\tif (0) {"),
        ("\tif ((rc != 0 && rc != MDB_NOTFOUND) || stored != f->number) {", "\tif (0) {"),
    ],
    "the answer before the journal's sync": [
        ("\t\t\tif (fdatasync(journal.fds[seg % JOURNAL_FILES]) != 0) {", "\t\t\tif (0) {"),
    ],
}


def build(work, subs):
    with open(os.path.join(ROOT, "walletd.c")) as f:
        src = f.read()
    for old, new in subs:
        if src.count(old) != 1:
            sys.exit("weakened.py: %r is not in walletd.c once: update this script" % old[:60])
        src = src.replace(old, new)
    with open(os.path.join(work, "walletd.c"), "w") as f:
        f.write(src)
    shutil.copy(os.path.join(ROOT, "protocol.h"), work)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "msgpack", "lmdb", "libcurl", "jansson", "libcrypto",
                            "libnats"], capture_output=True, text=True, check=True).stdout.split()
    binary = os.path.join(work, "walletd")
    subprocess.run(["cc", "-std=c11", "-O2", "-o", binary, os.path.join(work, "walletd.c")] + flags + ["-lpthread"],
                   check=True)
    return binary


def main():
    cuts = sys.argv[1] if len(sys.argv) > 1 else "30"
    held = []
    for name, subs in WEAKENED.items():
        work = tempfile.mkdtemp(prefix="walletd-weakened-")
        try:
            binary = build(work, subs)
            env = dict(os.environ, WALLETD=binary, WALLETD_PLAIN=binary, POWER_CUTS=cuts)
            r = subprocess.run(["/usr/bin/python3", "-m", "unittest", "test_ops.PowerCut"], cwd=HERE, env=env,
                               capture_output=True, text=True, timeout=3600)
            out = r.stdout + r.stderr
            lines = [l for l in out.splitlines() if "Error" in l or "answered" in l or "twice" in l or
                     "verify" in l or "exited" in l][:6]
            print("%-58s %s" % (name, "lost or broke something" if r.returncode else "PASSED: the model missed it"))
            for line in lines:
                print("    " + line.strip()[:160])
            if r.returncode == 0:
                held.append(name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if held else 0)


if __name__ == "__main__":
    main()
