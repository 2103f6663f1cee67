#!/bin/bash
# Called by scripts/demo.sh once the demo Redis is up: the keys of
# docs/redis.md for the demo.
#
#   domain:example.org     -> pool "backends"  (accepted domain)
#   rcpt:blocked@example.org -> reject
#   user:alice             password "secret" as a SHA-512 crypt hash
#   user:bob               password "{PLAIN}secret" (CRAM-MD5 works too)
#
# Environment: REDIS_PORT (default 6380).

set -euo pipefail

REDIS_PORT=${REDIS_PORT:-6380}
cli=(redis-cli -h 127.0.0.1 -p "$REDIS_PORT")

"${cli[@]}" ping >/dev/null

"${cli[@]}" set domain:example.org backends >/dev/null
"${cli[@]}" set rcpt:blocked@example.org reject >/dev/null
"${cli[@]}" hset user:alice password "$(openssl passwd -6 secret)" >/dev/null
"${cli[@]}" hset user:bob password '{PLAIN}secret' >/dev/null

echo "demo-seed: Redis on 127.0.0.1:$REDIS_PORT has domain:example.org," \
     "rcpt:blocked@example.org, user:alice and user:bob (password: secret)"
