"""make bench's replicated rows: the same charge on one node, then on a group of
three walletd nodes on three clustered nats-servers (JetStream file storage, R3),
all on this machine, in one run; then the failover time (the leader's walletd
SIGKILLed -> the first write answered through another node) with the
default lease_ttl.  Prints a table; --json prints the rows as JSON instead."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("WALLETD", os.path.join(ROOT, "walletd"))

from harness import Daemon, WALLETCTL  # noqa: E402
from cluster import Group, NatsCluster  # noqa: E402

RUNS = [("-c 64", ["-c", "64", "-n", "60000"]), ("-c 64 -P 16", ["-c", "64", "-P", "16", "-n", "150000"])]


def bench(sock, args):
    out = subprocess.run([WALLETCTL, "-s", sock, "bench", "--json"] + args, capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout)


def row(label, r):
    lat = r["latency_ms"]
    return {"label": label, "charges_per_s": r["charges_per_s"], "p50": lat["p50"], "p99": lat["p99"],
            "p999": lat["p999"], "errors": sum(r["errors"].values()), "self_check": r["self_check"]}


def main():
    rows = []
    single = Daemon({"log_level": "1"}).start()
    try:
        for label, args in RUNS:
            rows.append(row("single node, " + label, bench(single.sock, args)))
    finally:
        single.cleanup()
    nats = NatsCluster().start()
    group = Group(nats, config={"log_level": "1"})  # the default lease_ttl
    try:
        group.start()
        leader = group.leader()
        follower = (leader + 1) % 3
        for label, args in RUNS:
            rows.append(row("3 nodes, via the leader, " + label, bench(group.nodes[leader].sock, args)))
        rows.append(row("3 nodes, via a follower, -c 64", bench(group.nodes[follower].sock, RUNS[0][1])))
        other = group.nodes[follower]
        other.ctl_json("wallet", "create", "failover", "USD")
        group.nodes[leader].kill()
        t0 = time.time()
        while other.ctl("credit", "failover", "1", "after failover").returncode != 0:
            time.sleep(0.02)
        failover = time.time() - t0
    finally:
        group.cleanup()
        nats.cleanup()
    if "--json" in sys.argv:
        print(json.dumps({"rows": rows, "failover_s": failover}))
        return
    print("| workload | charges/s | vs one node | p50 ms | p99 ms | p99.9 ms | errors | self-check |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    base = {label: r["charges_per_s"] for label, r in ((x["label"].split(", ")[-1], x) for x in rows[:2])}
    for r in rows:
        ratio = r["charges_per_s"] / base[r["label"].split(", ")[-1]]
        print("| %s | %.0f | %.0f%% | %.3f | %.3f | %.3f | %s | %s |" % (
            r["label"], r["charges_per_s"], 100 * ratio, r["p50"], r["p99"], r["p999"], r["errors"] or "0",
            "ok" if r["self_check"] else "FAILED"))
    print("\nfailover, the leader's walletd SIGKILLed -> first write answered through another node: %.1f s "
          "(the default lease_ttl)" % failover)


if __name__ == "__main__":
    main()
