#!/bin/bash
# Hook called by scripts/demo.sh once the demo Redis is up: fills it with
# demo users, domains and routes.  Redis support (smtp_ext_redis) is not
# there yet, so for now it only checks that Redis answers.
#
# Environment: REDIS_PORT (default 6380).

set -euo pipefail

REDIS_PORT=${REDIS_PORT:-6380}
cli=(redis-cli -h 127.0.0.1 -p "$REDIS_PORT")

"${cli[@]}" ping >/dev/null

# Keys of SPEC §4 will go here, e.g.:
#   "${cli[@]}" set domain:example.org backends
#   "${cli[@]}" hset user:alice password '{PLAIN}secret'
echo "demo-seed: Redis on 127.0.0.1:$REDIS_PORT is up (nothing to seed yet)"
