#!/usr/bin/perl

# SPEC 5 and 11: a session's memory does not grow with its AUTH attempts
# when users come from smtp_ext_redis_cache: 20,000 AUTHs of a cached user
# over the failure limit (the counter still read), then 20,000 wrong
# passwords against the stale entry with Redis dead (each failure's
# counter update fails at once), in one session each.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(time sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $BATCH = $ENV{SMTP_EXT_MEMORY_BATCH} || 20000;

my $r = start_redis();
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=1s;
    smtp_ext_redis_cache 64k valid=1s stale=1h;
    timeout 30s;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_auth plain;
        smtp_ext_auth_fail_limit 2 window=1h;
        max_errors 0;
    }
}
EOF

sub session {
    my $c = smtp_client('smtp', timeout => 30);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

# $count AUTH PLAIN lines in pipelined groups of 100; how many got $want
sub flood {
    my ($c, $pw, $count, $want) = @_;
    my $line = 'AUTH PLAIN ' . b64("\0alice\0$pw");
    my $ok = 0;
    for (my $done = 0; $done < $count; $done += 100) {
        my $got = $c->pipeline([($line) x 100], timeout => 30);
        $ok += grep { /$want/ } @$got;
        last if @$got < 100;
    }
    return $ok;
}

sub phase {
    my ($name, $pw, $want) = @_;
    my $c = session();
    flood($c, $pw, 200, $want);
    my $before = worker_rss($n);
    my $t0 = time;
    my $ok = flood($c, $pw, $BATCH, $want);
    my $after = worker_rss($n);
    diag(sprintf('%s: %d AUTHs in %.1f s, worker RSS %d -> %d kB (%+d kB)',
        $name, $BATCH, time - $t0, $before, $after, $after - $before));
    is($ok, $BATCH, "$name: every AUTH got $want");
    SKIP: {
        # ASan's quarantine keeps freed memory: RSS says nothing
        skip("$name: RSS under AddressSanitizer", 1) if is_asan();
        cmp_ok($after - $before, '<', 2048,
            "$name: worker grew by less than 2 MB");
    }
    $c->cmd('QUIT', qr/^221 /);
}

# cache the user, then go over the limit: the counter refuses every AUTH
my $c = session();
$c->cmd('AUTH PLAIN ' . b64("\0alice\0secret"), qr/^235 /, 'cached');
$c->cmd('QUIT', qr/^221 /);
$r->cmd('SET', 'authfail:127.0.0.1', 5);
phase('cached user over the limit', 'secret', qr/^454 4\.7\.0 /);

# Redis dead: the stale entry answers, every failure's INCR fails
$r->cmd('DEL', 'authfail:127.0.0.1');
sleep 1.1;
$r->kill();
phase('Redis dead, stale user, wrong password', 'wrong', qr/^535 5\.7\.8 /);

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
