#!/bin/bash
# Proves the Debian package on this machine (SPEC 13); CI runs it as
# root on a fresh Debian 12.  Changes the system: it installs the
# package and purges it again, so it refuses to run when the package is
# already installed.
#
#   1. make deb; lintian on the .deb: any error (E:) fails, warnings are
#      shown
#   2. apt-get install ./build/libnginx-mod-mail-smtp-ext_*.deb: the .so,
#      the load file and the modules-enabled link sorting after
#      50-mod-mail.conf are there
#   3. nginx -t of a configuration with a protocol smtp_ext server and no
#      load_module line of its own (it includes modules-enabled, as
#      Debian's nginx.conf does): debian/tests/smoke, the autopkgtest;
#      then that nginx started on a free 127.0.0.1 port greets with 220
#      and logs "[notice] ... ngx_mail_smtp_ext/VERSION" once
#   4. apt-get purge: no file of the package is left, the link included
#
#   DEB_CHECK_NO_BUILD=1   use the .deb already in build/

set -euo pipefail

cd "$(dirname "$0")/.."

PKG=libnginx-mod-mail-smtp-ext
ENABLED=/etc/nginx/modules-enabled
LINK=$ENABLED/60-mod-mail-smtp-ext.conf

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
fi

say() { printf 'deb-check: %s\n' "$*"; }
die() { printf 'deb-check: FAILED: %s\n' "$*" >&2; exit 1; }

status() { dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null || true; }
installed() { [ "$(status)" = "install ok installed" ]; }
# nothing of the package on the system: never installed, or purged
absent() { case "$(status)" in ""|*" not-installed") ;; *) false ;; esac; }

absent || die "$PKG is on this system ($(status)); purge it first"

version=$(dpkg-parsechangelog -l debian/changelog -S Version)
deb=build/${PKG}_${version}_$(dpkg-architecture -qDEB_HOST_ARCH).deb

# --- 1. build and lintian -----------------------------------------------

if [ -z "${DEB_CHECK_NO_BUILD-}" ] || [ ! -f "$deb" ]; then
    make deb </dev/null
fi
[ -f "$deb" ] || die "make deb did not produce $deb"

# lintian's exit status also counts warnings on some versions: look at
# the tags instead
lint=$(lintian --tag-display-limit 0 "$deb" 2>&1 \
       | grep -v 'running with root privileges' || true)
[ -z "$lint" ] || printf '%s\n' "$lint" | sed 's/^/  lintian: /'
if printf '%s\n' "$lint" | grep -q '^E: '; then
    die "lintian reports errors"
fi
say "lintian: $(printf '%s\n' "$lint" | grep -c '^E: ' || true) errors," \
    "$(printf '%s\n' "$lint" | grep -c '^W: ' || true) warnings"

grep -q 'nginx-abi-' <(dpkg-deb -f "$deb" Depends) \
    || die "Depends lacks nginx-abi-*: $(dpkg-deb -f "$deb" Depends)"
grep -q 'libnginx-mod-mail\b' <(dpkg-deb -f "$deb" Depends) \
    || die "Depends lacks libnginx-mod-mail"

# --- 2. install -----------------------------------------------------------

