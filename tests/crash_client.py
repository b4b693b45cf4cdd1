"""A send service for the crash test: charges continuously, reconnecting after
each crash, and logs every charge walletd answered as `ref txn` (fsynced).
A charge whose answer was lost is retried with the same ref (idempotent)."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "contrib", "python"))
import walletd  # noqa: E402

sock, log, prefix = sys.argv[1:4]
out = open(log, "a")
i = 0
while True:
    ref = "%s-%d" % (prefix, i)
    try:
        with walletd.Client(sock, timeout=5) as c:
            while True:
                t = c.charge(wallet="acme", channel="sms", to="+256712345678", ref=ref)
                out.write("%s %d\n" % (ref, t["id"]))
                out.flush()
                os.fsync(out.fileno())
                i += 1
                ref = "%s-%d" % (prefix, i)
    except walletd.ConnectionLost:
        time.sleep(0.02)
