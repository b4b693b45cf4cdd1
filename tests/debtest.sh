#!/bin/sh
# debtest.sh WALLETD.deb: installs the package in a throwaway minbase Debian 12 chroot as an operator
# would (apt-get install ./walletd_*.deb pulls only Debian's packages), starts walletd as its user on
# the packaged paths, talks to it with walletctl, the Python client and the HTTP adapter, then purges
# the package and checks that no file of it is left. As root; the base system is kept in
# /var/tmp/walletd-debtest-base, each run works in a copy.
set -eu
deb=$(readlink -f "$1")
base=/var/tmp/walletd-debtest-base
mirror=$(sed -n 's/^URIs: *//p; s/^deb \([^ ]*\).*/\1/p' /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null | head -n1)
if [ ! -e $base/.done ]; then
	command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
	rm -rf $base
	debootstrap --variant=minbase bookworm $base ${mirror:-http://deb.debian.org/debian} >/dev/null
	touch $base/.done
fi
root=$(mktemp -d /var/tmp/walletd-debtest.XXXXXX)
cleanup() {
	for m in dev/pts dev proc; do umount -l "$root/$m" 2>/dev/null || true; done
	rm -rf "$root"
}
trap cleanup EXIT
cp -a $base/. "$root/"
cp /etc/resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/root/dist" && cp "$deb" "$root/root/dist/"
echo 'APT::Get::Assume-Yes "true";' > "$root/etc/apt/apt.conf.d/90yes"   # as an operator answers
# The README's install line, run as written (from the directory that holds dist/).
install=$(sed -n 's/^    \(apt-get install [^#]*[^ #]\) *#.*/\1/p' README.md)
test -n "$install"
mount -t proc proc "$root/proc"; mount --bind /dev "$root/dev"; mount -t devpts devpts "$root/dev/pts"
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive INSTALL="$install" \
	chroot "$root" /bin/sh -eux -c '
	cd /root
	apt-get update -q >/dev/null
	$INSTALL >/dev/null
	walletd -V && walletctl -V
	test "$(walletd -V)" = "walletd $(dpkg-query -W -f="\${Version}" walletd)"
	id walletd && id walletd-http && getent group sms-senders
	test -f /etc/walletd/walletd.conf && test "$(stat -c %U /var/lib/walletd)" = walletd
	dpkg -L walletd | sort > /tmp/files
	grep -qx /lib/systemd/system/walletd-http.service /tmp/files
	grep -qx /usr/share/walletd/node/index.js /tmp/files
	install -d -o walletd -g walletd /run/walletd    # the unit'"'"'s RuntimeDirectory
	setpriv --reuid=walletd --regid=walletd --init-groups walletd -f -c /etc/walletd/walletd.conf &
	daemon=$!
	for i in $(seq 100); do walletctl ping >/dev/null 2>&1 && break; sleep 0.1; done
	walletctl ping
	test "$(stat -c %U /var/lib/walletd/data.mdb)" = walletd
	walletctl wallet create acme USD && walletctl credit acme 10 opening
	python3 -c "import walletd; print(walletd.Client().balance(wallet=\"acme\"))"
	echo "key-1 acme" > /tmp/keys
	walletd-http --listen 127.0.0.1:8082 --keys /tmp/keys &
	http=$!
	get="import urllib.request as u; print(u.urlopen(u.Request(\"http://127.0.0.1:8082/api/balance\", headers={\"Authorization\": \"Bearer key-1\"})).read().decode())"
	for i in $(seq 100); do python3 -c "$get" 2>/dev/null && break; sleep 0.1; done
	test "$(python3 -c "$get")" = "{\"balance\": 10, \"currency\": \"USD\"}"
	kill $http $daemon; wait
	dpkg --purge walletd
	left=$(while read -r f; do if [ ! -d "$f" ] && { [ -e "$f" ] || [ -L "$f" ]; }; then echo "$f"; fi; done < /tmp/files)
	test -z "$left"
	test ! -e /var/lib/walletd && test ! -e /etc/walletd
	echo "debtest: installed, ran, purged clean"
'
