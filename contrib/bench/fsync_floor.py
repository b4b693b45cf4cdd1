"""The disk's own fdatasync latency: the floor under any durable commit.
usage: /usr/bin/python3 fsync_floor.py DIR [COUNT] -> JSON {p50_us, p99_us}"""
import json
import os
import sys
import time

if len(sys.argv) < 2:
    sys.exit(__doc__)
path = os.path.join(sys.argv[1], "fsync-floor.tmp")
count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, b"\0" * 65536)
os.fsync(fd)
lat = []
for i in range(count):
    os.pwrite(fd, b"x" * 4096, (i % 16) * 4096)
    t = time.perf_counter_ns()
    os.fdatasync(fd)
    lat.append(time.perf_counter_ns() - t)
os.close(fd)
os.unlink(path)
lat.sort()
print(json.dumps({"p50_us": lat[len(lat) // 2] / 1000, "p99_us": lat[int(len(lat) * 0.99)] / 1000}))
