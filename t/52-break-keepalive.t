#!/usr/bin/perl

# Breaks of keepalive (SPEC 8): a cached backend connection taken by a
# server whose settings differ from the one that made it.
#
#  1. a server with "smtp_ext_xclient off" takes a connection that another
#     server XCLIENTed: RSET only, so the new client runs under the last
#     client's XCLIENT identity (ADDR, HELO, LOGIN) at the backend;
#  2. a server with "smtp_ext_proxy_protocol on", routed by Redis to a
#     keepalive pool, takes a cached connection: no PROXY header for it
#     (directives.md says such a route "gets a connection per
#     transaction, never a cached one");
#  3. max_conns=1 and keepalive: a connection cached by a server of
#     another TLS policy is never usable by this one but holds the
#     peer's only slot: 451 4.4.5 until the keepalive timeout.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use MIME::Base64 qw(encode_base64);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');
$r->cmd('SET', 'domain:pp.test', 'ka');

my %b = map { $_ => start_backend(name => $_) } qw(ka mc);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;

    smtp_ext_upstream ka {
        server 127.0.0.1:%%PORT_ka%%;
        keepalive 4 timeout=30s;
    }
    smtp_ext_upstream other {
        server 127.0.0.1:%%PORT_mc%%;
    }
    smtp_ext_upstream mc {
        server 127.0.0.1:%%PORT_mc%% max_conns=1;
        keepalive 4 timeout=30s;
    }

    # XCLIENT on (default), AUTH against Redis
    server {
        listen 127.0.0.1:%%PORT_smtp_a%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;
        smtp_ext_auth plain;
        smtp_ext_pass ka;
        timeout 10s;
    }

    # the same pool without XCLIENT
    server {
        listen 127.0.0.1:%%PORT_smtp_b%%;
        protocol smtp_ext;
        smtp_ext_xclient off;
        smtp_ext_pass ka;
        timeout 10s;
    }

    # PROXY header; its static pool has no keepalive (nginx -t passes),
    # Redis routes pp.test to the keepalive pool
    server {
        listen 127.0.0.1:%%PORT_smtp_c%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;
        smtp_ext_proxy_protocol on;
        smtp_ext_pass other;
        timeout 10s;
    }

    # max_conns=1 with keepalive, two TLS policies
    server {
        listen 127.0.0.1:%%PORT_smtp_d%%;
        protocol smtp_ext;
        smtp_ext_pass mc;
        timeout 10s;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp_e%%;
        protocol smtp_ext;
        smtp_ext_upstream_tls on;
        smtp_ext_pass mc;
        timeout 10s;
    }
}
EOF

sub session {
    my ($port, $helo) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /, "$port: greeting");
    $c->cmd('EHLO ' . $helo, qr/^250 /m);
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

# 1. alice authenticates on A, her connection is cached, B's client takes it

my $a = session('smtp_a', 'alice.test');
$a->cmd('AUTH PLAIN ' . encode_base64("\0alice\0secret", ''),
    qr/^235 /, 'A: alice authenticated');
one_message($a, 'x@d.test', 'A');
$a->cmd('QUIT', qr/^221 /);

my $c = session('smtp_b', 'mallory.test');
one_message($c, 'y@d.test', 'B');
$c->cmd('QUIT', qr/^221 /);

my $conns = $b{ka}->connections;
my $raw = join '', map { $b{ka}->raw($_) // '' } 1 .. $conns;
like($raw, qr/XCLIENT [^\r\n]*LOGIN=alice/, 'A: XCLIENT LOGIN=alice sent');

# after alice's message, the next MAIL on the same connection must not run
# under her XCLIENT identity: either a new connection, or a new XCLIENT

my $one = $b{ka}->raw(1) // '';
my ($after) = $one =~ /\r\n\.\r\n(.*)\z/s;
$after //= '';
ok($after eq '' || $after =~ /^RSET\r\nXCLIENT [^\r\n]*\r\nEHLO /,
    'B: a reused connection is never left with the last client\'s '
    . 'XCLIENT LOGIN/ADDR/HELO (smtp_ext_xclient off server)')
    or diag("connection 1 after alice's dot:\n$after");

# 2. PROXY header server, routed to the keepalive pool

my $k = session('smtp_b', 'k.test');
one_message($k, 'z@d.test', 'B again');     # a connection is cached again
$k->cmd('QUIT', qr/^221 /);
my $before = $b{ka}->connections;

my $p = smtp_client('smtp_c');
$p->expect(qr/^220 /, 'C: greeting');
$p->cmd('EHLO proxied.test', qr/^250 /m);
one_message($p, 'u@pp.test', 'C');
$p->cmd('QUIT', qr/^221 /);

my $got = $b{ka}->connections;
my $fresh = $got > $before ? ($b{ka}->raw($got) // '') : '';
ok($got > $before && $fresh =~ /^PROXY TCP4 /,
    'C: a PROXY-header server routed to a keepalive pool gets a new '
    . 'connection with its PROXY header, never a cached one')
    or diag("connections $before -> $got; the message went over a "
    . 'cached connection without a PROXY header');

# 3. max_conns=1 + keepalive across TLS policies

my $d = session('smtp_d', 'd.test');
one_message($d, 'v@d.test', 'D');
$d->cmd('QUIT', qr/^221 /);

my $e = session('smtp_e', 'e.test');
$e->cmd('MAIL FROM:<a@b.test>', qr/^250 /, 'E: MAIL');
$e->cmd('RCPT TO:<w@d.test>', qr/^250 /,
    'E: the peer\'s only slot is not held by an idle cached connection '
    . 'E may not use (else 451 until the keepalive timeout)');
$e->cmd('QUIT', qr/^221 /);

ok(error_log_clean($n), 'no alert in the error log');

done_testing();
