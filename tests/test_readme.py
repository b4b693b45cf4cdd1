"""The README's first steps and client snippets run exactly as written
(only /path/to/walletd becomes this checkout), against a real walletd."""
import os
import re
import subprocess
import tempfile

from harness import DaemonTest, ROOT, PY

WALLETCTL_DIR = os.path.dirname(os.environ.get("WALLETCTL", os.path.join(ROOT, "walletctl")))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def block(lang):
    """The first fenced block of lang in the README."""
    return re.search(r"```%s\n(.*?)```" % lang, readme(), re.S).group(1).replace("/path/to/walletd", ROOT)


class Readme(DaemonTest):
    def run_in_root(self, cmd, **kw):
        env = dict(os.environ, WALLETD_SOCKET=self.d.sock)
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kw)

    def test_first_steps_and_every_snippet_run_as_written(self):
        text = readme()
        self.assertLess(len(text.splitlines()), 540)  # a user's guide; the history is in contrib/bench
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
        r = self.run_in_root([PY, "-c", block("python").replace("msg-8841", "msg-py")])
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "1499.9718"), r.stderr)
        r = self.run_in_root(["php", "-r", block("php").replace("msg-8841", "msg-php")])
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "1499.9624"), r.stderr)
        app = tempfile.mkdtemp(dir=self.d.dir)  # "from any directory"
        npm = re.search(r"`(npm install /path/to/walletd/contrib/node)`", text).group(1).replace("/path/to/walletd", ROOT)
        r = subprocess.run(npm.split() + ["--prefer-offline", "--no-audit", "--no-fund"], cwd=app,
                           capture_output=True, text=True, timeout=300)
        self.assertEqual(r.returncode, 0, r.stderr)
        r = subprocess.run(["node", "--input-type=module", "-e", block("js").replace("msg-8841", "msg-js")], cwd=app,
                           env=dict(os.environ, WALLETD_SOCKET=self.d.sock), capture_output=True, text=True,
                           timeout=60)
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "1499.953"), r.stderr)
        self.assertEqual(self.d.ctl_json("history", "acme")["total"], 6)
        self.assertTrue(self.d.ctl_json("verify")["ok"])

    def test_no_file_of_the_project_speaks_of_sessions(self):
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
        for name in files:
            if name.startswith("tests/fuzz-corpus/") or name == "tests/test_readme.py":
                continue
            with open(os.path.join(ROOT, name), errors="replace") as f:
                for n, line in enumerate(f, 1):
                    # aiosmtpd's handler takes an SMTP session: that one is not ours
                    self.assertNotRegex(line.replace("server, session, envelope", ""), r"(?i)\bsessions?\b",
                                        "%s:%d" % (name, n))
