#!/usr/bin/python3
"""make bench-scale: walletd with 1,000,000 wallets and 10,000,000 transactions.

Fills a fresh store through charge.batch, then measures: charge throughput
against the empty store, a history page of 50 from a wallet with 1,000,000
transactions (first and last page), precheck of 100,000 recipients over
100,000 rate prefixes, the store's size per transaction, and the daemon's
memory (not counting the mapped store) with 10,000 idle connections.
Set WALLETS / TXNS to scale it down.  Takes a few minutes."""
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(TOP, "contrib", "python"))
import msgpack  # noqa: E402
import walletd  # noqa: E402

WALLETS = int(os.environ.get("WALLETS", 1000000))
TXNS = int(os.environ.get("TXNS", 10000000))
WHALE = min(1000000, TXNS // 10)
CTL = os.path.join(TOP, "walletctl")


def bench(sock, *args):
    out = subprocess.run([CTL, "-s", sock, "bench", "--json"] + list(args), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def timed(fn, n):
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    lat.sort()
    return lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000


def rss_anon_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def start_walletd(d, sock):
    """Starts walletd on the store in d and waits until it answers."""
    proc = subprocess.Popen([os.path.join(TOP, "walletd"), "-f", "-d", os.path.join(d, "db"), "-s", sock],
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "log"), "a"))
    for _ in range(100):
        try:
            walletd.Client(sock).ping()
            break
        except walletd.WalletdError:
            time.sleep(0.1)
    return proc


