"""Runs every end-to-end test (tests/test_*.py) against real walletd processes.

With E2E_LANES=2 and no file named, the files run in two lanes at once, each file in a process of
its own whose output is printed whole when it ends: test_replication.py (most of the suite's time,
three nodes on three nats-servers) in one lane, every other file after another in the other.
Without it they run one after another in this process, as a file named (e2e.py test_holds.py) does.
Two lanes is not the default: beside the replication lane, test_ops.UnreadAcrossConnections stalled
(a paused connection never resumed, 1 run in 4), a defect of walletd's not yet found."""
import concurrent.futures
import glob
import os
import re
import subprocess
import sys
import threading
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
LONGEST = "test_replication.py"


def run(pattern):
    """Runs the test files matching pattern here; prints and returns (passed, failed, skipped)."""
    suite = unittest.defaultTestLoader.discover(HERE, pattern=pattern, top_level_dir=HERE)
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    failed = len({id(t) for t, _ in result.failures + result.errors})
    counts = (result.testsRun - failed - len(result.skipped), failed, len(result.skipped))
    print("%d passed, %d failed, %d skipped" % counts, flush=True)
    return counts


def run_lane(names, lock):
    """Runs each file in a process of its own, one after another, printing its output whole when it
    ends; returns their (passed, failed, skipped) added up."""
    total = [0, 0, 0]
    for name in names:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), name], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        m = re.search(r"^(\d+) passed, (\d+) failed, (\d+) skipped$", p.stdout, re.M)
        counts = [int(x) for x in m.groups()] if m else [0, 1, 0]  # ended before its count: a failure
        with lock:
            sys.stdout.write(p.stdout if m else p.stdout + "\n%s ended (exit %d) before its count\n" % (
                name, p.returncode))
            sys.stdout.flush()
        total = [a + b for a, b in zip(total, counts)]
    return total


def run_lanes():
    """Every file: test_replication.py in a lane of its own beside the rest; returns the counts added up."""
    names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(HERE, "test_*.py")))
    lock = threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        rest = [n for n in names if n != LONGEST]
        lanes = [pool.submit(run_lane, [LONGEST], lock), pool.submit(run_lane, rest, lock)]
        total = [sum(x) for x in zip(*(lane.result() for lane in lanes))]
    print("every file:\n%d passed, %d failed, %d skipped" % tuple(total))
    return total


if __name__ == "__main__":
    if len(sys.argv) > 1 or os.environ.get("E2E_LANES") != "2":
        counts = run(sys.argv[1] if len(sys.argv) > 1 else "test_*.py")
    else:
        counts = run_lanes()
    sys.exit(0 if counts[1] == 0 else 1)
