"""A replicated group for the tests: three clustered nats-servers (JetStream,
file storage) on loopback ports, and walletd nodes on them."""
import os
import shutil
import signal
import socket
import subprocess
import struct
import tempfile
import threading
import time

import walletd
from harness import Daemon

NATS_SERVER = os.environ.get("NATS_SERVER") or shutil.which("nats-server") or "/usr/sbin/nats-server"


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Link:
    """A TCP proxy on a loopback port: a network link that can be cut and healed.
    cut("reset") closes every connection with a reset and refuses new ones; cut("drop")
    forwards nothing more, as a link that loses every packet (TCP keeps what was sent
    and delivers it after the heal); heal() lets bytes and new connections through."""

    def __init__(self, target, port=0):
        self.target = target
        self.mode = None
        self.flowing = threading.Event()
        self.flowing.set()
        self.socks = []
        self.lock = threading.Lock()
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen(128)
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _reset(s):
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        except OSError:
            pass

    def _accept(self):
        while True:
            try:
                a, _ = self.server.accept()
            except OSError:
                return
            if self.mode == "reset":
                self._reset(a)
                continue
            try:
                b = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                self._reset(a)
                continue
            with self.lock:
                self.socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src, dst):
        while True:
            try:
                data = src.recv(65536)
                self.flowing.wait()
                if not data or self.mode == "reset":
                    break
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            if self.mode == "reset":
                self._reset(s)
            else:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self, mode):
        self.mode = mode
        if mode == "drop":
            self.flowing.clear()
            return
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            self._reset(s)
        self.flowing.set()

    def heal(self):
        self.mode = None
        self.flowing.set()

    def close(self):
        self.cut("reset")
        self.server.close()


class NatsCluster:
    """Three nats-servers routed to each other; start, kill (SIGKILL), stop, restart each.
    With links, every route between two servers runs through its own Link (links[j][k]:
    from server j to server k), and so does each walletd's one connection to its server
    (clients[i], with url(i, through_link=True)): partition() cuts them."""

    def __init__(self, size=3, links=False):
        self.dir = tempfile.mkdtemp(prefix="walletd-nats-")
        ports = free_ports(2 * size + (size * size if links else 0))  # distinct: the links' too
        self.ports, self.routes, spare = ports[:size], ports[size:2 * size], ports[2 * size:]
        self.procs = [None] * size
        self.links = self.clients = None
        if links:
            self.links = [[Link(self.routes[k], spare.pop()) if k != j else None for k in range(size)]
                          for j in range(size)]
            self.clients = [Link(p, spare.pop()) for p in self.ports]

    def url(self, i=None, through_link=False):
        ids = range(len(self.ports)) if i is None else [i]
        ports = [self.clients[j].port for j in ids] if through_link else [self.ports[j] for j in ids]
        return ",".join("nats://127.0.0.1:%d" % p for p in ports)

    def route_links(self, j):
        """Every Link that carries a route of server j."""
        return [self.links[a][b] for a in range(len(self.ports)) for b in range(len(self.ports))
                if a != b and j in (a, b)]

    def start(self, i=None):
        for j in range(len(self.ports)) if i is None else [i]:
            conf = os.path.join(self.dir, "n%d.conf" % j)
            with open(conf, "w") as f:
                f.write("server_name: n%d\nlisten: 127.0.0.1:%d\n" % (j, self.ports[j]))
                f.write("jetstream { store_dir: \"%s\" }\n" % os.path.join(self.dir, "js%d" % j))
                routes = [self.links[j][k].port if self.links else p for k, p in enumerate(self.routes) if k != j]
                f.write("cluster { name: walletd-test\n listen: 127.0.0.1:%d\n routes: [%s]\n" % (
                    self.routes[j], ", ".join("nats-route://127.0.0.1:%d" % p for p in routes)))
                if self.links:  # nothing gossiped that would go round the links
                    f.write(" no_advertise: true\n advertise: \"127.0.0.1:1\"\n")
                f.write("}\n")
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
        for link in [x for row in self.links or [] for x in row if x] + (self.clients or []):
            link.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Group:
    """n walletd nodes, each on its own store, sharing the cluster's stream."""

    def __init__(self, nats, n=3, config=None, cluster="t"):
        self.nats = nats
        self.nodes = []
        for i in range(n):
            conf = {"nats_url": nats.url(i, through_link=True) if nats.clients else nats.url(), "cluster": cluster, "node": "w%d" % i,
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


class NatsClient:
    """Just enough of the NATS protocol for the tests to read and rebuild a stream
    through the JetStream API (Debian has no Python NATS client)."""

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self._line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"headers":true,"no_responders":true}\r\nSUB _INBOX.t 1\r\n')
        self.n = 0

    def _line(self):
        while b"\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _bytes(self, n):
        while len(self.buf) < n + 2:
            self.buf += self.sock.recv(65536)
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def request(self, subject, payload=b"", headers=None):
        """Sends payload (with headers) to subject; returns the reply's body (bytes)."""
        if isinstance(payload, str):
            payload = payload.encode()
        hdr = b""
        if headers:
            hdr = b"NATS/1.0\r\n" + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode())
                                               for k, v in headers.items()) + b"\r\n"
        self.sock.sendall(b"HPUB %s _INBOX.t %d %d\r\n%s%s\r\n" % (subject.encode(), len(hdr), len(hdr) + len(payload),
                                                                  hdr, payload))
        while True:
            line = self._line().split()
            if line[0] == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif line[0] == b"MSG":
                return self._bytes(int(line[-1]))
            elif line[0] == b"HMSG":
                data = self._bytes(int(line[-1]))
                return data[int(line[-2]):]
            elif line[0] == b"-ERR":
                raise RuntimeError(line)

    def api(self, what, body=None):
        import json
        return json.loads(self.request("$JS.API." + what, json.dumps(body) if body is not None else b""))

    def close(self):
        self.sock.close()