def main():
    d = tempfile.mkdtemp(prefix="walletd-scale-")
    sock = os.path.join(d, "walletd.sock")
    proc = start_walletd(d, sock)
    try:
        empty = bench(sock, "-c", "64", "-n", "100000")
        c = walletd.Client(sock, timeout=600)
        c.rate_set(plan="default", channel="sms", prefix="1", price="0.001", currency="USD")
        t0 = time.time()
        step = 20000
        for start in range(0, WALLETS, step):
            ids = range(start, min(WALLETS, start + step))
            c.pipeline([("wallet.create", {"wallet": "w%07d" % i, "currency": "USD"}) for i in ids])
            c.pipeline([("credit", {"wallet": "w%07d" % i, "amount": "1000000", "reason": "fill"}) for i in ids])
        txns = WALLETS
        whale = "w0000000"
        seq = 0
        while txns < TXNS:
            batch = []
            for _ in range(10):  # ten charge.batch of 1000 in flight
                items = []
                for _ in range(1000):
                    w = whale if seq < WHALE else "w%07d" % (seq * 7919 % WALLETS)
                    items.append({"wallet": w, "channel": "sms", "to": "+15550000000", "ref": "f%09d" % seq})
                    seq += 1
                batch.append(("charge.batch", {"items": items}))
            for r in c.pipeline(batch):
                if isinstance(r, Exception):
                    raise r
            txns += 10000
        fill_s = time.time() - t0
        stats = c.stats()
        # The fill's commits of thousands of charges over random wallets left
        # LMDB a free list of ~10,000 pages; until the next commits have used
        # it, each of them rewrites the rest of it.  Measured apart.
        drain = bench(sock, "-c", "64", "-n", "100000")
        full = bench(sock, "-c", "64", "-n", "100000")
        count = c.history(wallet=whale, limit=1)["total"]
        last_page = (count - 1) // 50
        first = timed(lambda: c.history(wallet=whale, page=0, limit=50), 200)
        last = timed(lambda: c.history(wallet=whale, page=last_page, limit=50), 200)
        # 100,000 prefixes in a plan, and a campaign of 100,000 numbers over them
        rates = subprocess.run([sys.executable, os.path.join(TOP, "contrib", "bench", "rates_csv.py"), "scale", "100000"],
                               capture_output=True, text=True, check=True).stdout
        path = os.path.join(d, "rates.csv")
        with open(path, "w") as f:
            f.write(rates)
        subprocess.run([CTL, "-s", sock, "rate", "import", path], check=True, capture_output=True)
        c.wallet_update(wallet="w0000001", plan="scale")
        recipients = ["+1%010d" % (i * 7919 % 10 ** 10) for i in range(100000)]
        frame = msgpack.packb([0, 1, "precheck", [{"wallet": "w0000001", "channel": "sms", "recipients": recipients}]])
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(sock)

        def precheck():  # packed once: the time is walletd's, not the client's
            raw.sendall(frame)
            up = msgpack.Unpacker(raw=False)
            while True:
                up.feed(raw.recv(1 << 20))
                for answer in up:
                    assert answer[2] is None, answer[2]
                    return answer
        pre = timed(precheck, 10)
        raw.close()
        # the whale's statement of this month (every one of its transactions), of last month
        # (none: two binary searches), and one day's usage report over the whole log
        today = time.strftime("%Y-%m-%d", time.gmtime())
        tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
        s0 = time.time()
        month = c.call("statement", wallet=whale)
        month_s = time.time() - s0
        last_month_start = time.strftime("%Y-%m-01", time.gmtime(time.time() - 32 * 86400))
        s0 = time.time()
        c.call("statement", wallet=whale, **{"from": last_month_start}, until=time.strftime("%Y-%m-01", time.gmtime()))
        last_month_s = time.time() - s0
        s0 = time.time()
        usage = c.call("report.usage", **{"from": today}, until=tomorrow, group_by="country")
        usage_s = time.time() - s0
        used = c.stats()["store"]["map_used"]
        v0 = time.time()
        ver = c.verify()
        verify_s = time.time() - v0
        c.close()
        # memory with 10,000 idle connections, on a freshly started walletd: after the
        # fill, LMDB keeps the page buffers of its largest commit for reuse
        filled_rss = rss_anon_kib(proc.pid)
        proc.terminate()
        proc.wait()
        proc = start_walletd(d, sock)
        resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
        before = rss_anon_kib(proc.pid)
        socks = []
        for i in range(10000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            socks.append(s)
        for s in socks[::100]:
            walletd.Client(sock).ping()
        time.sleep(0.5)
        after = rss_anon_kib(proc.pid)
        for s in socks:
            s.close()

        print("walletd at scale: %d wallets, %d transactions (filled in %.0f s, %.0f txns/s)" % (
            WALLETS, txns, fill_s, (txns - WALLETS) / fill_s))
        print()
        print("| measure | value | target |")
        print("|---|---:|---|")
        print("| charge -c 64, empty store | %.0f charges/s | |" % empty["charges_per_s"])
        print("| charge -c 64, full store | %.0f charges/s (%.0f%% of empty) | within 20%% |" % (
            full["charges_per_s"], 100.0 * full["charges_per_s"] / empty["charges_per_s"]))
        print("| charge -c 64, full store, the first 100,000 after the fill | %.0f charges/s (%.0f%% of empty) | |" % (
            drain["charges_per_s"], 100.0 * drain["charges_per_s"] / empty["charges_per_s"]))
        print("| history page of 50, first page, wallet with %d txns | p50 %.3f ms, p99 %.3f ms | < 1 ms |" % ((count,) + first))
        print("| history page of 50, last page | p50 %.3f ms, p99 %.3f ms | < 1 ms |" % last)
        print("| precheck 100,000 recipients over 100,000 prefixes | p50 %.1f ms | < 100 ms |" % pre[0])
        print("| statement of this month, wallet with %d txns (all of them in it) | %.2f s | |" % (
            month["transactions_total"], month_s))
        print("| statement of last month of that wallet (none in it) | %.1f ms | as fast as for a small wallet |" % (
            last_month_s * 1000))
        print("| report.usage of one day over %d transactions, by country | %.2f s (%d rows) | |" % (
            txns, usage_s, len(usage["rows"])))
        print("| store size per transaction | %.0f bytes (%.2f GB in all) | |" % (used / txns, used / 1e9))
        print("| verify of the whole store | %.1f s, ok=%s | |" % (verify_s, ver["ok"]))
        print("| RSS without the map, 10,000 idle connections | %.1f MiB (%.1f MiB before) | < 32 MiB |" % (
            after / 1024, before / 1024))
        print("| RSS without the map after the fill | %.1f MiB (LMDB keeps its largest commit's page buffers) | |" % (
            filled_rss / 1024))
        print("| commits during the fill | %d, mean batch %.1f | |" % (stats["commits"], stats["mean_batch"]))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
