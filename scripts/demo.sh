#!/bin/bash
# Local demo of ngx_mail_smtp_ext, everything on 127.0.0.1:
#
#   127.0.0.1:2525  nginx + ngx_mail_smtp_ext (examples/nginx.conf)
#   127.0.0.1:2526  a sample backend (t/bin/smtp-backend.pl) that keeps
#                   every message it receives in build/demo/mail/
#   127.0.0.1:6380  redis-server, no persistence (scripts/demo-seed.sh)
#   127.0.0.1:9145  the module's metrics, http://127.0.0.1:9145/metrics
#
# Runs in the foreground until Ctrl-C or SIGTERM, then stops all three.
# "scripts/demo.sh --check" sends one message, checks that the backend
# got it, and stops (exit status 0 on success).
#
# Environment: NGINX_BIN, NGX_MAIL_MODULE, SMTP_EXT_MODULE as for the
# tests (defaults: Debian's nginx and build/modules/).

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEMO=$ROOT/build/demo

NGINX_BIN=${NGINX_BIN:-/usr/sbin/nginx}
NGX_MAIL_MODULE=${NGX_MAIL_MODULE:-/usr/lib/nginx/modules/ngx_mail_module.so}
OUR_MODULE=$ROOT/build/modules/ngx_mail_smtp_ext_module.so
SMTP_EXT_MODULE=${SMTP_EXT_MODULE:-$OUR_MODULE}

SMTP_PORT=2525
BACKEND_PORT=2526
REDIS_PORT=6380
METRICS_PORT=9145

CHECK=
if [ "${1-}" = "--check" ]; then
    CHECK=1
fi

say() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

