#!/usr/bin/perl

# Attacks on user: results in smtp_ext_redis_cache (SPEC 11), two
# workers: entries at the 255-octet limit of an entry (password of 253
# and 254 octets, a route making 255 and 256), NUL octets in a password,
# an empty password, a disabled user, an unknown user; the same login in
# two server{} blocks with another prefix= and another Redis; AUTH LOGIN
# and CRAM-MD5 from the cache (CRAM-MD5 against a cached crypt hash); a
# cached user whose counter lookup hangs, the client gone before Redis
# answers, with QUIT and STARTTLS pipelined behind the AUTH.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
my $r2 = start_redis(name => 'redis2');
my $b = start_backend(name => 'b');
my $bpool = start_backend(name => 'bpool');

my $pw253 = 'a' x 246;                  # {PLAIN} + 246 = 253 octets
my $pw254 = 'b' x 247;                  # 254
my $pw248 = 'c' x 241;                  # 248: with "other" 2 + 253 = 255
my $pw249 = 'd' x 242;                  # 249: with "other" 256

$r->cmd('HSET', 'user:p253', 'password', "{PLAIN}$pw253");
$r->cmd('HSET', 'user:p254', 'password', "{PLAIN}$pw254");
$r->cmd('HSET', 'user:p248r', 'password', "{PLAIN}$pw248", 'route', 'other');
$r->cmd('HSET', 'user:p249r', 'password', "{PLAIN}$pw249", 'route', 'other');
$r->cmd('HSET', 'user:nul', 'password', "{PLAIN}a\0b");
$r->cmd('HSET', 'user:empty', 'password', '', 'route', 'other');
$r->cmd('HSET', 'user:off', 'password', '{PLAIN}pw', 'disabled', '1');
$r->cmd('HSET', 'user:login', 'password', '{PLAIN}login-pw');
$r->cmd('HSET', 'user:crypt', 'password', hash_sha512('crypt-pw'));
$r->cmd('HSET', 'user:cram', 'password', '{PLAIN}cram-pw');
$r->cmd('HSET', 'user:slow', 'password', '{PLAIN}slow-pw');

# the same login elsewhere: another prefix, another Redis
$r->cmd('HSET', 'user:twin', 'password', '{PLAIN}plain-twin');
$r->cmd('HSET', 'x:user:twin', 'password', '{PLAIN}prefix-twin');
$r2->cmd('HSET', 'user:twin', 'password', '{PLAIN}redis2-twin');

my $conf = <<'EOF';
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=1s;
    smtp_ext_redis_cache 64k valid=1h;
    timeout 10s;

    smtp_ext_upstream other {
        server 127.0.0.1:%%PORT_bpool%%;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_auth plain login cram-md5;
        smtp_ext_auth_fail_limit 1000;
        smtp_ext_pass 127.0.0.1:%%PORT_b%%;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp2%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis%% prefix=x: timeout=1s;
        smtp_ext_auth plain;
        smtp_ext_auth_fail_limit 1000;
        smtp_ext_pass 127.0.0.1:%%PORT_b%%;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp3%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis2%% timeout=1s;
        smtp_ext_auth plain;
        smtp_ext_auth_fail_limit 1000;
        smtp_ext_pass 127.0.0.1:%%PORT_b%%;
    }
}
EOF

my $n = start_nginx($conf, workers => 2);

