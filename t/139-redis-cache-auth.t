#!/usr/bin/perl

# SPEC 11: user: results in smtp_ext_redis_cache.  A fresh entry saves
# the HMGET but never the authfail: counter, which is asked every time
# and still refuses over the limit; a wrong password is counted; a
# changed password or a disabled flag is seen after valid; with Redis
# dead a fresh or stale entry answers (the counter then unchecked), an
# unknown user gets 454; the user's route comes from the entry; CRAM-MD5
# from a cached {PLAIN}; a hash too long for an entry is asked every time.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use IO::Socket::INET;
use Time::HiRes qw(sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
my $b = start_backend(name => 'b');
my $bpool = start_backend(name => 'bpool');

$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');
$r->cmd('HSET', 'user:carol', 'password', '{PLAIN}cram-pw');
$r->cmd('HSET', 'user:routed', 'password', '{PLAIN}pw', 'route', 'other');
$r->cmd('HSET', 'user:long', 'password', '{PLAIN}' . ('x' x 300));
$r->cmd('HSET', 'user:gone', 'password', '{PLAIN}pw', 'disabled', '0');
$r->cmd('HSET', 'user:sha', 'password', hash_sha512('pw-sha'));

my $conf = <<'EOF';
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=1s;
    smtp_ext_redis_cache 64k valid=2s stale=6s;
    timeout 10s;

    smtp_ext_upstream other {
        server 127.0.0.1:%%PORT_bpool%%;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_auth plain login cram-md5;
        smtp_ext_auth_fail_limit 3 window=1h;
        smtp_ext_pass 127.0.0.1:%%PORT_b%%;
    }
}
http {
    access_log off;
    server {
        listen 127.0.0.1:%%PORT_http%%;
        location = /metrics { smtp_ext_status; }
    }
}
EOF

my $n = start_nginx($conf, workers => 2);


