#!/usr/bin/perl

# Attacks on smtp_ext_redis_cache (SPEC 11): a full zone, reject and
# absence cached, a route changed in Redis, Redis killed with and
# without stale entries, pipelined RCPTs mixing hits and misses, exact
# metrics, two server{} blocks with different Redis, user: results
# cached, two workers, reloads with and without the directive.

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
my $r2 = start_redis(name => 'redis2');
my $b = start_backend(name => 'b',
    args => ['--caps', 'PIPELINING,ENHANCEDSTATUSCODES']);
my $bt = '127.0.0.1:' . $b->port;

$r->cmd('SET', 'domain:known.test', $bt);
$r->cmd('SET', 'rcpt:bad@known.test', 'reject');
$r->cmd('SET', 'domain:shared.test', $bt);
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');
for my $i (0 .. 299) {
    $r->cmd('SET', "domain:d$i.test", $bt) if $i % 2 == 0;
}

my $conf = <<'EOF';
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=1s;
    smtp_ext_redis_cache 32k valid=3s stale=1h;
    timeout 10s;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_auth plain;
        smtp_ext_auth_fail_limit 1000;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp2%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis2%% timeout=1s;
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

my $n = start_nginx($conf);


sub session {
    my ($port) = @_;
    my $c = smtp_client($port // 'smtp');
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    return $c;
}

sub rcpt {
    my ($to, $re, $name, $port) = @_;
    my $c = session($port);
    $c->cmd("RCPT TO:<$to>", $re, $name);
    $c->cmd('QUIT', qr/^221 /);
}

# pipelined RCPTs, replies read in order
sub pipeline {
    my ($c, @to) = @_;
    $c->send(join '', map { "RCPT TO:<$_>\r\n" } @to);
    my @codes;
    for (@to) {
        my $rep = $c->reply(10) // '';
        push @codes, $rep =~ /^(\d{3})/ ? $1 : 'none';
    }
    return @codes;
}

sub gets_of { scalar grep { /"GET"|"HGET/i } @_ }

# 1. reject, absence, route: exact metrics, exact Redis traffic

my $c0 = cache_counts();
$r->monitor_start();
rcpt('bad@known.test', qr/^550 5\.1\.1 /, 'reject from Redis');
rcpt('bad@known.test', qr/^550 5\.1\.1 /, 'reject from the cache');
rcpt('u@known.test', qr/^250 /, 'route from Redis');
rcpt('U@Known.Test', qr/^250 /, 'route from the cache, other case');
my @mon = $r->monitor_stop();
is(gets_of(@mon), 4, 'reject and route: Redis asked once each (2 keys)')
    or diag(join "\n", @mon);
is(cache_delta($c0, cache_counts()), 'hit=2 miss=2 stale=0', 'metrics exact');

# 2. pipelined RCPTs mixing cached and uncached, replies in order

$c0 = cache_counts();
my $c = session();
my @codes = pipeline($c, 'u@known.test', 'p1@d0.test', 'bad@known.test',
    'p2@d1.test', 'u@known.test', 'p3@d2.test');
is("@codes", '250 250 550 554 250 250', 'pipelined mix: replies in order');
$c->cmd('QUIT', qr/^221 /);
is(cache_delta($c0, cache_counts()), 'hit=3 miss=3 stale=0', 'pipelined: metrics exact');

# 3. a route changed in Redis is seen after valid

$r->cmd('SET', 'domain:known.test', '127.0.0.1:1');
rcpt('u@known.test', qr/^250 /, 'within valid: the cached route');
sleep 3.2;
rcpt('u@known.test', qr/^451 /, 'past valid: the new (dead) route');
$r->cmd('SET', 'domain:known.test', $bt);
sleep 3.2;
rcpt('u@known.test', qr/^250 /, 'route back after valid');

# 4. a full zone: LRU evicts, answers stay right

my $pid0 = $n->worker_pid();
my $wrong = 0;
for my $pass (1 .. 2) {
    # 8 a session: 4 relay denials stay under the bad-RCPT limit
    for my $batch (0 .. 36) {
        my @to = map { "x$_\@d$_.test" } ($batch * 8 .. $batch * 8 + 7);
        my $s = session();
        my @got = pipeline($s, @to);
        for my $k (0 .. $#to) {
            my ($i) = $to[$k] =~ /d(\d+)/;
            my $want = $i % 2 ? 554 : 250;
            $wrong++, diag("$to[$k]: $got[$k]") if $got[$k] ne $want;
        }
        $s->cmd('QUIT', qr/^221 /);
    }
}
is($wrong, 0, 'full zone: every answer right, two passes');
is($n->worker_pid(), $pid0, 'full zone: the worker lives');
rcpt('bad@known.test', qr/^550 5\.1\.1 /, 'after eviction: reject still');

# 5. two server{} blocks, two Redis, one prefix: no answer of the other

rcpt('u@shared.test', qr/^250 /, 'server 1: route in its Redis');
rcpt('u@shared.test', qr/^554 5\.7\.1 /,
    'server 2: its Redis has no such domain: 554, not server 1\'s route',
    'smtp2');

# 6. user: results cached (SPEC 11 names user:, domain:, rcpt:)

sub auth {
    my ($re, $name) = @_;
    my $a = smtp_client('smtp');
    $a->expect(qr/^220 /);
    $a->cmd('EHLO client.test', qr/^250 /m);
    $a->cmd('AUTH PLAIN ' . b64("\0alice\0secret"), $re, $name);
    $a->cmd('QUIT', qr/^221 /);
}

auth(qr/^235 /, 'AUTH: from Redis');
$r->monitor_start();
auth(qr/^235 /, 'AUTH again within valid');
my @mu = $r->monitor_stop();
# the authfail: counter is never cached: asked every time
is(scalar(grep { /user:alice/ } @mu), 0,
    'AUTH within valid: user: not asked again') or diag(join "\n", @mu);
is(scalar(grep { /"GET" "authfail:127\.0\.0\.1"/ } @mu), 1,
    'AUTH within valid: the failure counter asked') or diag(join "\n", @mu);

# 7. Redis killed: stale entries serve, others 451; user: stale too

rcpt('u@known.test', qr/^250 /, 'warm');
sleep 3.2;
$c0 = cache_counts();
$r->kill();
rcpt('u@known.test', qr/^250 /, 'Redis dead: stale route');
rcpt('bad@known.test', qr/^550 5\.1\.1 /, 'Redis dead: stale reject');
rcpt('never@never.test', qr/^451 4\.3\.0 /, 'Redis dead, nothing cached');
is(cache_delta($c0, cache_counts()), 'hit=0 miss=3 stale=2',
    'Redis dead: metrics (a stale use is also a miss)');
auth(qr/^235 /, 'Redis dead: AUTH from the stale user: entry');
$r->restart();
$r->cmd('SET', 'domain:known.test', $bt);
$r->cmd('SET', 'rcpt:bad@known.test', 'reject');

# 8. valid=0 stale=1h, two workers

my $conf0 = $conf;
$conf0 =~ s/valid=3s stale=1h/valid=0 stale=1h/;
$n->stop();
$n = start_nginx($conf0, workers => 2);
$c0 = cache_counts();
for (1 .. 4) { rcpt('u@known.test', qr/^250 /, "valid=0: $_") }
is(cache_counts()->{hit} - $c0->{hit}, 0, 'valid=0: never a hit');
$r->stall();
rcpt('u@known.test', qr/^250 /, 'valid=0 stale=1h, Redis silent: stale');
$r->resume();

# 9. reload: emptied; without the directive: no cache, still works

$n->reload($conf0);
sleep 1.5;
$r->stall();
rcpt('u@known.test', qr/^451 4\.3\.0 /, 'after reload: the cache is empty');
$r->resume();

my $nocache = $conf0;
$nocache =~ s/^\s*smtp_ext_redis_cache .*\n//m;
$n->reload($nocache);
sleep 1.5;
$c0 = cache_counts();
for (1 .. 4) { rcpt('u@known.test', qr/^250 /, "no cache: $_") }
rcpt('bad@known.test', qr/^550 5\.1\.1 /, 'no cache: reject');
is(cache_delta($c0, cache_counts()), 'hit=0 miss=0 stale=0', 'no cache: not counted');
$n->reload($conf);
sleep 1.5;
rcpt('u@known.test', qr/^250 /, 'cache back');
rcpt('u@known.test', qr/^250 /, 'cache back, hit');

ok(error_log_clean($n), 'no alerts in the error log')
    or diag(join "\n", grep { /alert|crit|emerg/ } split /\n/, $n->error_log);

$n->stop();
done_testing();

