#!/usr/bin/perl

# SPEC 11: "when Redis fails" includes a Redis that answers with an
# error (-LOADING while it restarts): cached users and routes answer,
# fresh or stale, as when it is down; what is not cached gets the usual
# 454 4.7.0 / 451 4.3.0.  Without a cache the same error is 454 / 451.
# A lying Redis (wrong types) is not a failure: 454, never a lifted
# failure limit from the cache.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
my $b = start_backend(name => 'b');
$r->cmd('SET', 'domain:known.test', '127.0.0.1:' . $b->port);
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');
$r->cmd('HSET', 'user:bob', 'password', '{PLAIN}pw');

my $h = start_hostile_redis($r);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_hostile%% timeout=1s;
    smtp_ext_redis_cache 64k valid=1s stale=1h;
    timeout 10s;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_auth plain;
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

sub client {
    my $c = smtp_client('smtp');
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

sub auth {
    my ($user, $pw, $re, $name) = @_;
    my $c = client();
    $c->cmd('AUTH PLAIN ' . b64("\0$user\0$pw"), $re, $name);
    $c->cmd('QUIT', qr/^221 /);
}

sub rcpt {
    my ($to, $re, $name) = @_;
    my $c = client();
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    $c->cmd("RCPT TO:<$to>", $re, $name);
    $c->cmd('QUIT', qr/^221 /);
}

# warm the cache through a Redis that behaves
auth('alice', 'secret', qr/^235 /, 'warm: alice');
rcpt('u@known.test', qr/^250 /, 'warm: known.test');

# -LOADING within valid: the fresh user entry answers (the counter's GET
# got the error)
$h->mode('loading');
auth('alice', 'secret', qr/^235 /, '-LOADING, fresh entry: 235');

# past valid: stale entries answer; nothing cached: temporary errors
sleep 1.2;
my $c0 = cache_counts();
auth('alice', 'secret', qr/^235 /, '-LOADING, stale user: 235');
auth('alice', 'wrong', qr/^535 5\.7\.8 /,
    '-LOADING, stale user, wrong password: 535');
auth('bob', 'pw', qr/^454 4\.7\.0 /, '-LOADING, user not cached: 454');
rcpt('u@known.test', qr/^250 /, '-LOADING, stale route: 250');
rcpt('u@other.test', qr/^451 4\.3\.0 /, '-LOADING, route not cached: 451');
is(cache_delta($c0, cache_counts()), 'hit=0 miss=5 stale=3',
    '-LOADING: three stale uses, two misses more');

# wrong types are a lie, not a failure: 454, not the cached answer
$h->mode('wrongtype');
auth('alice', 'secret', qr/^454 4\.7\.0 /, 'wrong types: 454');

# a Redis that behaves again: fresh answers
$h->mode('proxy');
ok(wait_for(sub {
    my $c = client();
    $c->send('AUTH PLAIN ' . b64("\0bob\0pw") . "\r\n");
    my $rep = $c->reply() // '';
    $c->close();
    return $rep =~ /^235 /;
}, 10), 'Redis behaves: bob from Redis');

$n->stop();
like(error_log($n), qr/Redis answered AUTH with an error: LOADING/,
    'the error logged');
like(error_log($n), qr/\[warn\].*user "alice" checked from the cache/,
    'the cached answer logged at warn');
ok(error_log_clean($n), 'no alerts');

done_testing();
