"""Test harness: a real walletd on a temporary store and socket, driven
through walletctl, raw sockets and the Python binding."""
import calendar
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "contrib", "python"))

import msgpack  # noqa: E402
import walletd  # noqa: E402

WALLETD = os.environ.get("WALLETD", os.path.join(ROOT, "walletd"))
WALLETCTL = os.environ.get("WALLETCTL", os.path.join(ROOT, "walletctl"))
PY = "/usr/bin/python3"


class Daemon:
    """A walletd of our own: start, stop (SIGTERM), kill (SIGKILL), restart."""

    def __init__(self, config=None, directory=None):
        self.dir = directory or tempfile.mkdtemp(prefix="walletd-e2e-")
        os.chmod(self.dir, 0o711)
        self.sock = os.path.join(self.dir, "walletd.sock")
        self.store = os.path.join(self.dir, "db")
        self.conf = os.path.join(self.dir, "walletd.conf")
        self.log = os.path.join(self.dir, "walletd.log")
        self.config = {"store": self.store, "socket": self.sock, "log_level": "2"}
        self.config.update(config or {})
        self.proc = None
        self.wrap = []  # a command walletd runs under, as ["prlimit", "--nofile=40:40"]
        self.binary = WALLETD

    def write_config(self):
        with open(self.conf, "w") as f:
            for k, v in self.config.items():
                f.write("%s = %s\n" % (k, v))

    def start(self, wait=True):
        self.write_config()
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        self.proc = subprocess.Popen(self.wrap + [self.binary, "-f", "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "a"), env=env)
        if wait:
            deadline = time.time() + 20
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError("walletd exited with %s:\n%s" % (self.proc.returncode, self.read_log()))
                try:
                    with walletd.Client(self.sock, timeout=2) as c:
                        c.ping()
                    return self
                except walletd.WalletdError:
                    time.sleep(0.05)
            raise RuntimeError("walletd did not start:\n" + self.read_log())
        return self

    def stop(self):
        """SIGTERM; returns walletd's exit status (0 when clean, sanitizers included)."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def restart_with_clock(self, t):
        """Restarts as restart_plain does, walletd's clock (tests/faults.so) held at t, seconds or
        "2026-11-15T12:00:00Z", until set_clock moves it.  Returns the clock's file."""
        clock = os.path.join(self.dir, "clock")
        set_clock(clock, utc(t) if isinstance(t, str) else t)
        self.restart_plain(clock=clock)
        return clock

    def restart_plain(self, **faults):
        """Restarts as the plain build (LD_PRELOAD and prlimit --as do not mix with ASan),
        with tests/faults.so loaded and its WALLETD_FAULT_<NAME> set from faults, if any."""
        self.stop()
        self.binary = os.environ.get("WALLETD_PLAIN", os.path.join(ROOT, "walletd"))
        if faults:
            self.wrap = ["env", "LD_PRELOAD=" + os.path.join(HERE, "faults.so")] + [
                "WALLETD_FAULT_%s=%s" % (k.upper(), v) for k, v in faults.items()]
        return self.start()

    def restore_backup(self, backup):
        """The README's restore: walletd stopped, the store directory holding only ledger.key and the backup,
        as data.mdb."""
        os.makedirs(self.store, exist_ok=True)
        for name in os.listdir(self.store):
            if name != "ledger.key":
                os.remove(os.path.join(self.store, name))
        os.replace(backup, os.path.join(self.store, "data.mdb"))

    def read_log(self):
        try:
            with open(self.log) as f:
                return f.read()
        except OSError:
            return ""

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- clients ------------------------------------------------------------
    def ctl(self, *args, input=None, user=None):
        """Runs walletctl (as user, "name:group", when given); returns the CompletedProcess."""
        cmd = [WALLETCTL, "-s", self.sock] + [str(a) for a in args]
        if user:
            name, _, group = user.partition(":")
            cmd = ["setpriv", "--reuid=%s" % name, "--regid=%s" % (group or name), "--clear-groups"] + cmd
        return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)

    def ctl_json(self, *args, expect=0, **kw):
        r = self.ctl("--json", *args, **kw)
        if r.returncode != expect:
            raise AssertionError("walletctl %s exited %d, not %d:\n%s%s" % (
                " ".join(map(str, args)), r.returncode, expect, r.stdout, r.stderr))
        return json.loads(r.stdout) if r.stdout.strip() else None

    def client(self, **kw):
        return walletd.Client(self.sock, **kw)

    def raw(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.sock)
        return s


def request(msgid, method, params=None):
    return msgpack.packb([0, msgid, method, [params] if params is not None else []], use_bin_type=True)


def read_frames(sock, count, timeout=10):
    """Reads count msgpack objects (fewer if the peer closes)."""
    up = msgpack.Unpacker(raw=False, strict_map_key=False)
    out = []
    sock.settimeout(timeout)
    while len(out) < count:
        for msg in up:
            out.append(msg)
            if len(out) == count:
                return out
        try:
            data = sock.recv(1 << 16)
        except socket.timeout:
            break
        if not data:
            for msg in up:
                out.append(msg)
            break
        up.feed(data)
    return out


CHAIN_FIELDS = ("id", "wallet", "created_at", "type", "amount", "balance_after", "currency", "description")


def chain_breaks(transactions):
    """Recomputes each wallet's hash chain as the README says (SHA-256 of the previous
    hash, 32 zero bytes first, then each field as a netstring) from transactions as the
    answers or walletctl --json show them; returns the ids whose hash does not follow."""
    import hashlib
    prev, broken = {}, []
    for t in sorted(transactions, key=lambda t: int(t["id"])):
        data = prev.get(t["wallet"], bytes(32))
        for f in CHAIN_FIELDS:
            v = str(t[f]).encode()
            data += b"%d:%s," % (len(v), v)
        if hashlib.sha256(data).hexdigest() != t.get("hash"):
            broken.append(int(t["id"]))
        prev[t["wallet"]] = bytes.fromhex(t["hash"]) if t.get("hash") else b""
    return broken


def unhashed(history):
    """A history answer without its transactions' hashes (as a release before them answered)."""
    return dict(history, transactions=[{k: v for k, v in t.items() if k != "hash"} for t in history["transactions"]])


def build_release(commit, libs, work):
    """Builds walletd as it was at commit (from the git history) in directory work; returns its path."""
    src = os.path.join(work, "src-" + commit)
    os.makedirs(src, exist_ok=True)
    for name in ("walletd.c", "protocol.h"):
        r = subprocess.run(["git", "-C", ROOT, "show", "%s:%s" % (commit, name)], capture_output=True)
        if r.returncode != 0:
            raise AssertionError("this test needs the git history: %s" % r.stderr.decode())
        with open(os.path.join(src, name), "wb") as f:
            f.write(r.stdout)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs"] + libs, capture_output=True, text=True,
                           check=True).stdout.split()
    binary = os.path.join(work, "walletd-" + commit)
    subprocess.run(["cc", "-std=c11", "-O1", "-o", binary, os.path.join(src, "walletd.c")] + flags + ["-lpthread"],
                   check=True)
    return binary


