# walletd - prepaid wallets for SMS and WhatsApp platforms.
#
#   make           build walletd and walletctl
#   make run       install what is missing, build, run walletd on ./var/
#   make test      install what is missing, build, run every test (T=tests/test_x.py: one file)
#   make install   install binaries, man pages, systemd units, the clients, the webhook
#                  receiver and the HTTP API; make uninstall removes them
#   make deb       the Debian package, dist/walletd_VERSION_ARCH.deb (make debtest: installed,
#                  run and purged in a fresh Debian 12 chroot)
#   make bench     throughput and latency on a temporary store
#   make fuzz      run the libFuzzer target for FUZZ_SECONDS
#   make crashtest kill -9 walletd, and cut its power, under load, again and again
#   make weakentest  walletd weakened on purpose must fail the power cuts
#   make replicatest  three nodes on three nats-servers: random kills, pauses and network partitions under load

# ---- configuration -----------------------------------------------------
CC        ?= cc
CFLAGS    ?= -O2 -g
WARN       = -std=c11 -Wall -Wextra -Wshadow -Wformat=2 -Wno-unused-parameter
prefix    ?= /usr/local
bindir     = $(prefix)/bin
sbindir    = $(prefix)/sbin
mandir     = $(prefix)/share/man
docdir     = $(prefix)/share/doc/walletd
libdir     = $(prefix)/lib/walletd
sharedir   = $(prefix)/share/walletd
unitdir   ?= /lib/systemd/system
# The Python client goes where Debian's python3 looks under prefix (dist-packages).
pythondir ?= $(prefix)/lib/python$(shell $(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3)/dist-packages
DESTDIR   ?=
# Debian packages: to build, and to test.
BUILD_PKGS = gcc libc6-dev make pkg-config liblmdb-dev libmsgpack-dev libcurl4-openssl-dev libjansson-dev libssl-dev libnats-dev
TEST_PKGS  = check python3 python3-msgpack python3-cryptography python3-aiosmtpd clang libclang-rt-14-dev lmdb-utils php-cli php-msgpack \
             python3-venv python3-pip python3-setuptools python3-wheel prometheus nats-server
# Node.js and npm: Debian's, unless a node and npm are already on PATH.
NODE_PKGS  = $(shell command -v node >/dev/null || echo nodejs) $(shell command -v npm >/dev/null || echo npm)
FUZZ_SECONDS ?= 60
# Tests build with sanitizers; set SANITIZE= to turn them off.
SANITIZE  ?= -fsanitize=address,undefined -fno-omit-frame-pointer
# ------------------------------------------------------------------------

PKG_CFLAGS = $(shell pkg-config --cflags msgpack lmdb libcurl jansson libcrypto libnats)
PKG_LIBS   = $(shell pkg-config --libs msgpack lmdb libcurl jansson libcrypto libnats) -lpthread
CHECK_LIBS = $(shell pkg-config --libs check)
PY         = /usr/bin/python3

all: walletd walletctl

walletd: walletd.c protocol.h .deps-build
	$(CC) $(WARN) $(CFLAGS) $(PKG_CFLAGS) $(LDFLAGS) -o $@ walletd.c $(PKG_LIBS)

walletctl: walletctl.c protocol.h .deps-build
	$(CC) $(WARN) $(CFLAGS) $(PKG_CFLAGS) $(LDFLAGS) -o $@ walletctl.c $(PKG_LIBS) -lm

# Installs missing Debian packages (as root), else says what to install.
define apt_install
	@missing=""; for p in $(strip $(1)); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq $$missing >/dev/null || exit 1; \
	  else \
	    echo "missing Debian packages:$$missing"; \
	    echo "run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi
endef

.deps-build:
	$(call apt_install,$(BUILD_PKGS))
	@touch $@

.deps-test: .deps-build
	$(call apt_install,$(TEST_PKGS) $(NODE_PKGS))
	@touch $@

# walletd in the foreground on ./var/db and ./var/walletd.sock, single node.
run: all
	@mkdir -p var
	@echo "export WALLETD_SOCKET=$(CURDIR)/var/walletd.sock"
	./walletd -f -d var/db -s var/walletd.sock

# ---- tests --------------------------------------------------------------
# The Check unit tests, and walletd with ASan + UBSan for the end-to-end tests.
tests/check_walletd: tests/check_walletd.c walletd.c protocol.h .deps-test
	$(CC) $(WARN) -Wno-unused-function $(CFLAGS) $(SANITIZE) $(PKG_CFLAGS) -o $@ tests/check_walletd.c $(PKG_LIBS) $(CHECK_LIBS)

tests/walletd-asan: walletd.c protocol.h .deps-test
	$(CC) $(WARN) $(CFLAGS) $(SANITIZE) $(PKG_CFLAGS) -o $@ walletd.c $(PKG_LIBS)

FUZZ_FLAGS = -max_len=65536 -timeout=10 -rss_limit_mb=4096 -malloc_limit_mb=262144
FUZZ_ENV   = ASAN_OPTIONS=allocator_may_return_null=1

# Every test (tests/README.md says which file covers what); T=tests/test_holds.py runs that file alone.
test: all tests/check_walletd tests/walletd-asan tests/fuzz_walletd tests/faults.so contrib/node/node_modules
ifeq ($(T),)
	./tests/check_walletd
	mkdir -p var/fuzz-corpus
	$(FUZZ_ENV) ./tests/fuzz_walletd -max_total_time=15 $(FUZZ_FLAGS) var/fuzz-corpus tests/fuzz-corpus 2>&1 | tail -1
endif
	WALLETD=$(CURDIR)/tests/walletd-asan WALLETCTL=$(CURDIR)/walletctl $(PY) tests/e2e.py $(notdir $(T))

# The crash tests at length: walletd killed with SIGKILL, and its power cut, 100 times each under load.
crashtest: all tests/walletd-asan
	CRASH_KILLS=100 POWER_CUTS=100 WALLETD=$(CURDIR)/walletd WALLETCTL=$(CURDIR)/walletctl $(PY) tests/e2e.py test_ops.py

# The power-cut model as judge: walletd weakened on purpose (no checkpoint pin, no restore, the answer
# before the journal's sync) must each lose or break something under 30 cuts (CUTS=...).
weakentest: all tests/faults.so
	$(PY) tests/weakened.py $${CUTS:-30}

# Replication at length: 30 rounds of random kills and pauses of walletd nodes and nats-servers under load.
replicatest: all tests/walletd-asan
	REPLICA_ROUNDS=$${REPLICA_ROUNDS:-30} WALLETD=$(CURDIR)/walletd WALLETCTL=$(CURDIR)/walletctl \
	  $(PY) tests/e2e.py test_replication.py

# The Node.js client's one dependency, for its tests.
contrib/node/node_modules: contrib/node/package.json contrib/node/package-lock.json .deps-test
	cd contrib/node && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# ---- install ------------------------------------------------------------
# The Node.js client installs with npm: npm install /path/to/contrib/node.
INSTALLED = $(sbindir)/walletd $(bindir)/walletctl $(mandir)/man8/walletd.8 $(mandir)/man1/walletctl.1 \
	$(unitdir)/walletd.service $(unitdir)/walletd-webhook.service $(sbindir)/walletd-webhook \
	$(pythondir)/walletd/__init__.py $(docdir)/README.md $(docdir)/walletd.conf.example \
	$(docdir)/webhook.env.example $(libdir)/walletd-textfile $(unitdir)/walletd-metrics.service \
	$(unitdir)/walletd-metrics.timer $(sharedir)/php/Walletd.php $(unitdir)/walletd-http.service $(sbindir)/walletd-http \
	$(sharedir)/node/package.json $(sharedir)/node/index.js $(mandir)/man8/walletd-http.8 $(mandir)/man8/walletd-webhook.8
UNITS = walletd.service walletd-webhook.service walletd-http.service walletd-metrics.service walletd-metrics.timer

# Into $(DESTDIR)$(prefix) (/usr/local); uninstall removes exactly what it put.
install: all
	install -d $(DESTDIR)$(sbindir) $(DESTDIR)$(bindir) $(DESTDIR)$(mandir)/man8 $(DESTDIR)$(mandir)/man1 \
	  $(DESTDIR)$(unitdir) $(DESTDIR)$(pythondir)/walletd $(DESTDIR)$(docdir) $(DESTDIR)$(libdir) \
	  $(DESTDIR)$(sharedir)/php $(DESTDIR)$(sharedir)/node
	install -m 755 walletd $(DESTDIR)$(sbindir)/walletd
	install -m 755 walletctl $(DESTDIR)$(bindir)/walletctl
	install -m 644 contrib/man/walletd.8 contrib/man/walletd-http.8 contrib/man/walletd-webhook.8 $(DESTDIR)$(mandir)/man8/
	install -m 644 contrib/man/walletctl.1 $(DESTDIR)$(mandir)/man1/walletctl.1
	for u in $(UNITS); do sed 's|/usr/local/|$(prefix)/|g' contrib/systemd/$$u > $(DESTDIR)$(unitdir)/$$u; done
	install -m 755 contrib/payments/webhook.py $(DESTDIR)$(sbindir)/walletd-webhook
	install -m 755 contrib/http/walletd-http $(DESTDIR)$(sbindir)/walletd-http
	install -m 644 contrib/python/walletd/__init__.py $(DESTDIR)$(pythondir)/walletd/__init__.py
	install -m 755 contrib/metrics/walletd-textfile $(DESTDIR)$(libdir)/walletd-textfile
	install -m 644 contrib/php/Walletd.php $(DESTDIR)$(sharedir)/php/Walletd.php
	install -m 644 contrib/node/package.json contrib/node/index.js $(DESTDIR)$(sharedir)/node/
	install -m 644 README.md contrib/walletd.conf.example contrib/payments/webhook.env.example $(DESTDIR)$(docdir)/

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
	rm -rf $(DESTDIR)$(pythondir)/walletd/__pycache__
	-rmdir $(DESTDIR)$(pythondir)/walletd $(DESTDIR)$(docdir) $(DESTDIR)$(libdir) $(DESTDIR)$(sharedir)/php \
	  $(DESTDIR)$(sharedir)/node $(DESTDIR)$(sharedir) 2>/dev/null

# ---- Debian package ------------------------------------------------------
# dist/walletd_VERSION_ARCH.deb, built by debhelper from contrib/debian on a copy of the tree;
# the version is protocol.h's. make debtest installs it in a fresh Debian 12 chroot (root, network).
VERSION = $(shell sed -n 's/^\#define WALLETD_VERSION "\(.*\)"/\1/p' protocol.h)
DEB_PKGS = debhelper dh-python dpkg-dev lintian

deb: .deps-build
	$(call apt_install,$(DEB_PKGS))
	rm -rf dist && mkdir -p dist/walletd-$(VERSION)
	tar -c --exclude=./dist --exclude=./var --exclude=./.git --exclude=node_modules . | tar -x -C dist/walletd-$(VERSION)
	$(MAKE) -s -C dist/walletd-$(VERSION) clean
	cp -r contrib/debian dist/walletd-$(VERSION)/debian
	printf 'walletd (%s) bookworm; urgency=medium\n\n  * Release %s.\n\n -- %s  %s\n' "$(VERSION)" "$(VERSION)" \
	  "$$(sed -n 's/^Maintainer: //p' contrib/debian/control)" "$$(date -R)" > dist/walletd-$(VERSION)/debian/changelog
	cd dist/walletd-$(VERSION) && dpkg-buildpackage -b -us -uc
	rm -rf dist/walletd-$(VERSION) dist/*.buildinfo dist/*.changes dist/*-dbgsym_*.deb
	lintian --fail-on error dist/walletd_$(VERSION)_*.deb

debtest: deb
	sh tests/debtest.sh dist/walletd_$(VERSION)_*.deb

# What the builds and tests leave here (not ./var: a store of make run).
clean:
	rm -f walletd walletctl tests/check_walletd tests/walletd-asan tests/fuzz_walletd tests/faults.so .deps-build .deps-test
	rm -rf tests/__pycache__ contrib/python/walletd/__pycache__ dist

.PHONY: all run test crashtest weakentest replicatest install uninstall clean deb debtest

# ---- benchmarks and robustness (not part of make test) -------------------
# Throughput and latency of walletd on a temporary store (contrib/bench/README.md).
bench: all
	sh contrib/bench/bench.sh

.PHONY: bench

# The fault injection the tests preload: power cuts, failing and slow syncs, a set clock (tests/faults.c).
tests/faults.so: tests/faults.c .deps-test
	$(CC) $(WARN) -O2 -shared -fPIC -o $@ tests/faults.c -ldl

# libFuzzer over the frame decoder and method dispatch (clang).
tests/fuzz_walletd: tests/fuzz_walletd.c walletd.c protocol.h .deps-test
	clang $(WARN) -Wno-unused-function -O1 -g -fsanitize=fuzzer,address,undefined $(PKG_CFLAGS) -o $@ tests/fuzz_walletd.c $(PKG_LIBS)

fuzz: tests/fuzz_walletd
	mkdir -p var/fuzz-corpus
	$(FUZZ_ENV) ./tests/fuzz_walletd -max_total_time=$(FUZZ_SECONDS) $(FUZZ_FLAGS) var/fuzz-corpus tests/fuzz-corpus

.PHONY: fuzz

# walletd beside Redis and PostgreSQL doing the same charges, side by side in one run.
compare: all
	sh contrib/bench/compare.sh

# 1,000,000 wallets and 10,000,000 transactions; WALLETS=... TXNS=... to scale down.
bench-scale: all
	$(PY) contrib/bench/scale.py

.PHONY: compare bench-scale
