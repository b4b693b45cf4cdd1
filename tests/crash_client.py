"""A send service for the crash tests: charges continuously, reconnecting after
each crash, and logs every transaction walletd answered (fsynced) as `C ref txn`
for a charge and `R ref txn` for a refund of the charge with that ref.  Step i
is a charge, every third one a charge.batch of 4; every fifth step pipelines,
behind its charge, a refund of the previous step's first charge.  A step whose
answers were lost is run again with the same refs: charges replay, and a refund
already made answers already_refunded with the first refund, which is logged."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "contrib", "python"))
import walletd  # noqa: E402

sock, log, prefix = sys.argv[1:4]
out = open(log, "a")
MSG = {"wallet": "acme", "channel": "sms", "to": "+256712345678"}


def refs(i):
    return ["%s-%d-%d" % (prefix, i, k) for k in range(4)] if i % 3 == 2 else ["%s-%d" % (prefix, i)]


def step(c, i):
    """Runs step i; returns its log lines."""
    mine = refs(i)
    calls = [("charge.batch", {"items": [dict(MSG, ref=r) for r in mine]}) if len(mine) > 1
             else ("charge", dict(MSG, ref=mine[0]))]
    if i % 5 == 4:
        calls.append(("refund", {"wallet": "acme", "ref": refs(i - 1)[0]}))
    answers = c.pipeline(calls)
    for a in answers:
        if isinstance(a, Exception) and not isinstance(a, walletd.AlreadyRefunded):
            raise a  # the test sees this client exit early
    charged = answers[0]["results"] if len(mine) > 1 else [answers[0]]
    lines = ["C %s %d" % (r, t["id"]) for r, t in zip(mine, charged)]
    if len(answers) > 1:
        refund = answers[1]
        if isinstance(refund, walletd.AlreadyRefunded):
            refund = refund.refund
        lines.append("R %s %d" % (refs(i - 1)[0], refund["id"]))
    return lines


i = 0
while True:
    try:
        with walletd.Client(sock, timeout=5) as c:
            while True:
                out.write("".join(line + "\n" for line in step(c, i)))
                out.flush()
                os.fsync(out.fileno())
                i += 1
    except walletd.ConnectionLost:
        time.sleep(0.02)