def json_files(directory):
    """The JSON documents in directory's *.json files, in name order (what the sinks wrote)."""
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            out.append(json.load(f))
    return out


def utc(when):
    """Seconds since the epoch of "2026-11-15T12:00:00Z"."""
    return calendar.timegm(time.strptime(when, "%Y-%m-%dT%H:%M:%SZ"))


def set_clock(path, t):
    """Sets walletd's clock (tests/faults.so's WALLETD_FAULT_CLOCK file) to t, whole: walletd never
    reads a file half written (an empty one is the real clock)."""
    with open(path + ".tmp", "w") as f:
        f.write(str(int(t)))
    os.replace(path + ".tmp", path)


class DaemonTest(unittest.TestCase):
    """A fresh walletd per test."""
    config = {}

    def setUp(self):
        self.d = Daemon(dict(self.config))
        self.addCleanup(self.d.cleanup)  # also when a subclass's setUp fails after this (tearDown is not run then)
        self.d.start()

    def tearDown(self):
        running = self.d.proc is not None
        rc = self.d.stop()
        log = self.d.read_log()
        self.d.cleanup()
        if running:
            self.assertEqual(rc, 0, "walletd did not stop cleanly:\n" + log[-3000:])
        self.assertNotIn("runtime error", log)
        self.assertNotIn("AddressSanitizer", log)

    def pipelines(self, batches, timeout=60):
        """Sends each batch of requests down its own connection, all at once; returns every answer."""
        answers = []

        def one(frames):
            s = self.d.raw()
            try:
                s.sendall(b"".join(frames))
                answers.extend(read_frames(s, len(frames), timeout=timeout))
            finally:
                s.close()
        threads = [threading.Thread(target=one, args=(b,)) for b in batches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return answers

    def charge_sms(self, n, wallet="acme"):
        """Gives wallet n SMS charges, through charge.batch, each of which must succeed."""
        with self.d.client() as c:
            for start in range(0, n, 1000):
                items = [{"wallet": wallet, "channel": "sms", "to": "+256712345678", "ref": "m%d" % i}
                         for i in range(start, min(n, start + 1000))]
                self.assertTrue(all("error" not in x for x in c.call("charge.batch", items=items)["results"]))

    def seed(self, balance="1500", wallet="acme"):
        """A USD wallet, the seed's Uganda rate (35 UGX) and FX (USD UGX 3723.40)."""
        d = self.d
        d.ctl_json("wallet", "create", wallet, "USD")
        if balance != "0":
            d.ctl_json("credit", wallet, balance, "opening balance")
        d.ctl_json("rate", "set", "default", "sms", "256", "35", "UGX", "--route", "ESMS_UG")
        d.ctl_json("fx", "set", "USD", "UGX", "3723.40")
