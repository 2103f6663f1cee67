#!/bin/bash
# Runs the integration tests with the module built under AddressSanitizer
# and loaded into Debian's nginx (libasan preloaded).  Any report fails the
# run.  Usage: scripts/asan-test.sh [prove arguments, default t/]

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TREE=$ROOT/build/nginx-asan
LOGS=$ROOT/build/asan-logs
LIBASAN=$(gcc -print-file-name=libasan.so)

# configure again when the addon's file list changed
if [ ! -f "$TREE/.configured" ] || [ "$ROOT/config" -nt "$TREE/.configured" ]
then
    rm -rf "$TREE"
    cp -r /usr/share/nginx/src "$TREE"
    (
        cd "$TREE"
        . ./conf_flags
        ./configure "${NGX_CONF_FLAGS[@]}" --with-mail=dynamic \
            --with-mail_ssl_module --add-dynamic-module="$ROOT" \
            --with-cc-opt="-fsanitize=address -fno-omit-frame-pointer -O1" \
            --with-ld-opt="-fsanitize=address" >/dev/null
    )
    touch "$TREE/.configured"
fi

make -C "$TREE" -f objs/Makefile objs/ngx_mail_smtp_ext_module.so >/dev/null

# the workers run as nobody: they must be able to write their reports
rm -rf "$LOGS"
mkdir -p "$LOGS"
chmod 0777 "$LOGS"

cat > "$TREE/nginx-asan" <<EOT
#!/bin/sh
LD_PRELOAD=$LIBASAN \\
ASAN_OPTIONS=detect_leaks=0:log_path=$LOGS/asan \\
exec /usr/sbin/nginx "\$@"
EOT
chmod +x "$TREE/nginx-asan"

cd "$ROOT"
rc=0
NGINX_BIN=$TREE/nginx-asan \
SMTP_EXT_MODULE=$TREE/objs/ngx_mail_smtp_ext_module.so \
    prove -I t/lib -j"${TEST_JOBS:-2}" "${@:-t/}" || rc=$?

if ls "$LOGS"/asan.* >/dev/null 2>&1; then
    echo "AddressSanitizer reports:"
    head -n 40 "$LOGS"/asan.*
    exit 1
fi

exit $rc