class StaleAnswers:
    """Answers the stream-info requests of stream, alongside its real leader, with the state
    it had when made (as a server cut off from the others does right after a heal), until
    stop(): a client that trusts the first answer sees a stream that lost its newest records."""

    def __init__(self, port, stream):
        c = NatsClient(port)
        self.info = c.request("$JS.API.STREAM.INFO." + stream)
        c.close()
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b'CONNECT {"verbose":false,"headers":true}\r\nSUB $JS.API.STREAM.INFO.%s 1\r\nPING\r\n'
                          % stream.encode())
        self.answered = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _serve(self):
        buf = b""
        try:
            while True:
                while b"\r\n" not in buf:
                    data = self.sock.recv(65536)
                    if not data:
                        return
                    buf += data
                line, buf = buf.split(b"\r\n", 1)
                words = line.split()
                if words[0] == b"PING":
                    self.sock.sendall(b"PONG\r\n")
                elif words[0] == b"PONG":
                    self.ready.set()
                elif words[0] in (b"MSG", b"HMSG"):
                    n = int(words[-1])
                    while len(buf) < n + 2:
                        buf += self.sock.recv(65536)
                    buf = buf[n + 2:]
                    reply = words[3] if len(words) == (5 if words[0] == b"MSG" else 6) else None
                    if reply:
                        self.sock.sendall(b"PUB %s %d\r\n%s\r\n" % (reply, len(self.info), self.info))
                        self.answered += 1
        except OSError:
            return

    def stop(self):
        self.sock.close()
        self.thread.join()


def rebuild_stream(port, stream, keep):
    """Deletes stream and makes it again with only its first keep messages:
    a stream that lost its last records."""
    import base64
    c = NatsClient(port)
    try:
        info = c.api("STREAM.INFO." + stream)
        msgs = [c.api("STREAM.MSG.GET." + stream, {"seq": s})["message"] for s in range(1, keep + 1)]
        assert c.api("STREAM.DELETE." + stream).get("success"), "cannot delete the stream"
        cfg = info["config"]
        created = c.api("STREAM.CREATE." + stream, cfg)
        assert "error" not in created, created
        for m in msgs:
            ack = __import__("json").loads(c.request(m["subject"], base64.b64decode(m.get("data", ""))))
            assert "error" not in ack, ack
        return info["state"]["last_seq"]
    finally:
        c.close()


def stream_leader(nats, stream):
    """The index of the nats-server leading stream."""
    for i, p in enumerate(nats.procs):
        if p is None:
            continue
        c = NatsClient(nats.ports[i])
        try:
            leader = c.api("STREAM.INFO." + stream).get("cluster", {}).get("leader")
        finally:
            c.close()
        if leader:
            return int(leader[1:])
    raise AssertionError("no stream leader")
