#!/usr/bin/perl

# Hostile backends against keepalive reuse (SPEC 8): the RSET of a
# cached connection never answered, answered 421, or the client leaving
# while it is in flight.  The session must not hang, must not leak the
# backend socket, and a refused reuse is not the peer's failure.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(time sleep);
use SmtpExt::Test;

require_programs(nginx_bin());

my $stall = start_backend(name => 'st', args => ['--stall', 'rset']);
my $r421 = start_backend(name => 'r4',
    args => ['--rset-reply', '421 4.3.2 going down']);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;

    smtp_ext_upstream st {
        server 127.0.0.1:%%PORT_st%%;
        keepalive 4 timeout=30s;
    }
    smtp_ext_upstream r4 {
        server 127.0.0.1:%%PORT_r4%% max_fails=1 fail_timeout=60s;
        keepalive 4 timeout=30s;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp_st%%;
        protocol smtp_ext;
        smtp_ext_pass st;
        smtp_ext_connect_timeout 1s;
        timeout 10s;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp_r4%%;
        protocol smtp_ext;
        smtp_ext_pass r4;
        timeout 10s;
    }
}
EOF

sub session {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /, "$port: greeting");
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

sub one_message {
    my ($c, $rcpt, $name) = @_;
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /, "$name: MAIL");
    $c->cmd("RCPT TO:<$rcpt>", qr/^250 /, "$name: RCPT");
    $c->cmd('DATA', qr/^354 /, "$name: DATA");
    $c->send("hello\r\n.\r\n");
    $c->expect(qr/^250 2\.0\.0 /, "$name: end of data");
}

sub busy { scalar worker_busy_sockets($n) }

my $base = busy();

# 1. RSET never answered: bounded by smtp_ext_connect_timeout, then a new
# connection

my $c1 = session('smtp_st');
one_message($c1, 'a@d.test', 'st 1');
$c1->cmd('QUIT', qr/^221 /);

my $c2 = session('smtp_st');
$c2->cmd('MAIL FROM:<a@b.test>', qr/^250 /, 'st 2: MAIL');
my $t0 = time;
$c2->cmd('RCPT TO:<b@d.test>', qr/^250 /,
    'st 2: a stalled reuse RSET is given up, a new connection serves');
my $took = time - $t0;
ok($took < 3, "st 2: within the connect timeout (took $took s)");
$c2->cmd('DATA', qr/^354 /);
$c2->send("hello\r\n.\r\n");
$c2->expect(qr/^250 2\.0\.0 /, 'st 2: end of data');
$c2->cmd('QUIT', qr/^221 /);

# 2. the client leaves while the reuse RSET is in flight

my $c3 = session('smtp_st');
$c3->cmd('MAIL FROM:<a@b.test>', qr/^250 /, 'st 3: MAIL');
$c3->send("RCPT TO:<c\@d.test>\r\n");
ok(wait_for(sub { ($stall->log(2) // '') =~ /> RSET/ }, 3),
    'st 3: the reuse RSET reached the backend');
$c3->close();

ok(wait_for(sub { busy() <= $base }, 5),
    'st 3: no socket left after the client left during the reuse')
    or diag(join "\n", worker_busy_sockets($n));

# 3. RSET answered 421: a new connection, and the peer is not failed

my $d1 = session('smtp_r4');
one_message($d1, 'a@d.test', 'r4 1');
$d1->cmd('QUIT', qr/^221 /);

my $d2 = session('smtp_r4');
one_message($d2, 'b@d.test', 'r4 2 (cached RSET refused)');
$d2->cmd('QUIT', qr/^221 /);

my $d3 = session('smtp_r4');
one_message($d3, 'c@d.test', 'r4 3 (the peer is not marked failed)');
$d3->cmd('QUIT', qr/^221 /);

ok(wait_for(sub { busy() <= $base + 1 }, 5),
    'only the cached connection stays')
    or diag(join "\n", worker_busy_sockets($n));

ok(error_log_clean($n), 'no alert in the error log');

done_testing();