# without connecting: a probe would show up in the backend's records
listening() {
    if command -v ss >/dev/null 2>&1; then
        [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

wait_port() {
    local i
    for i in $(seq 1 100); do
        listening "$1" && return 0
        sleep 0.1
    done
    return 1
}

for f in "$NGINX_BIN" "$NGX_MAIL_MODULE" "$SMTP_EXT_MODULE"; do
    [ -e "$f" ] || die "$f is missing (run 'make run', or 'make deps build')"
done
command -v redis-server >/dev/null || die "redis-server missing (make deps)"

for p in $SMTP_PORT $BACKEND_PORT $REDIS_PORT; do
    if listening "$p"; then
        die "127.0.0.1:$p is already in use (another demo running?)"
    fi
done

rm -rf "$DEMO"
mkdir -p "$DEMO"/{logs,mail,modules,redis}
ln -s "$NGX_MAIL_MODULE" "$DEMO/modules/ngx_mail_module.so"
ln -s "$SMTP_EXT_MODULE" "$DEMO/modules/ngx_mail_smtp_ext_module.so"

pids=()
stopping=

stop_all() {
    local p
    [ -n "$stopping" ] && return
    stopping=1
    trap - INT TERM
    if [ ${#pids[@]} -gt 0 ]; then
        say "stopping"
        for p in "${pids[@]}"; do
            kill -TERM "$p" 2>/dev/null || true
        done
        for p in "${pids[@]}"; do
            wait "$p" 2>/dev/null || true
        done
    fi
}

trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' \
    --appendonly no --dir "$DEMO/redis" --daemonize no \
    --logfile "$DEMO/logs/redis.log" </dev/null &
pids+=($!)

perl "$ROOT/t/bin/smtp-backend.pl" --port "$BACKEND_PORT" \
    --dir "$DEMO/mail" --greeting "220 demo-backend ESMTP" \
    </dev/null >"$DEMO/logs/backend.log" 2>&1 &
pids+=($!)

wait_port "$REDIS_PORT" || die "redis did not start: $DEMO/logs/redis.log"
wait_port "$BACKEND_PORT" || die "backend did not start: $DEMO/logs/backend.log"

REDIS_PORT=$REDIS_PORT "$ROOT/scripts/demo-seed.sh"

nginx_args=(-p "$DEMO/" -c "$ROOT/examples/nginx.conf"
            -e "$DEMO/logs/error.log")

"$NGINX_BIN" -t -q "${nginx_args[@]}" \
    || die "nginx -t failed, see above and $DEMO/logs/error.log"

"$NGINX_BIN" "${nginx_args[@]}" -g 'daemon off;' </dev/null &
pids+=($!)

wait_port "$SMTP_PORT" || die "nginx did not start: $DEMO/logs/error.log"

if [ -n "$CHECK" ]; then
    swaks --server 127.0.0.1:$SMTP_PORT --from a@example.com \
        --to b@example.org --header "Subject: demo check" \
        --body "hello through ngx_mail_smtp_ext" >"$DEMO/logs/swaks.log" 2>&1 \
        || { cat "$DEMO/logs/swaks.log"; die "swaks failed"; }
    ls "$DEMO"/mail/msg-*.eml >/dev/null 2>&1 \
        || { cat "$DEMO/logs/swaks.log"; die "the backend got no message"; }
    grep -q "hello through ngx_mail_smtp_ext" "$DEMO"/mail/msg-*.eml \
        || die "the message at the backend is not the one sent"
    swaks --server 127.0.0.1:$SMTP_PORT --from a@example.com \
        --to c@elsewhere.test --auth PLAIN --auth-user alice \
        --auth-password secret >"$DEMO/logs/swaks-auth.log" 2>&1 \
        || { cat "$DEMO/logs/swaks-auth.log"; die "authenticated relay failed"; }
    if swaks --server 127.0.0.1:$SMTP_PORT --from a@example.com \
        --to c@elsewhere.test >"$DEMO/logs/swaks-relay.log" 2>&1; then
        die "unauthenticated relay was accepted"
    fi
    grep -q "554 5.7.1" "$DEMO/logs/swaks-relay.log" \
        || { cat "$DEMO/logs/swaks-relay.log"; die "no 554 5.7.1 for relaying"; }
    curl -sS http://127.0.0.1:$METRICS_PORT/metrics >"$DEMO/logs/metrics.txt" \
        || die "no metrics at 127.0.0.1:$METRICS_PORT"
    grep -q '^smtp_ext_messages_total{listen="127.0.0.1:2525",result="accepted"} 2$' \
        "$DEMO/logs/metrics.txt" \
        || { cat "$DEMO/logs/metrics.txt"; die "metrics: not 2 accepted messages"; }
    say "check passed: $(ls "$DEMO"/mail/msg-*.eml)"
    exit 0
fi

cat <<EOT

  ngx_mail_smtp_ext demo is running (Ctrl-C stops it):

    nginx + smtp_ext  127.0.0.1:$SMTP_PORT   logs: $DEMO/logs/error.log
    backend           127.0.0.1:$BACKEND_PORT   mail: $DEMO/mail/
    redis             127.0.0.1:$REDIS_PORT
    metrics           http://127.0.0.1:$METRICS_PORT/metrics

  Send a test message, from another terminal (example.org is an accepted
  domain in the demo Redis, so no AUTH is needed):

    swaks --server 127.0.0.1:$SMTP_PORT --from a@example.com --to b@example.org

  Relaying elsewhere needs AUTH (users alice and bob, password "secret"):

    swaks --server 127.0.0.1:$SMTP_PORT --from a@example.com --to c@elsewhere.test \\
          --auth PLAIN --auth-user alice --auth-password secret

  and without it is refused (554 5.7.1 Relay access denied):

    swaks --server 127.0.0.1:$SMTP_PORT --from a@example.com --to c@elsewhere.test

  The first message again, with curl:

    printf 'Subject: hi\r\n\r\nhello\r\n' \\
        | curl -sS smtp://127.0.0.1:$SMTP_PORT \\
              --mail-from a@example.com --mail-rcpt b@example.org -T -

  The module's counters (Prometheus text format):

    curl -s http://127.0.0.1:$METRICS_PORT/metrics | grep -v '^#'

  What the backend received (messages as msg-CONN-N.eml, the whole
  conversation as conn-N.log):

    ls $DEMO/mail/ && tail -n +1 $DEMO/mail/conn-*.log

  nginx's transaction log lines:

    tail -f $DEMO/logs/error.log

EOT

# until a signal, or one of the three dies
while :; do
    for p in "${pids[@]}"; do
        if ! kill -0 "$p" 2>/dev/null; then
            die "a demo process ($p) exited, see $DEMO/logs/"
        fi
    done
    sleep 1 &
    wait $! || true
done