sub client {
    my $c = smtp_client('smtp');
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

# AUTH PLAIN in a session of its own; returns the session when $keep
sub auth {
    my ($user, $pw, $re, $name, $keep) = @_;
    my $c = client();
    $c->cmd('AUTH PLAIN ' . b64("\0$user\0$pw"), $re, $name);
    return $c if $keep;
    $c->cmd('QUIT', qr/^221 /);
    return undef;
}

sub user_reads { scalar grep { /"HMGET" "user:/ } @_ }
sub counter_reads { scalar grep { /"GET" "authfail:/ } @_ }

# 1. the second AUTH within valid: no HMGET, the counter still asked

my $c0 = cache_counts();
$r->monitor_start();
auth('alice', 'secret', qr/^235 /, 'first AUTH: from Redis');
auth('alice', 'secret', qr/^235 /, 'second AUTH: user from the cache');
auth('alice', 'secret', qr/^235 /, 'third AUTH: user from the cache');
my @mon = $r->monitor_stop();
is(user_reads(@mon), 1, 'user:alice read from Redis once')
    or diag(join "\n", @mon);
is(counter_reads(@mon), 3, 'the failure counter read every time');
is(cache_delta($c0, cache_counts()), 'hit=2 miss=1 stale=0', 'metrics: 2 hits, 1 miss');

# 2. a wrong password against a cached user: 535, counted in Redis; over
# the limit the cached user gets 454, the right password included

$r->monitor_start();
auth('alice', 'wrong', qr/^535 5\.7\.8 /, 'cached user, wrong password: 535');
@mon = $r->monitor_stop();
is(scalar(grep { /"INCR" "authfail:127\.0\.0\.1"/ } @mon), 1,
    'the failure counted in Redis') or diag(join "\n", @mon);
$r->cmd('SET', 'authfail:127.0.0.1', 3);
auth('alice', 'secret', qr/^454 4\.7\.0 /,
    'over the limit, cached user, right password: 454');
$r->cmd('DEL', 'authfail:127.0.0.1');
auth('alice', 'secret', qr/^235 /, 'counter gone: 235 again');

# 3. the user's route from the cache: the recipient goes to its pool

for my $k (1 .. 2) {
    my $c = auth('routed', 'pw', qr/^235 /, "routed user, AUTH $k", 1);
    $c->cmd('MAIL FROM:<routed@b.test>', qr/^250 /);
    $c->cmd('RCPT TO:<x@anywhere.test>', qr/^250 /,
        "routed user, AUTH $k: relaying allowed");
    $c->cmd('QUIT', qr/^221 /);
}
ok($bpool->wait_closed(2), 'routed user: the route\'s pool got the '
    . 'second session too');
is($b->connections, 0, 'routed user: nothing went to smtp_ext_pass');

# 4. CRAM-MD5 from a cached {PLAIN}

for my $k (1 .. 2) {
    my $c = client();
    my $chal = $c->cmd('AUTH CRAM-MD5', qr/^334 /);
    $c->send(cram_md5_response('carol', 'cram-pw', $chal) . "\r\n");
    $c->expect(qr/^235 /, "CRAM-MD5 $k");
    $c->cmd('QUIT', qr/^221 /);
}

# 5. a hash too long for an entry: asked every time, still works

$r->monitor_start();
auth('long', 'x' x 300, qr/^235 /, 'long hash: 235') for 1 .. 2;
@mon = $r->monitor_stop();
is(user_reads(@mon), 2, 'long hash: never cached');

# 6. crypt hash from the cache

auth('sha', 'pw-sha', qr/^235 /, '$6$ from Redis');
auth('sha', 'pw-sha', qr/^235 /, '$6$ from the cache');
auth('sha', 'wrong', qr/^535 /, '$6$ from the cache, wrong password');

# 7. a changed password and a disabled flag: seen after valid

auth('gone', 'pw', qr/^235 /, 'gone: cached');
$r->cmd('HSET', 'user:gone', 'disabled', '1');
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}new');
auth('gone', 'pw', qr/^235 /, 'disabled in Redis, within valid: cached');
auth('alice', 'secret', qr/^235 /, 'new password, within valid: the old');
sleep 2.2;
auth('gone', 'pw', qr/^535 /, 'disabled, after valid: 535');
auth('alice', 'secret', qr/^535 /, 'after valid: the old password 535');
$r->cmd('DEL', 'authfail:127.0.0.1');
auth('alice', 'new', qr/^235 /, 'after valid: the new password 235');

# 8. Redis dead: a cached user answers, fresh or stale (the counter then
# unchecked), a wrong password still 535, an unknown user 454; past
# stale, 454

$r->kill();
$c0 = cache_counts();
auth('alice', 'new', qr/^235 /, 'Redis dead: fresh cached user: 235');
is(cache_delta($c0, cache_counts()), 'hit=1 miss=0 stale=0',
    'Redis dead, fresh entry: a hit');
sleep 2.2;
$c0 = cache_counts();
auth('alice', 'new', qr/^235 /, 'Redis dead: stale cached user: 235');
auth('alice', 'secret', qr/^535 5\.7\.8 /,
    'Redis dead: stale cached user, wrong password: 535');
auth('nobody', 'x', qr/^454 4\.7\.0 /, 'Redis dead: unknown user: 454');
is(cache_delta($c0, cache_counts()), 'hit=0 miss=3 stale=2',
    'Redis dead: a stale use is a miss and a stale');
sleep 6.2;
auth('alice', 'new', qr/^454 4\.7\.0 /, 'Redis dead, past stale: 454');
# restarted empty: the user again, then AUTH works once reconnected
$r->restart();
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}new');
my $back = wait_for(sub {
    my $c = client();
    $c->send('AUTH PLAIN ' . b64("\0alice\0new") . "\r\n");
    my $rep = $c->reply() // '';
    $c->close();
    return $rep =~ /^235 /;
}, 10);
ok($back, 'Redis back: 235');

$n->stop();
like(error_log($n), qr/\[warn\].*Redis failed, user "alice" checked from the cache without the failure counter/,
    'Redis dead: the cached answer logged at warn');
ok(error_log_clean($n), 'no alerts in the error log');

done_testing();
