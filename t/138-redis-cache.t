#!/usr/bin/perl

# SPEC 11: smtp_ext_redis_cache: a fresh result is used without asking
# Redis (absence too), a stale one only when Redis fails, valid=0 always
# asks, counted in smtp_ext_redis_cache_total.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use IO::Socket::INET;
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
my $b = start_backend(name => 'b',
    args => ['--caps', 'PIPELINING,ENHANCEDSTATUSCODES']);

$r->cmd('SET', 'domain:known.test', '127.0.0.1:' . $b->port);

my $conf = <<'EOF';
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=1s;
    smtp_ext_redis_cache 1m valid=2s stale=1h;
    timeout 10s;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
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


sub rcpt {
    my ($to, $re, $name) = @_;
    my $c = smtp_client('smtp');
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    $c->cmd("RCPT TO:<$to>", $re, $name);
    $c->cmd('QUIT', qr/^221 /);
}

sub gets_of {
    my (@lines) = @_;
    return scalar grep { /"GET"/ } @lines;
}

my $c0 = cache_counts();

$r->monitor_start();
rcpt('u@known.test', qr/^250 /, 'first RCPT: asks Redis');
rcpt('u@known.test', qr/^250 /, 'again within valid: from the cache');
rcpt('v@unknown.test', qr/^554 5\.7\.1 /, 'unknown domain: 554');
rcpt('v@unknown.test', qr/^554 5\.7\.1 /, 'again: absence from the cache');
my @mon = $r->monitor_stop();
is(gets_of(@mon), 4, 'Redis asked only the first time for each (2 keys)')
    or diag(join "\n", @mon);

my $c1 = cache_counts();
is(($c1->{hit} // 0) - ($c0->{hit} // 0), 2, 'metrics: 2 hits');
is(($c1->{miss} // 0) - ($c0->{miss} // 0), 2, 'metrics: 2 misses');

# past valid: asked again, then Redis goes away: stale results serve

sleep 2.2;
$r->monitor_start();
rcpt('u@known.test', qr/^250 /, 'past valid: asks Redis again');
my @mon2 = $r->monitor_stop();
is(gets_of(@mon2), 2, 'past valid: the keys are asked again');

sleep 2.2;
$r->stall();
rcpt('u@known.test', qr/^250 /, 'Redis silent: routed from the stale cache');
rcpt('v@unknown.test', qr/^554 5\.7\.1 /,
    'Redis silent: a cached absence is stale too');
rcpt('w@never.test', qr/^451 4\.3\.0 /,
    'Redis silent, nothing cached: 451 4.3.0');
$r->resume();

my $c2 = cache_counts();
is(($c2->{stale} // 0) - ($c1->{stale} // 0), 2, 'metrics: 2 stale uses');
like($n->error_log, qr/recipient routed from the cache/,
    'a stale use is logged');

# valid=0: always asks; a reload empties the cache

my $conf0 = $conf;
$conf0 =~ s/valid=2s stale=1h/valid=0/;
$n->reload($conf0);
sleep 1.5;

$r->monitor_start();
rcpt('u@known.test', qr/^250 /, 'valid=0: fine');
rcpt('u@known.test', qr/^250 /, 'valid=0: fine again');
my @mon3 = $r->monitor_stop();
is(gets_of(@mon3), 4, 'valid=0: Redis asked every time');

$r->stall();
rcpt('u@known.test', qr/^451 4\.3\.0 /,
    'valid=0 without stale: Redis silent gives 451');
$r->resume();

# nginx -t

my ($rc, $out) = nginx_t(<<'EOF');
mail {
    smtp_ext_redis 127.0.0.1:1;
    smtp_ext_redis_cache 1k;
    server {
        listen 127.0.0.1:%%PORT_t%%;
        protocol smtp_ext;
    }
}
EOF
isnt($rc, 0, 'nginx -t: a too small cache');
like($out, qr/invalid smtp_ext_redis_cache size/, 'says so');

ok(error_log_clean($n), 'no alerts in the error log');

$n->stop();
done_testing();
