"""A webhook receiver for the tests: answers 500 to the first FAIL posts, then
200; writes each post's headers and body to DIR/NNNN.json.
    hook_sink.py PORT DIR FAIL"""
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, directory, fail = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
os.makedirs(directory, exist_ok=True)
count = [0]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        count[0] += 1
        status = 500 if count[0] <= fail else 200
        path = os.path.join(directory, "%04d.json" % count[0])
        with open(path + ".tmp", "w") as f:  # renamed when whole: a test reads the directory meanwhile
            json.dump({"status": status, "headers": dict(self.headers), "body": body.decode()}, f)
        os.rename(path + ".tmp", path)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("ready", flush=True)
server.serve_forever()