sub client {
    my $c = smtp_client($_[0] // 'smtp');
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

sub auth {
    my ($user, $pw, $re, $name, $port, $keep) = @_;
    my $c = client($port);
    $c->cmd('AUTH PLAIN ' . b64("\0$user\0$pw"), $re, $name);
    return $c if $keep;
    $c->cmd('QUIT', qr/^221 /);
    return undef;
}

sub user_reads {
    my ($key, @mon) = @_;
    return scalar grep { /"HMGET" "\Q$key\E"/ } @mon;
}

# 1. the size of an entry: 2 + password + route octets, at most 255

$r->monitor_start();
for my $k (1 .. 2) {
    auth('p253', $pw253, qr/^235 /, "253-octet password, AUTH $k: 235");
    auth('p253', $pw253 . 'x', qr/^535 /,
        "253-octet password, AUTH $k, one octet more: 535");
    auth('p253', substr($pw253, 1), qr/^535 /,
        "253-octet password, AUTH $k, one octet less: 535");
    auth('p254', $pw254, qr/^235 /, "254-octet password, AUTH $k: 235");
    auth('p254', substr($pw254, 1), qr/^535 /,
        "254-octet password, AUTH $k, one octet less: 535");
    auth('p249r', $pw249, qr/^235 /, "entry of 256, AUTH $k: 235");
}
for my $k (1 .. 2) {
    my $c = auth('p248r', $pw248, qr/^235 /, "entry of 255, AUTH $k: 235",
        'smtp', 1);
    $c->cmd('MAIL FROM:<p@b.test>', qr/^250 /);
    $c->cmd('RCPT TO:<x@anywhere.test>', qr/^250 /,
        "entry of 255, AUTH $k: the route works");
    $c->cmd('QUIT', qr/^221 /);
}
auth('p248r', $pw248 . 'other', qr/^535 /,
    'entry of 255: the route is not part of the password');
my @mon = $r->monitor_stop();
is(user_reads('user:p253', @mon), 1, '253-octet password: cached');
is(user_reads('user:p254', @mon), 4, '254-octet password: never cached');
is(user_reads('user:p248r', @mon), 1, 'entry of 255: cached');
is(user_reads('user:p249r', @mon), 2, 'entry of 256: never cached');
ok($bpool->wait_closed(2), 'entry of 255: both sessions used the route');
is($b->connections, 0, 'entry of 255: nothing went to smtp_ext_pass');

# 2. NUL in a password, an empty password, disabled, unknown: the same
# answer from Redis and from the cache

for my $k (1 .. 2) {
    # RFC 4616: no NUL in a PLAIN password; the entry keeps all 3 octets
    auth('nul', "a\0b", qr/^501 5\.5\.2 /,
        "NUL in the password, AUTH $k: 501");
    auth('nul', 'a', qr/^535 /, "NUL in the password, AUTH $k, 'a': 535");
    auth('nul', 'ab', qr/^535 /, "NUL in the password, AUTH $k, 'ab': 535");
    auth('empty', '', qr/^535 /, "empty password, AUTH $k: 535");
    auth('off', 'pw', qr/^535 /, "disabled, AUTH $k: 535");
    auth('nobody', 'pw', qr/^535 /, "unknown user, AUTH $k: 535");
}

# 3. one login, three servers: each its own Redis and prefix

for my $k (1 .. 2) {
    auth('twin', 'plain-twin', qr/^235 /, "twin, no prefix, $k: 235");
    auth('twin', 'prefix-twin', qr/^535 /,
        "twin, no prefix, $k: the prefix= password 535");
    auth('twin', 'redis2-twin', qr/^535 /,
        "twin, no prefix, $k: the other Redis's password 535");
    auth('twin', 'prefix-twin', qr/^235 /, "twin, prefix=x:, $k: 235",
        'smtp2');
    auth('twin', 'plain-twin', qr/^535 /,
        "twin, prefix=x:, $k: the unprefixed password 535", 'smtp2');
    auth('twin', 'redis2-twin', qr/^235 /, "twin, other Redis, $k: 235",
        'smtp3');
    auth('twin', 'plain-twin', qr/^535 /,
        "twin, other Redis, $k: the first Redis's password 535", 'smtp3');
}

# 4. AUTH LOGIN and CRAM-MD5 with cached users

for my $k (1 .. 2) {
    my $c = client();
    $c->cmd('AUTH LOGIN', qr/^334 /);
    $c->cmd(b64('login'), qr/^334 /);
    $c->cmd(b64('login-pw'), qr/^235 /, "AUTH LOGIN $k: 235");
    $c->cmd('QUIT', qr/^221 /);

    $c = client();
    $c->cmd('AUTH LOGIN ' . b64('login'), qr/^334 /);
    $c->cmd(b64('wrong'), qr/^535 /, "AUTH LOGIN $k, wrong: 535");
    $c->cmd('QUIT', qr/^221 /);

    $c = client();
    my $chal = $c->cmd('AUTH CRAM-MD5', qr/^334 /);
    $c->send(cram_md5_response('cram', 'cram-pw', $chal) . "\r\n");
    $c->expect(qr/^235 /, "CRAM-MD5 $k: 235");
    $c->cmd('QUIT', qr/^221 /);

    $c = client();
    $chal = $c->cmd('AUTH CRAM-MD5', qr/^334 /);
    $c->send(cram_md5_response('cram', 'wrong', $chal) . "\r\n");
    $c->expect(qr/^535 /, "CRAM-MD5 $k, wrong: 535");
    $c->cmd('QUIT', qr/^221 /);

    auth('crypt', 'crypt-pw', qr/^235 /, "crypt hash, PLAIN $k: 235");

    # a crypt hash cannot answer CRAM-MD5, whatever the client sends
    $c = client();
    $chal = $c->cmd('AUTH CRAM-MD5', qr/^334 /);
    $c->send(cram_md5_response('crypt', 'crypt-pw', $chal) . "\r\n");
    $c->expect(qr/^535 /, "CRAM-MD5 against a crypt hash $k: 535");
    $c->cmd('QUIT', qr/^221 /);
}

# 5. a cached user, Redis hanging on the counter: the client leaves, or
# pipelines QUIT or STARTTLS behind the AUTH; Redis answers later

auth('slow', 'slow-pw', qr/^235 /, 'slow: cached');
$r->stall();
my @gone;
for my $k (1 .. 3) {
    my $c = client();
    $c->send('AUTH PLAIN ' . b64("\0slow\0slow-pw") . "\r\n"
        . ($k == 2 ? "QUIT\r\n" : $k == 3 ? "STARTTLS\r\n" : ''));
    push @gone, $c;
}
sleep 0.3;
$_->close() for @gone;
sleep 0.3;
$r->resume();
auth('slow', 'slow-pw', qr/^235 /, 'slow: Redis answers again: 235');
auth('slow', 'wrong', qr/^535 /, 'slow: wrong password: 535');

$n->stop();
ok(error_log_clean($n), 'no alerts in the error log');
unlike(error_log($n), qr/exited on signal|core dumped/, 'no worker crashed');

done_testing();
