#!/usr/bin/perl

# nginx -t for the Redis directives (SPEC §3): addresses are IP literals
# or unix sockets, never host names; smtp_ext_auth needs smtp_ext_redis;
# smtp_ext_require_auth needs smtp_ext_auth; bad parameters are named.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

sub conf {
    my ($main, $server) = @_;
    return <<"EOF";
mail {
    server_name mx.test;
    $main
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        $server
    }
}
EOF
}

sub fails {
    my ($main, $server, $re, $name) = @_;
    my ($rc, $out) = nginx_t(conf($main, $server));
    ok($rc != 0, "$name: nginx -t fails");
    like($out, $re, "$name: message");
}

sub passes {
    my ($main, $server, $name) = @_;
    my ($rc, $out) = nginx_t(conf($main, $server));
    is($rc, 0, "$name: nginx -t passes") or diag($out);
    like($out, qr/syntax is ok/, "$name: syntax is ok");
}

fails('smtp_ext_redis localhost:6379;', '',
    qr/\[emerg\].*invalid\ Redis\ address\ "localhost:6379"
        .*host\ names\ are\ not\ resolved/x,
    'host name');
fails('', 'smtp_ext_redis redis.example.com:6379;',
    qr/\[emerg\].*invalid Redis address "redis\.example\.com:6379"/,
    'host name in server');
fails('', 'smtp_ext_auth plain login;',
    qr/\[emerg\].*"smtp_ext_auth" needs "smtp_ext_redis"/,
    'smtp_ext_auth without smtp_ext_redis');
fails('smtp_ext_redis 127.0.0.1:6379;', 'smtp_ext_require_auth on;',
    qr/\[emerg\].*"smtp_ext_require_auth" needs "smtp_ext_auth"/,
    'smtp_ext_require_auth without smtp_ext_auth');
fails('smtp_ext_redis 127.0.0.1:6379 foo=bar;', '',
    qr/\[emerg\].*invalid parameter "foo=bar"/, 'unknown parameter');
fails('smtp_ext_redis 127.0.0.1:6379 db=x;', '',
    qr/\[emerg\].*invalid parameter "db=x"/, 'bad db=');
fails('smtp_ext_redis 127.0.0.1:6379 timeout=0;', '',
    qr/\[emerg\].*invalid parameter "timeout=0"/, 'timeout=0');
fails('smtp_ext_redis 127.0.0.1:6379 password=;', '',
    qr/\[emerg\].*invalid parameter "password="/, 'empty password=');
fails("smtp_ext_redis 127.0.0.1:6379;\n    smtp_ext_redis 127.0.0.1:6380;",
    '', qr/\[emerg\].*"smtp_ext_redis" directive is duplicate/,
    'duplicate');

passes('smtp_ext_redis 127.0.0.1:6379 db=3 password=x prefix=mx: '
    . 'timeout=250ms;', 'smtp_ext_auth plain login cram-md5;',
    'all parameters');
passes('smtp_ext_redis [::1]:6379;', 'smtp_ext_auth plain;', 'IPv6');
passes('smtp_ext_redis unix:/nonexistent/redis.sock;',
    'smtp_ext_auth plain; smtp_ext_require_auth on;',
    'unix socket, nothing connected at -t');
passes('', 'smtp_ext_redis 127.0.0.1:6379 prefix=a:;', 'server level');
passes('smtp_ext_redis 127.0.0.1:6379;',
    'smtp_ext_redis 127.0.0.1:6379 db=1;'
    . ' smtp_ext_auth_fail_limit 3 window=1m;',
    'server overrides mail level');

done_testing();
