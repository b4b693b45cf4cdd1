"""What operators and integrators install and scrape: Prometheus metrics
(checked by promtool), the textfile collector script, make install and make
uninstall, the Python package, npm install of the Node.js package, walletd -h
defaults and the man page against the method table."""
import ast
import os
import re
import subprocess
import tempfile

from harness import DaemonTest, ROOT, WALLETD, WALLETCTL, PY, request, read_frames

UG = "+256712345678"


def methods():
    with open(os.path.join(ROOT, "protocol.h")) as f:
        return re.findall(r'^X\(M_\w+, \w+, "([a-z.]+)"', f.read(), re.M)


def samples(text):
    """{name{labels}: value} of a Prometheus exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


class Metrics(DaemonTest):
    def test_prometheus_exposition_passes_promtool_and_counts_what_happened(self):
        d = self.d
        self.seed("1")
        s = d.raw()
        s.sendall(b"".join(request(i, "charge", {"wallet": "acme", "channel": "sms", "to": UG, "ref": "m%d" % i})
                           for i in range(40)) +
                  request(40, "charge", {"wallet": "ghost", "channel": "sms", "to": UG, "ref": "x"}))
        self.assertEqual(len(read_frames(s, 41)), 41)
        r = d.ctl("stats", "--prometheus")
        self.assertEqual(r.returncode, 0, r.stderr)
        check = subprocess.run(["promtool", "check", "metrics"], input=r.stdout, capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        m = samples(r.stdout)
        self.assertEqual(m['walletd_requests_total{method="charge"}'], 41)
        self.assertEqual(m['walletd_request_errors_total{method="charge"}'], 1)
        self.assertEqual(m['walletd_errors_total{code="unknown_wallet"}'], 1)
        self.assertEqual(m['walletd_requests_total{method="refund"}'], 0)  # every method, 0 until seen
        total = sum(v for k, v in m.items() if k.startswith("walletd_requests_total"))
        self.assertEqual(m["walletd_request_duration_seconds_count"], total)
        self.assertEqual(m['walletd_request_duration_seconds_bucket{le="+Inf"}'], total)
        buckets = [v for k, v in m.items() if k.startswith("walletd_request_duration_seconds_bucket")]
        self.assertEqual(buckets, sorted(buckets))  # cumulative
        self.assertEqual(m["walletd_commit_batch_size_sum"], m["walletd_committed_requests_total"])
        self.assertEqual(m["walletd_commit_batch_size_count"], m["walletd_commits_total"])
        self.assertGreater(m["walletd_store_map_used_bytes"], 0)
        self.assertEqual(m["walletd_connections"], 2)  # s, and walletctl's own
        self.assertEqual((m["walletd_alerts_pending"], m["walletd_webhooks_pending"]), (0, 0))
        self.assertGreater(m["walletd_journal_bytes_total"], 0)
        self.assertGreaterEqual(m["walletd_checkpoints_total"], 1)
        self.assertLess(m["walletd_checkpoint_age_seconds"], 10)
        self.assertEqual({k: v for k, v in m.items() if k.startswith("walletd_replication_role")},
                         {'walletd_replication_role{role="%s"}' % r: float(r == "single")
                          for r in ("single", "leader", "follower", "catching_up", "diverged")})

    def test_textfile_script_writes_atomically_and_says_when_walletd_is_down(self):
        d = self.d
        out = tempfile.mkdtemp(dir=d.dir)
        env = dict(os.environ, WALLETCTL=WALLETCTL, WALLETD_SOCKET=d.sock)
        script = os.path.join(ROOT, "contrib", "metrics", "walletd-textfile")
        self.assertEqual(subprocess.run([script, out], env=env).returncode, 0)
        with open(os.path.join(out, "walletd.prom")) as f:
            text = f.read()
        self.assertEqual(samples(text)["walletd_up"], 1)
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertEqual(os.listdir(out), ["walletd.prom"])  # no temporary file left
        d.stop()
        self.assertEqual(subprocess.run([script, out], env=env, stderr=subprocess.DEVNULL).returncode, 1)
        with open(os.path.join(out, "walletd.prom")) as f:
            self.assertEqual(samples(f.read()), {"walletd_up": 0})
        d.start()


class Install(DaemonTest):
    def test_make_install_then_uninstall_leaves_nothing(self):
        dest = tempfile.mkdtemp(dir=self.d.dir)
        make = ["make", "-s", "-C", ROOT, "DESTDIR=" + dest, "prefix=/usr/local", "unitdir=/lib/systemd/system"]
        r = subprocess.run(make + ["install"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        files = sorted(os.path.relpath(os.path.join(p, f), dest) for p, _, fs in os.walk(dest) for f in fs)
        for want in ("usr/local/sbin/walletd", "usr/local/bin/walletctl", "usr/local/sbin/walletd-webhook",
                     "lib/systemd/system/walletd.service", "lib/systemd/system/walletd-webhook.service",
                     "lib/systemd/system/walletd-metrics.timer", "usr/local/share/man/man1/walletctl.1",
                     "usr/local/share/doc/walletd/webhook.env.example", "usr/local/lib/walletd/walletd-textfile",
                     "usr/local/share/walletd/php/Walletd.php", "usr/local/sbin/walletd-http",
                     "lib/systemd/system/walletd-http.service"):
            self.assertIn(want, files)
        pkg = [f for f in files if f.endswith("walletd/__init__.py")]
        self.assertEqual(len(pkg), 1)
        # Debian's python3 imports the installed client from where it was put, and it works
        libdir = os.path.join(dest, os.path.dirname(os.path.dirname(pkg[0])))
        code = "import walletd; print(walletd.__file__); print(walletd.Client(%r).ping()['api'])" % self.d.sock
        env = dict(os.environ, PYTHONPATH=libdir)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a fresh Debian: the first import writes __pycache__
        r = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, cwd=dest)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith(dest), r.stdout)
        self.assertTrue(pkg[0].startswith("usr/local/lib/python3"), pkg[0])
        r = subprocess.run([os.path.join(dest, "usr/local/sbin/walletd-http"), "--help"], env=env, capture_output=True,
                           text=True, cwd=dest)  # the HTTP API finds the installed client too
        self.assertEqual(r.returncode, 0, r.stderr)
        r = subprocess.run(make + ["uninstall"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        left = [os.path.join(p, f) for p, _, fs in os.walk(dest) for f in fs]
        self.assertEqual(left, [])


def mentions(source, method):
    """Whether a test's source calls method: by its wire name, walletctl's words or the Python client."""
    words = method.split(".")
    patterns = [r"\.%s\(" % method.replace(".", "_"), r'(ctl_json|ctl|call)\(\s*"%s"' % re.escape(method)]
    if len(words) == 2:
        patterns += [r'"%s"' % re.escape(method), r'"%s",\s*"%s"' % tuple(words)]
    return any(re.search(p, source) for p in patterns)


def test_sources():
    """{file.Class.test: its source} of every end-to-end test."""
    out = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if name.startswith("test_") and name.endswith(".py"):
            with open(os.path.join(ROOT, "tests", name)) as f:
                src = f.read()
            for node in ast.parse(src).body:
                for fn in node.body if isinstance(node, ast.ClassDef) else []:
                    if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_"):
                        out["%s.%s.%s" % (name[:-3], node.name, fn.name)] = ast.get_source_segment(src, fn)
    return out


class Docs(DaemonTest):
    def test_every_method_has_tests_named_in_the_tests_readme(self):
        with open(os.path.join(ROOT, "tests", "README.md")) as f:
            table = dict(re.findall(r"^\| `([a-z.]+)` \| (.*) \|$", f.read(), re.M))
        sources = test_sources()
        for method in methods():
            named = [t.strip() for t in table.get(method, "").split(",") if t.strip()]
            self.assertTrue(named, "no test named for %s in tests/README.md" % method)
            for test in named:
                self.assertIn(test, sources, method)
                self.assertTrue(mentions(sources[test], method), "%s does not call %s" % (test, method))

    def test_the_version_is_protocol_hs_everywhere(self):
        with open(os.path.join(ROOT, "protocol.h")) as f:
            version = re.search(r'#define WALLETD_VERSION "([^"]+)"', f.read()).group(1)
        for binary, name in ((WALLETD, "walletd"), (WALLETCTL, "walletctl")):
            r = subprocess.run([binary, "-V"], capture_output=True, text=True)
            self.assertEqual((r.returncode, r.stdout), (0, "%s %s\n" % (name, version)))
        self.assertEqual(self.d.ctl_json("ping")["version"], version)
        for path, pattern in (("contrib/node/package.json", r'"version": "([^"]+)"'),
                              ("contrib/python/pyproject.toml", r'^version = "([^"]+)"')):
            with open(os.path.join(ROOT, path)) as f:
                self.assertEqual(re.search(pattern, f.read(), re.M).group(1), version, path)

    def test_walletd_help_shows_every_key_with_its_default(self):
        r = subprocess.run([WALLETD, "-h"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0)
        for key, default in (("max_frame", "16M"), ("map_size", "1T"), ("batch_max", "4096"),
                             ("socket", "/run/walletd/walletd.sock"), ("smtp_url", "(none)")):
            self.assertRegex(r.stdout, r"\n  %s .*\n +default: %s\n" % (re.escape(key), re.escape(default)))
        self.assertEqual(r.stdout.count("default: "), len(re.findall(r"^  [a-z_]+ +[* ] ", r.stdout, re.M)))

    def test_the_man_page_has_every_method_of_the_table(self):
        with open(os.path.join(ROOT, "contrib", "man", "walletctl.1")) as f:
            page = f.read()
        for m in methods():  # rate.import: ".It Cm rate import ...", or ", Cm balance" on a shared line
            self.assertRegex(page, r"(?m)^\.It (.* , )?Cm %s( |$)" % re.escape(m.replace(".", " ")), m)
