#!/bin/bash
# Installs what building, testing and the demo need on Debian 12.
# Quick no-op when everything is already there; safe to run again.
# Services that the packages would start (nginx on :80, redis on :6379,
# postfix on :25) are kept from starting: tests and the demo start their
# own on free 127.0.0.1 ports.  DEPS_FORCE=1 runs apt-get even when
# everything looks installed.

set -euo pipefail

PACKAGES=(
    build-essential
    nginx
    nginx-common
    libnginx-mod-mail
    libnginx-mod-stream
    nginx-dev
    libhiredis-dev
    libssl-dev
    libcrypt-dev
    libpcre2-dev
    zlib1g-dev
    redis-server
    redis-tools
    swaks
    postfix
    curl
    openssl
    perl
    libio-socket-ssl-perl
    libnet-ssleay-perl
    clang
    libclang-rt-14-dev
    valgrind
    gnuplot-nox
    procps
    iproute2
    # make deb and scripts/deb-check.sh (dh_nginx comes with nginx-dev)
    debhelper
    dpkg-dev
    fakeroot
    lintian
)

SERVICES=(nginx redis-server postfix)

missing=()
for p in "${PACKAGES[@]}"; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    if [ "$st" != "install ok installed" ] || [ -n "${DEPS_FORCE-}" ]; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "deps: all ${#PACKAGES[@]} packages installed"
    exit 0
fi

echo "deps: installing ${missing[*]}"

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "deps: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive

# Which services were running before, so that we stop only what the
# install itself started.
was_running=()
for s in "${SERVICES[@]}"; do
    if [ -x "/etc/init.d/$s" ] \
       && $SUDO service "$s" status >/dev/null 2>&1
    then
        was_running+=("$s")
    fi
done

# postfix: no main.cf, no listener.
echo "postfix postfix/main_mailer_type select No configuration" \
    | $SUDO debconf-set-selections

# invoke-rc.d and deb-systemd-invoke obey policy-rc.d: exit 101 forbids
# starting services from maintainer scripts.  Only ours is removed.
policy=/usr/sbin/policy-rc.d
own_policy=
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    own_policy=1
fi
cleanup() {
    if [ -n "$own_policy" ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT

$SUDO apt-get update -qq
$SUDO apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}" </dev/null

# Belt and braces: stop anything the install started anyway.
for s in "${SERVICES[@]}"; do
    case " ${was_running[*]-} " in *" $s "*) continue ;; esac
    if [ -x "/etc/init.d/$s" ] \
       && $SUDO service "$s" status >/dev/null 2>&1
    then
        echo "deps: stopping $s started by its package"
        $SUDO service "$s" stop || true
    fi
    if command -v systemctl >/dev/null 2>&1 \
       && [ -d /run/systemd/system ]
    then
        $SUDO systemctl disable --now "$s" >/dev/null 2>&1 || true
    fi
done

echo "deps: done"