tmp=$(mktemp -d)
nginx_pid=
cleanup() {
    if [ -n "$nginx_pid" ]; then
        kill "$nginx_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
    # never leave the package behind, whatever failed
    if ! absent; then
        $SUDO env DEBIAN_FRONTEND=noninteractive \
            apt-get purge -y -q "$PKG" </dev/null >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

say "apt-get install ./$deb"
$SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "./$deb" </dev/null \
    > "$tmp/install.log" 2>&1 \
    || { cat "$tmp/install.log"; die "apt-get install"; }
installed || die "$PKG not installed after apt-get install"

dpkg-query -L "$PKG" | sort > "$tmp/files"

for f in /usr/lib/nginx/modules/ngx_mail_smtp_ext_module.so \
         /usr/share/nginx/modules-available/mod-mail-smtp-ext.conf
do
    grep -qx "$f" "$tmp/files" || die "$f is not in the package"
    [ -f "$f" ] || die "$f is not installed"
done
grep -qx 'load_module modules/ngx_mail_smtp_ext_module.so;' \
    /usr/share/nginx/modules-available/mod-mail-smtp-ext.conf \
    || die "mod-mail-smtp-ext.conf: unexpected content"

[ -L "$LINK" ] || die "$LINK is not a symbolic link"
[ "$(readlink -f "$LINK")" \
    = /usr/share/nginx/modules-available/mod-mail-smtp-ext.conf ] \
    || die "$LINK points to $(readlink "$LINK")"

# nginx's include globs in the C locale: byte order
order=$(cd "$ENABLED" && LC_ALL=C ls -1 ./*.conf | sed 's|^\./||' \
        | grep -n 'mod-mail' | tr '\n' ' ')
case "$order" in
    *50-mod-mail.conf*60-mod-mail-smtp-ext.conf*) ;;
    *) die "modules-enabled order: $order" ;;
esac
say "installed: $(grep -c . "$tmp/files") paths; $LINK -> $(readlink "$LINK")"

# --- 3. nginx -t and a start, no load_module of its own ---------------------

debian/tests/smoke

port=$(perl -MIO::Socket::INET -e \
    'print IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1",
                                 LocalPort => 0)->sockport')
cat > "$tmp/nginx.conf" <<CONF
include $ENABLED/*.conf;
error_log $tmp/error.log notice;
pid $tmp/nginx.pid;
daemon off;
master_process on;
worker_processes 1;

events {}

mail {
    server_name deb-check.test;

    server {
        listen 127.0.0.1:$port;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:9;
    }
}
CONF
grep -q load_module "$tmp/nginx.conf" && die "test config has load_module"

/usr/sbin/nginx -c "$tmp/nginx.conf" &
nginx_pid=$!
greeting=
for _ in $(seq 50); do
    if greeting=$(timeout 2 perl -MIO::Socket::INET -e '
            my $s = IO::Socket::INET->new("127.0.0.1:'"$port"'") or exit 1;
            my $l = <$s>; print $l; print $s "QUIT\r\n";' 2>/dev/null)
    then
        break
    fi
    sleep 0.1
done
kill -QUIT "$nginx_pid"
wait "$nginx_pid" || true
nginx_pid=

case "$greeting" in
    "220 deb-check.test ESMTP"*) say "greeting: ${greeting%$'\r\n'}" ;;
    *) cat "$tmp/error.log"; die "no 220 greeting: '$greeting'" ;;
esac

n=$(grep -c "\[notice\] .*: ngx_mail_smtp_ext/[0-9]*\.[0-9]*\.[0-9]*$" \
    "$tmp/error.log" || true)
[ "$n" = 1 ] || { cat "$tmp/error.log"; die "$n version notices, not 1"; }
say "$(grep -o 'ngx_mail_smtp_ext/[0-9.]*$' "$tmp/error.log")" \
    "logged once at start"

# --- 4. purge -----------------------------------------------------------

say "apt-get purge $PKG"
$SUDO env DEBIAN_FRONTEND=noninteractive \
    apt-get purge -y -q "$PKG" </dev/null > "$tmp/purge.log" 2>&1 \
    || { cat "$tmp/purge.log"; die "apt-get purge"; }

absent || die "$PKG still known to dpkg: $(status)"

left=()
while IFS= read -r f; do
    # directories that other packages own stay
    if [ -e "$f" ] && [ ! -d "$f" ]; then
        left+=("$f")
    fi
done < "$tmp/files"
for f in "$LINK" "$LINK.removed"; do
    if [ -e "$f" ] || [ -L "$f" ]; then
        left+=("$f")
    fi
done
[ ${#left[@]} -eq 0 ] || die "left after purge: ${left[*]}"
# files with our name anywhere nginx looks
stray=$(find /etc/nginx /usr/share/nginx/modules-available \
            /usr/lib/nginx/modules -name '*smtp-ext*' -o \
            -name '*smtp_ext*' 2>/dev/null || true)
[ -z "$stray" ] || die "left after purge: $stray"

say "purged: none of the $(grep -c . "$tmp/files") paths left," \
    "modules-enabled link included"
say "OK"
