"""The README's first steps and client snippets run exactly as written
(only /path/to/walletd becomes this checkout), against a real walletd."""
import os
import re
import shutil
import subprocess
import tempfile
import time

from harness import Daemon, DaemonTest, ROOT, PY
from cluster import free_ports  # noqa: E402 (after harness, which puts the client on the path)

WALLETCTL_DIR = os.path.dirname(os.environ.get("WALLETCTL", os.path.join(ROOT, "walletctl")))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def indented(text, word):
    """The README's indented command lines (four spaces) that contain word, /path/to/walletd made this checkout."""
    return [line[4:].replace("/path/to/walletd", ROOT) for line in text.splitlines()
            if line.startswith("    ") and not line.startswith("     ") and word in line and "#" not in line[:6]]


def block(lang):
    """The first fenced block of lang in the README."""
    return re.search(r"```%s\n(.*?)```" % lang, readme(), re.S).group(1).replace("/path/to/walletd", ROOT)


class Readme(DaemonTest):
    def run_in_root(self, cmd, **kw):
        env = dict(os.environ, WALLETD_SOCKET=self.d.sock)
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kw)

    def test_first_steps_and_every_snippet_run_as_written(self):
        text = readme()
        self.assertLess(len(text.splitlines()), 870)  # a user's guide; the history is in contrib/bench
        steps = re.search(r"## First steps\n.*?\n\n((?:    \./walletctl [^\n]*\n)+)", text, re.S).group(1)
        lines = [line.strip() for line in steps.splitlines()]
        self.assertEqual(len(lines), 7)
        for line in lines:
            r = self.run_in_root(["sh", "-c", line])
            self.assertEqual(r.returncode, 0, "%s:\n%s%s" % (line, r.stdout, r.stderr))
        self.assertEqual(r.stdout.split(), ["balance:", "1,499.9906", "held:", "0.00", "available:", "1,499.9906",
                                            "currency:", "USD"])  # as its comment says
        r = self.run_in_root(["sh", "-c", block("sh").strip()])
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.run_in_root([PY, "-c", block("python")])
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "1499.9718"), r.stderr)
        app = tempfile.mkdtemp(dir=self.d.dir)  # "from your application's directory"
        npm = indented(text, "npm install")
        self.assertEqual(len(npm), 1)
        r = subprocess.run(["sh", "-c", npm[0] + " --prefer-offline --no-audit --no-fund"], cwd=app,
                           capture_output=True, text=True, timeout=300)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(os.path.islink(os.path.join(app, "node_modules", "walletd-client")))  # a copy, not a link
        with open(os.path.join(app, "charge.mjs"), "w") as f:
            f.write(block("js"))
        r = subprocess.run(["node", "charge.mjs"], cwd=app, env=dict(os.environ, WALLETD_SOCKET=self.d.sock),
                           capture_output=True, text=True, timeout=60)
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "1499.9624"), r.stderr)
        r = self.run_in_root(["php", "-r", block("php")])
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "1499.953"), r.stderr)
        self.assertEqual(self.d.ctl_json("history", "acme")["total"], 6)
        self.assertTrue(self.d.ctl_json("verify")["ok"])

    def test_the_python_install_lines_work_as_written(self):
        work = tempfile.mkdtemp(dir=self.d.dir)
        shutil.copytree(os.path.join(ROOT, "contrib", "python"), os.path.join(work, "python"),
                        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
        lines = indented(readme(), "venv")
        self.assertEqual(len(lines), 2)
        debian = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin")  # Debian's python3, as on a fresh machine
        for line in lines:  # the checkout's client copied, so that pip builds nothing inside the checkout
            r = subprocess.run(["sh", "-c", line.replace(os.path.join(ROOT, "contrib"), work)], cwd=work, env=debian,
                               capture_output=True, text=True, timeout=300)
            self.assertEqual(r.returncode, 0, line + "\n" + r.stdout + r.stderr)
        code = "import walletd; print(walletd.__file__); print(walletd.Client(%r).ping()['api'])" % self.d.sock
        r = subprocess.run([os.path.join(work, "venv", "bin", "python"), "-c", code], capture_output=True, text=True,
                           cwd=work)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith(os.path.join(work, "venv")), r.stdout)
        self.assertTrue(r.stdout.endswith("\n1\n"), r.stdout)

    def test_the_high_availability_recipe_runs_on_one_machine(self):
        recipe = [b for b in re.findall(r"```sh\n(.*?)```", readme(), re.S) if "nats-server -js" in b]
        self.assertEqual(len(recipe), 1)
        ha = os.path.join(ROOT, "var", "ha")
        shutil.rmtree(ha, ignore_errors=True)
        self.addCleanup(shutil.rmtree, ha, True)
        env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
        r = subprocess.run(["sh", "-c", recipe[0]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("wallet: demo", r.stdout)  # made through b
        self.assertIn("balance: 0.00", r.stdout)  # read on a
        self.assertRegex(r.stdout, r"node: a\nrole: (leader|follower)\nleader: [ab]\n")
        # with the default stream_replicas, one nats-server: walletd says what to change
        port = free_ports(1)[0]
        nats = subprocess.Popen(["nats-server", "-js", "-sd", os.path.join(ha, "nats2"), "-a", "127.0.0.1", "-p",
                                 str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (nats.kill(), nats.wait()))
        node = Daemon({"nats_url": "nats://127.0.0.1:%d" % port, "node": "x"})
        self.addCleanup(node.cleanup)
        node.start(wait=False)
        deadline = time.time() + 20
        while "set stream_replicas = 1" not in node.read_log() and time.time() < deadline:
            time.sleep(0.1)
        self.assertIn("NATS cannot keep 3 copies of the stream", node.read_log())
