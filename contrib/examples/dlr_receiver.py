#!/usr/bin/python3
"""Delivery reports from Kannel and Jasmin into walletd, batched.

    dlr_receiver.py [--listen 127.0.0.1:8083] [--socket PATH]

The send service charges each message with walletd (its ref: the message
id) and asks the gateway for a delivery report at a URL of this receiver
that names the wallet and the ref:

    Kannel (sendsms dlr-mask=19, the final reports and SMSC rejects):
      dlr-url=http://127.0.0.1:8083/kannel?wallet=acme&ref=m-1&type=%d&answer=%A
    Jasmin (HTTP API dlr=yes, dlr-level=3, dlr-method=POST; its message id goes unused):
      dlr-url=http://127.0.0.1:8083/jasmin?wallet=acme&ref=m-1

A final report becomes a `delivery` item; the reports that arrive together
go to walletd as one `delivery.batch` (up to 1,000, one commit), and each
request is answered once its report is recorded: 200 "recorded", or
"already recorded" for a report sent again; 200 "not final" for an
intermediate one (Kannel's SMSC acknowledgements, Jasmin's level 1); 200
"unknown charge" for a ref walletd never charged (nothing to retry); 400 for
a request that is not a report; 503 while walletd does not answer, so that
a gateway that retries does.  Kannel's status comes from the SMSC's answer
(`stat:DELIVRD`, `UNDELIV`, `REJECTD`, `EXPIRED`) when it has one, else
from %d (1 delivered, 2 failed, 16 rejected); Jasmin's from message_status.
Needs only Debian's python3 and python3-msgpack; run it as a user of
walletd's client role, on loopback, where the gateway can reach it.  Jasmin sends a report again until it is
answered "ACK/Jasmin", which it is once recorded, or when there is nothing
to record.
"""
import argparse
import os
import queue
import re
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import walletd  # noqa: E402

BATCH = 1000       # walletd's charge_batch_max, the most items of a batch
WAIT = 0.02        # seconds the batcher waits for more reports once it has one
SMSC_STAT = {"DELIVRD": "delivered", "UNDELIV": "failed", "REJECTD": "rejected", "EXPIRED": "expired",
             "DELETED": "failed", "UNKNOWN": "failed"}
KANNEL_TYPE = {"1": "delivered", "2": "failed", "16": "rejected"}  # 4 and 8: queued, at the SMSC


def kannel(query, form):
    """The report of a Kannel dlr-url call, None when it is not final."""
    stat = re.search(r"\bstat:(\w+)", query.get("answer", ""))
    status = SMSC_STAT.get(stat.group(1).upper()) if stat else KANNEL_TYPE.get(query.get("type", ""))
    err = re.search(r"\berr:(\w+)", query.get("answer", ""))
    return status, "err:%s" % err.group(1) if err and err.group(1) != "000" else None


def jasmin(query, form):
    """The report of a Jasmin DLR POST: the terminal one (with donedate), or an SMSC's refusal."""
    status = form.get("message_status", "").upper()
    if "donedate" not in form:  # the SMS-C level report: ESME_ROK is only "taken"; another status, refused
        return (None, None) if status == "ESME_ROK" else ("rejected", status or None)
    err = form.get("err", "0").lstrip("0")
    return SMSC_STAT.get(status, "failed"), "err:%s" % err if err else None


GATEWAYS = {"/kannel": kannel, "/jasmin": jasmin}


class Batcher:
    """Sends the reports that arrive together as one delivery.batch; each waits for its own result."""

    def __init__(self, socket_path):
        self.socket_path = socket_path
        self.queue = queue.Queue()
        threading.Thread(target=self.run, daemon=True).start()

    def record(self, item):
        """Returns walletd's result for item (a map, or {error: ...}), or raises ConnectionLost."""
        done = threading.Event()
        slot = {"item": item, "done": done}
        self.queue.put(slot)
        done.wait()
        if "lost" in slot:
            raise slot["lost"]
        return slot["result"]

    def run(self):
        client = walletd.Client(self.socket_path, timeout=30)
        while True:
            slots = [self.queue.get()]
            try:
                while len(slots) < BATCH:
                    slots.append(self.queue.get(timeout=WAIT))
            except queue.Empty:
                pass
            try:
                results = client.call("delivery.batch", items=[s["item"] for s in slots])["results"]
                for s, r in zip(slots, results):
                    s["result"] = r
            except walletd.WalletdError as e:  # walletd down or refusing the batch: each request says so
                client.close()
                for s in slots:
                    s["lost"] = e if isinstance(e, walletd.ConnectionLost) else walletd.ConnectionLost(str(e))
            for s in slots:
                s["done"].set()


def handler(batcher):
    class Handler(BaseHTTPRequestHandler):
        timeout = 30

        def answer(self, status, text):
            self.log_message("%s %s -> %d %s", self.command, self.path.split("?")[0], status, text)
            data = (text + "\n").encode()
            if status == 200 and self.path.startswith("/jasmin"):
                data = b"ACK/Jasmin"  # exactly Jasmin's receipt: anything else and it sends the report again
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_request(self, code="-", size="-"):
            pass  # answer() logs each request, with what it did

        def report(self):
            url = urllib.parse.urlsplit(self.path)
            gateway = GATEWAYS.get(url.path)
            if gateway is None:
                return self.answer(404, "no such page")
            query = dict(urllib.parse.parse_qsl(url.query))
            form = {}
            if self.command == "POST":
                length = self.headers.get("Content-Length", "0")
                if not length.isdigit() or int(length) > 65536:
                    return self.answer(400, "bad body")
                form = dict(urllib.parse.parse_qsl(self.rfile.read(int(length)).decode("utf-8", "replace")))
            if not query.get("wallet") or not query.get("ref"):
                return self.answer(400, "the dlr-url names no wallet and ref")
            status, error = gateway(query, form)
            if status is None:
                return self.answer(200, "not final")
            item = {"wallet": query["wallet"], "ref": query["ref"], "status": status}
            if error:
                item["error"] = error
            try:
                result = batcher.record(item)
            except walletd.ConnectionLost as e:
                return self.answer(503, "walletd unavailable: %s" % e)
            if "error" in result and isinstance(result["error"], dict):
                code = result["error"].get("code")
                if code in ("unknown_txn", "unknown_wallet"):
                    return self.answer(200, "unknown charge")
                return self.answer(400, "not recorded: %s: %s" % (code, result["error"].get("message")))
            return self.answer(200, "already recorded" if result["replayed"] else "recorded")

        do_GET = do_POST = report

        def log_message(self, fmt, *args):
            sys.stderr.write("dlr_receiver: " + fmt % args + "\n")
    return Handler


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # a DLR storm opens hundreds of connections at once; the default 5 drops them


def main():
    ap = argparse.ArgumentParser(description="Kannel and Jasmin delivery reports into walletd.")
    ap.add_argument("--listen", default="127.0.0.1:8083", help="HOST:PORT")
    ap.add_argument("--socket", default=walletd.default_socket(), help="walletd's socket")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    server = Server((host or "127.0.0.1", int(port)), handler(Batcher(args.socket)))
    print("dlr_receiver on %s, walletd at %s" % (args.listen, args.socket), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
