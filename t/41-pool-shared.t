#!/usr/bin/perl

# SPEC 8: "zone" (peer state shared by the workers of a node, kept across
# reloads), "max_conns", "keepalive"; the nginx -t errors of pools.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my %b;
$b{$_} = start_backend(name => $_) for qw(good mc ka kb);
$b{bad} = start_backend(name => 'bad',
    args => ['--greeting', '421 4.3.2 Service shutting down']);

my $conf = <<'EOF';
mail {
    server_name mx.test;

    smtp_ext_upstream shared {
        zone shared 64k;
        server 127.0.0.1:%%PORT_bad%% max_fails=1 fail_timeout=60s;
        server 127.0.0.1:%%PORT_good%%;
    }
    smtp_ext_upstream limited {
        zone limited;
        server 127.0.0.1:%%PORT_mc%% max_conns=1;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass shared;
        timeout 10s;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp_mc%%;
        protocol smtp_ext;
        smtp_ext_pass limited;
        timeout 10s;
    }
}
EOF

my $n = start_nginx($conf, workers => 2);

sub session {
    my ($port, $helo) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 mx\.test ESMTP\r\n\z/, 'greeting');
    $c->cmd('EHLO ' . ($helo // 'client.test'), qr/^250 /m);
    return $c;
}

sub one_message {
    my ($c, $rcpt) = @_;
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd("RCPT TO:<$rcpt>", qr/^250 /);
    $c->cmd('DATA', qr/^354 /);
    $c->send("hello\r\n.\r\n");
    $c->expect(qr/^250 2\.0\.0 /);
}

# zone: the node, not each worker, learns that "bad" fails; 12 sessions
# spread over 2 workers reach it once within its fail_timeout

for my $i (1 .. 12) {
    my $c = session('smtp');
    one_message($c, "r$i\@d.test");
    $c->cmd('QUIT', qr/^221 /);
}

is($b{bad}->connections, 1,
    'zone: the failing peer is tried once by the node');
is($b{good}->connections, 12, 'zone: the good peer took every session');

# the state survives a reload of the same pool

$n->reload($conf, workers => 2);
sleep 1;

for my $i (1 .. 4) {
    my $c = session('smtp');
    one_message($c, "s$i\@d.test");
    $c->cmd('QUIT', qr/^221 /);
}

is($b{bad}->connections, 1,
    'zone: after a reload the failing peer is still known as failed');

# max_conns=1: a second transaction at once gets 451 4.4.5

my $c1 = session('smtp_mc');
$c1->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c1->cmd('RCPT TO:<x@d.test>', qr/^250 /, 'max_conns: the first one');

my $c2 = session('smtp_mc');
$c2->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c2->cmd('RCPT TO:<y@d.test>', qr/^451 4\.4\.5 Backends busy/,
    'max_conns: 451 4.4.5 while the peer is at its limit');
$c2->cmd('RSET', qr/^250 /);

$c1->cmd('QUIT', qr/^221 /);
ok($b{mc}->wait_closed(1), 'max_conns: the first connection closed');

$c2->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c2->cmd('RCPT TO:<y@d.test>', qr/^250 /, 'max_conns: free again');
$c2->cmd('QUIT', qr/^221 /);
is($b{mc}->connections, 2, 'max_conns: the busy one was never connected');

# keepalive (a per-worker cache: one worker here)

my $nk = start_nginx(<<'EOF');
mail {
    server_name mx.test;

    smtp_ext_upstream cached {
        zone cached;
        server 127.0.0.1:%%PORT_ka%%;
        keepalive 4 timeout=30s;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp_ka%%;
        protocol smtp_ext;
        smtp_ext_pass cached;
        timeout 10s;
    }
}
EOF

# keepalive: the connection follows the transaction, not the session;
# a new client gets RSET, its own XCLIENT (LOGIN and HELO of nobody
# else), then EHLO

my $k1 = session('smtp_ka', 'first.test');
one_message($k1, 'k1@d.test');

# k1 stays connected and idle: its backend connection is free

my $k2 = session('smtp_ka', 'second.test');
my $port2 = $k2->sock->sockport;
one_message($k2, 'k2@d.test');

is($b{ka}->connections, 1,
    'keepalive: one backend connection for two client sessions')
    or diag(join "\n", map { $b{ka}->raw($_) // '' }
                       1 .. $b{ka}->connections);

my $raw = $b{ka}->raw(1) // '';
like($raw, qr/\r\nDATA\r\nhello\r\n\.\r\nRSET\r\nXCLIENT ADDR=127\.0\.0\.1 PORT=$port2 HELO=second\.test NAME=\[UNAVAILABLE\] PROTO=ESMTP LOGIN=\[UNAVAILABLE\]\r\nEHLO second\.test\r\nMAIL FROM:<a\@b\.test>\r\n/,
    'keepalive: RSET, a fresh XCLIENT and EHLO before the reuse');

$k1->cmd('QUIT', qr/^221 /);
$k2->cmd('QUIT', qr/^221 /);
ok(!$b{ka}->closed(1), 'keepalive: the connection stays open, idle');

# nginx -t

my ($rc, $out) = nginx_t(<<'EOF');
mail {
    smtp_ext_upstream hc {
        server 127.0.0.1:1;
        health_check interval=1s;
    }
    server {
        listen 127.0.0.1:%%PORT_t1%%;
        protocol smtp_ext;
        smtp_ext_pass hc;
    }
}
EOF
isnt($rc, 0, 'nginx -t: health_check without zone');
like($out, qr/"health_check" in smtp_ext_upstream "hc" needs a "zone"/,
    'nginx -t: names the pool');

($rc, $out) = nginx_t(<<'EOF');
mail {
    smtp_ext_upstream ka {
        server 127.0.0.1:1;
        keepalive 8;
    }
    server {
        listen 127.0.0.1:%%PORT_t2%%;
        protocol smtp_ext;
        smtp_ext_pass ka;
        smtp_ext_proxy_protocol on;
    }
}
EOF
isnt($rc, 0, 'nginx -t: keepalive with smtp_ext_proxy_protocol');
like($out, qr/"keepalive" in smtp_ext_upstream "ka" cannot be used with "smtp_ext_proxy_protocol on"/,
    'nginx -t: says why');

($rc, $out) = nginx_t(<<'EOF');
mail {
    smtp_ext_upstream z {
        zone z 1k;
        server 127.0.0.1:1;
    }
    server {
        listen 127.0.0.1:%%PORT_t3%%;
        protocol smtp_ext;
        smtp_ext_pass z;
    }
}
EOF
isnt($rc, 0, 'nginx -t: a too small zone');
like($out, qr/zone "z" is too small/, 'nginx -t: says so');

ok(error_log_clean($n), 'no alerts in the error log');
ok(error_log_clean($nk), 'no alerts in the error log (keepalive)');

# graceful shutdown: idle cached connections get QUIT

kill 'QUIT', $nk->pid;
ok($b{ka}->wait_closed(1), 'keepalive: closed at nginx -s quit');
like($b{ka}->raw(1) // '', qr/\.\r\nQUIT\r\n\z/, 'keepalive: with QUIT');
$nk->stop();

$n->stop();
done_testing();
