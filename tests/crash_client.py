"""A send service for the crash tests: charges continuously, reconnecting after
each crash, and logs every transaction walletd answered (fsynced) as `C ref txn`
for a charge, `R ref txn` for a refund of the charge with that ref, `P ref txn`
for a partial refund of it, and `H hold` for a hold.  Step i is a charge, every
third one a charge.batch of 4, every other one drawing on the client's hold
(made at step 0, and every tenth step a short one that expires in a second);
every fifth step pipelines, behind its charge, a refund of the previous step's
first charge, and every seventh a partial refund (half) of the first charge of
the step before that, with its refund_ref.  A step whose answers were lost is
run again with the same refs: charges, holds and partial refunds replay, and a
refund already made answers already_refunded with the first refund, which is
logged."""
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
    mine, lines, calls = refs(i), [], []
    hold = {"hold": "hold-" + prefix} if i % 2 else {}
    if i == 0:
        calls.append(("hold.create", {"wallet": "acme", "ref": "hold-" + prefix, "amount": "100"}))
    if i % 10 == 9:
        calls.append(("hold.create", {"wallet": "acme", "ref": "short-%s-%d" % (prefix, i), "amount": "0.01",
                                      "expires_in": 1}))
    calls.append(("charge.batch", {"items": [dict(MSG, ref=r, **hold) for r in mine]}) if len(mine) > 1
                 else ("charge", dict(MSG, ref=mine[0], **hold)))
    if i % 5 == 4:
        calls.append(("refund", {"wallet": "acme", "ref": refs(i - 1)[0]}))
    if i % 7 == 6:
        calls.append(("refund", {"wallet": "acme", "ref": refs(i - 2)[0], "amount": "0.0047",
                                 "refund_ref": "p-" + refs(i - 2)[0]}))
    answers = c.pipeline(calls)
    for (method, params), a in zip(calls, answers):
        if isinstance(a, walletd.AlreadyRefunded) and "amount" not in params:
            a = a.refund  # the full refund was made before the answer was lost
        elif isinstance(a, walletd.AlreadyRefunded):
            continue  # fully refunded before: no part is left
        elif isinstance(a, Exception):
            raise a  # the test sees this client exit early
        if method == "hold.create":
            lines.append("H %s" % params["ref"])
        elif method == "charge.batch":
            lines += ["C %s %d" % (r, t["id"]) for r, t in zip(mine, a["results"])]
        elif method == "charge":
            lines.append("C %s %d" % (mine[0], a["id"]))
        else:
            lines.append("%s %s %d" % ("P" if "amount" in params else "R", params["ref"], a["id"]))
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
    except (walletd.ConnectionLost, walletd.Unavailable):
        time.sleep(0.02)  # walletd restarting, or (replicated) no leader yet: the same step again
