"""Writes fuzz seeds into tests/fuzz-corpus: for every method of protocol.h's
table, a request with plausible params, then one more for each of its string
params with a NUL byte inside that param (named like libFuzzer's own, by SHA-1).
    /usr/bin/python3 tests/fuzz_seeds.py"""
import hashlib
import os
import re

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))
PLAUSIBLE = {"wallet": "acme", "currency": "USD", "plan": "default", "channel": "sms", "to": "+256712345678",
             "ref": "m1", "route": "ESMS_UG", "text": "hi", "description": "d", "reason": "r", "actor": "bob",
             "prefix": "256", "base": "USD", "quote": "UGX", "rate": "3723.40", "provider": "flutterwave",
             "provider_ref": "FLW-1", "status": "active", "mode": "upsert", "since": "2026-11-01",
             "until": "2026-12-01T00:00:00Z", "hold": "cmp-1", "refund_ref": "dlr-1"}
OTHER = {"a": "1.5", "n": "2", "i": 1, "I": 5, "b": True, "l": ["ops@example.com"], "f": ["+256712345678"]}


def main():
    with open(os.path.join(HERE, "..", "protocol.h")) as f:
        rows = re.findall(r'^X\(M_\w+, \w+, "([a-z.]+)", \w+, [^"]*"([^"]*)"', f.read(), re.M)
    out = os.path.join(HERE, "fuzz-corpus")
    written = 0
    for method, spec in rows:
        params, strings = {}, []
        for p in spec.split():
            name, _, kind = p.lstrip("?!").partition(":")
            if kind in ("F", "c"):
                continue
            if kind:
                params[name] = OTHER[kind]
            else:
                params[name] = PLAUSIBLE.get(name, "x")
                strings.append(name)
        variants = [params] + [dict(params, **{s: params[s][:1] + "\x00" + params[s][1:]}) for s in strings]
        for i, v in enumerate(variants):
            frame = msgpack.packb([0, i, method, [v]], use_bin_type=True)
            with open(os.path.join(out, hashlib.sha1(frame).hexdigest()), "wb") as f:
                f.write(frame)
            written += 1
    print("%d seeds" % written)


if __name__ == "__main__":
    main()
