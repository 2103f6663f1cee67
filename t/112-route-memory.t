#!/usr/bin/perl

# A session's memory does not grow with the commands it sends (SPEC §5):
# 20,000 RCPTs refused in one session (rcpt:...=reject 550s, and 452s for
# recipients routed elsewhere, over 2,000 distinct IP:port routes, more
# than a worker caches) and 20,000 AUTHs answered 454 (Redis stopped, and
# over smtp_ext_auth_fail_limit) each grow the worker's RSS by less than
# 1 MB (AUTH: 512 kB).  IP:port routes still work after the cache has
# turned over.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;
use SmtpExt::Redis;
use Time::HiRes qw(time);

require_programs(nginx_bin(), redis_bin());

my $N = $ENV{SMTP_EXT_MEMORY_N} || 20000;
my $WARMUP = 2000;
my $TARGETS = 2000;         # distinct IP:port routes, over the cache's 256
my $MAX_GROWTH = 1024;      # kB
my $MAX_AUTH_GROWTH = 512;  # nothing of session.c's in AUTH: tighter

my $r = start_redis();
my $r2 = start_redis(name => 'redis2');
my $b1 = start_backend(name => 'b1');
my $b2 = start_backend(name => 'b2');

$r->cmd('SET', 'domain:a.test', 'pool1');
$r->cmd('SET', 'domain:b.test', '127.0.0.1:' . $b2->port);
$r->cmd('SET', 'rcpt:bounce@a.test', 'reject');
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');

# rcpt:uI@many.test -> 127.0.0.1:PORT; nothing is ever sent there (452)
{
    my $s = $r->connect();
    my $buf = '';
    for my $i (0 .. $TARGETS - 1) {
        print $s SmtpExt::Redis::encode('SET', "rcpt:u$i\@many.test",
            '127.0.0.1:' . (20000 + $i));
    }
    for (0 .. $TARGETS - 1) {
        SmtpExt::Redis::read_reply($s, \$buf, time + 10);
    }
    close $s;
}
is($r->cmd('GET', 'rcpt:u1999@many.test'), '127.0.0.1:21999',
    "$TARGETS IP:port routes in Redis");

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;

    smtp_ext_upstream pool1 {
        server 127.0.0.1:%%PORT_b1%%;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass pool1;
        smtp_ext_auth plain;
        smtp_ext_auth_fail_limit 3;
        max_errors 0;
        timeout 60s;
    }

    server {
        listen 127.0.0.1:%%PORT_dead%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis2%% timeout=500ms;
        smtp_ext_pass pool1;
        smtp_ext_auth plain login;
        max_errors 0;
        timeout 60s;
    }
}
EOF

sub session {
    my ($port) = @_;
    my $c = smtp_client($port, timeout => 30);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 HELP\r\n\z/m);
    return $c;
}

# $count commands from $line->(i), 200 at a time; the number of replies
# that matched $re (the first mismatch is shown)
sub batch {
    my ($c, $count, $line, $re) = @_;
    my ($good, $i, $shown) = (0, 0, 0);
    while ($i < $count) {
        my $k = $count - $i < 200 ? $count - $i : 200;
        $c->send(join '', map { $line->($i + $_) . "\r\n" } 0 .. $k - 1);
        for (1 .. $k) {
            my $rep = $c->reply() // '<no reply>';
            if ($rep =~ $re) {
                $good++;
            } elsif (!$shown++) {
                diag("unexpected reply: $rep");
            }
        }
        $i += $k;
    }
    return $good;
}

