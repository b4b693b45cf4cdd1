"""A replicated group for the tests: three clustered nats-servers (JetStream,
file storage) on loopback ports, and walletd nodes on them."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import walletd
from harness import Daemon

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class NatsCluster:
    """Three nats-servers routed to each other; start, kill (SIGKILL), stop, restart each."""

    def __init__(self, size=3):
        self.dir = tempfile.mkdtemp(prefix="walletd-nats-")
        ports = free_ports(2 * size)
        self.ports, self.routes = ports[:size], ports[size:]
        self.procs = [None] * size

    def url(self, i=None):
        ids = range(len(self.ports)) if i is None else [i]
        return ",".join("nats://127.0.0.1:%d" % self.ports[j] for j in ids)

    def start(self, i=None):
        for j in range(len(self.ports)) if i is None else [i]:
            conf = os.path.join(self.dir, "n%d.conf" % j)
            with open(conf, "w") as f:
                f.write("server_name: n%d\nlisten: 127.0.0.1:%d\n" % (j, self.ports[j]))
                f.write("jetstream { store_dir: \"%s\" }\n" % os.path.join(self.dir, "js%d" % j))
                f.write("cluster { name: walletd-test\n listen: 127.0.0.1:%d\n routes: [%s] }\n" % (
                    self.routes[j], ", ".join("nats-route://127.0.0.1:%d" % p for k, p in enumerate(self.routes)
                                              if k != j)))
            self.procs[j] = subprocess.Popen([NATS_SERVER, "-c", conf], stdout=subprocess.DEVNULL,
                                             stderr=open(os.path.join(self.dir, "n%d.log" % j), "a"))
        for j in range(len(self.ports)) if i is None else [i]:
            deadline = time.time() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", self.ports[j]), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError("nats-server %d did not start" % j)
                    time.sleep(0.05)
        return self

    def kill(self, i, sig=signal.SIGKILL):
        if self.procs[i]:
            self.procs[i].send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.procs[i].wait()
                self.procs[i] = None

    def stop(self):
        for i in range(len(self.procs)):
            self.kill(i, signal.SIGTERM)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Group:
    """n walletd nodes, each on its own store, sharing the cluster's stream."""

    def __init__(self, nats, n=3, config=None, cluster="t"):
        self.nats = nats
        self.nodes = []
        for i in range(n):
            conf = {"nats_url": nats.url(), "cluster": cluster, "node": "w%d" % i, "lease_ttl": "4",
                    "failover_wait": "15", "alert_interval": "1"}
            conf.update(config or {})
            self.nodes.append(Daemon(conf))

    def start(self):
        for d in self.nodes:
            d.start()
        return self

    def status(self, i):
        with walletd.Client(self.nodes[i].sock, timeout=10) as c:
            return c.call("status")

    def leader(self, timeout=30):
        """The index of the node that says it leads, once one does."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for i, d in enumerate(self.nodes):
                if d.proc is None:
                    continue
                try:
                    if self.status(i)["role"] == "leader":
                        return i
                except walletd.WalletdError:
                    pass
            time.sleep(0.1)
        raise AssertionError("no leader within %ds: %s" % (timeout, [d.read_log()[-2000:] for d in self.nodes]))

    def caught_up(self, timeout=30):
        """Waits until every running node has applied the stream to its end; returns their positions."""
        deadline = time.time() + timeout
        while True:
            st = [self.status(i) for i, d in enumerate(self.nodes) if d.proc is not None]
            last = max(s["last"] for s in st)
            if all(s["applied"] == last for s in st):
                return last
            if time.time() > deadline:
                raise AssertionError("not caught up: %s" % st)
            time.sleep(0.1)

    def cleanup(self):
        for d in self.nodes:
            d.cleanup()