# RSS growth over $N commands, after $WARMUP of the same
sub growth {
    my ($what, $c, $line, $re, $max) = @_;
    is(batch($c, $WARMUP, $line, $re), $WARMUP, "$what: $WARMUP warm-up");
    my $before = worker_rss($n);
    is(batch($c, $N, $line, $re), $N, "$what: $N replies");
    my $after = worker_rss($n);
    my $g = $after - $before;
    diag("$what: RSS $before kB -> $after kB, +$g kB over $N");
  SKIP: {
        # ASan's quarantine and valgrind keep what is freed
        skip "$what: RSS bound under a sanitizer", 1
            if ($ENV{NGINX_BIN} // '') =~ /asan|valgrind/
                || $ENV{SMTP_EXT_VALGRIND};
        cmp_ok($g, '<', $max, "$what: RSS growth under $max kB");
    }
}

# Every session stays open to the end, so that none can reuse memory
# that an earlier one freed and hide its own growth.

# --- AUTH over the failure limit: 454

$r->cmd('SET', 'authfail:127.0.0.1', '1000000', 'EX', '600');
my $ca = session('smtp');
growth('AUTH 454 over the limit', $ca,
    sub { 'AUTH PLAIN ' . b64("\0alice\0secret") },
    qr/^454 4\.7\.0 Too many authentication failures/, $MAX_AUTH_GROWTH);
$ca->cmd('MAIL FROM:<s@x.test>', qr/^250 /);
$ca->cmd('RCPT TO:<x@elsewhere.test>', qr/^554 5\.7\.1 /,
    'still unauthenticated');

# --- AUTH with Redis stopped: 454

$r2->kill();
my $cb = session('dead');
growth('AUTH 454 Redis stopped', $cb,
    sub { 'AUTH PLAIN ' . b64("\0alice\0secret") },
    qr/^454 4\.7\.0 Temporary authentication failure\r\n\z/,
    $MAX_AUTH_GROWTH);

# --- RCPT refused by rcpt:...=reject, one transaction

my $c1 = session('smtp');
$c1->cmd('MAIL FROM:<s@x.test>', qr/^250 /);
growth('RCPT 550 reject', $c1, sub { 'RCPT TO:<bounce@a.test>' },
    qr/^550 5\.1\.1 /, $MAX_GROWTH);

# --- RCPT routed elsewhere than the transaction's backend: 452

my $c = session('smtp');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 /);
$c->cmd('RCPT TO:<first@a.test>', qr/^250 2\.1\.5 /, 'first RCPT to pool1');
growth('RCPT 452 elsewhere', $c,
    sub { 'RCPT TO:<u' . ($_[0] % $TARGETS) . '@many.test>' },
    qr/^452 4\.5\.3 /, $MAX_GROWTH);

# the transaction still goes to b1, a new one to an IP:port route after
# the cache has turned over
$c->cmd('DATA', qr/^354 /);
$c->send("one\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /, 'message to pool1');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 /);
$c->cmd('RCPT TO:<x@b.test>', qr/^250 2\.1\.5 /,
    'RCPT to an IP:port route after the cache turned over');
$c->cmd('DATA', qr/^354 /);
$c->send("two\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /, 'message to the IP:port route');
$_->cmd('QUIT', qr/^221 /) for $ca, $cb, $c1, $c;

# more run-time routes in one session than it holds at once, with a
# backend connection open on one of them: 12 routes where nothing listens
# (451) between transactions to b2's IP:port route (250)

my @dead = map { SmtpExt::Test::port("dead$_") } 0 .. 11;
$r->cmd('SET', "rcpt:d$_\@dead.test", "127.0.0.1:$dead[$_]") for 0 .. 11;
$c = session('smtp');
my ($ok451, $ok250) = (0, 0);
for my $i (0 .. 11) {
    $c->send("MAIL FROM:<s\@x.test>\r\nRCPT TO:<x\@b.test>\r\nRSET\r\n"
        . "MAIL FROM:<s\@x.test>\r\nRCPT TO:<d$i\@dead.test>\r\nRSET\r\n");
    my @rep = map { $c->reply() // '' } 1 .. 6;
    $ok250++ if $rep[1] =~ /^250 2\.1\.5 /;
    $ok451++ if $rep[4] =~ /^451 4\.4\.\d /;
    diag("d$i: $rep[1]$rep[4]") unless $rep[1] =~ /^250/ && $rep[4] =~ /^451/;
}
is($ok250, 12, 'b2 route taken between the others');
is($ok451, 12, 'routes to nothing: 451 4.4.x');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 /);
$c->cmd('RCPT TO:<x@b.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send("three\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /, 'message to b2 after the churn');
$c->cmd('QUIT', qr/^221 /);
ok(wait_for(sub { grep { /^three\r\n/ } $b2->messages() }, 5),
    'b2 got the third message');
ok(wait_for(sub { grep { /^two\r\n/ } $b2->messages() }, 5),
    'b2 got the second message');
is(scalar(grep { /^one\r\n/ } $b1->messages()), 1,
    'b1 got the first message');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
