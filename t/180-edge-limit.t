#!/usr/bin/perl

# Edge protection at connect (SPEC §10): smtp_ext_limit_conn across two
# workers, per client address, released however a session ends;
# smtp_ext_limit_exempt; smtp_ext_greeting_delay and pregreet, on plain,
# PROXY protocol and implicit TLS ports; nginx -t errors.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(time sleep);
use SmtpExt::Test;

require_programs(nginx_bin(), 'openssl');

my ($crt, $key) = gen_cert('mx.test');
my $b1 = start_backend(name => 'b1');

my $n = start_nginx(<<"EOF", workers => 2);
mail {
    server_name mx.test;
    ssl_certificate $crt;
    ssl_certificate_key $key;
    smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    smtp_ext_limit_exempt 127.0.0.4 ::1/128;

    server {
        listen 127.0.0.1:%%PORT_lim%%;
        protocol smtp_ext;
        smtp_ext_limit_conn 2;
        timeout 2s;
    }
    server {
        listen 127.0.0.1:%%PORT_delay%%;
        protocol smtp_ext;
        smtp_ext_greeting_delay 1s;
    }
    server {
        listen 127.0.0.1:%%PORT_pp%% proxy_protocol;
        protocol smtp_ext;
        set_real_ip_from 127.0.0.1;
        smtp_ext_limit_conn 1;
        smtp_ext_greeting_delay 500ms;
        smtp_ext_limit_exempt 192.0.2.99;
    }
    server {
        listen 127.0.0.1:%%PORT_lp%%;
        protocol smtp_ext;
        smtp_ext_limit_conn 1;
        smtp_ext_greeting_delay 300ms;
    }
    server {
        listen 127.0.0.1:%%PORT_tls%% ssl;
        protocol smtp_ext;
        smtp_ext_greeting_delay 1s;
    }
}
EOF

my $greeting = qr/^220 mx\.test ESMTP\r\n\z/;
my $too_many = "421 4.7.0 Too many connections from your address\r\n";
my $pregreet = "554 5.5.1 Protocol error: talking before the greeting\r\n";

sub client {
    my ($port, $local, %opt) = @_;
    return smtp_client($port, local => $local, %opt);
}

# the reply and then the end of the connection
sub refused {
    my ($c, $want, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    is($c->reply(), $want, $name);
    ok(!defined $c->reply(2), "$name: then closed");
}

# --- limit_conn ---------------------------------------------------------

my @a = map { client('lim', '127.0.0.2') } 1 .. 2;
like($_->reply(), $greeting, 'sessions 1 and 2 from 127.0.0.2') for @a;

my $x = client('lim', '127.0.0.2');
refused($x, $too_many, 'session 3 from 127.0.0.2');

# other addresses have their own count
my @b = map { client('lim', '127.0.0.3') } 1 .. 2;
like($_->reply(), $greeting, '127.0.0.3 counts apart') for @b;

# a refused session never counted: one QUIT frees exactly one slot
# (the connection lasts until the client closes it after the 221)
$a[0]->cmd('QUIT', qr/^221 /);
$a[0]->sock->close;
sleep(0.2);
my $y = client('lim', '127.0.0.2');
like($y->reply(), $greeting, 'QUIT gave the slot back');
refused(client('lim', '127.0.0.2'), $too_many, 'and only one');

# a client that just goes away gives it back too
close $y->sock;
sleep(0.3);
$y = client('lim', '127.0.0.2');
like($y->reply(), $greeting, 'a closed connection gave the slot back');

# the idle timeout (2s) ends the sessions: every slot comes back
like($a[1]->reply(4), qr/^421 4\.4\.2 /, 'timeout');
like($y->reply(4), qr/^421 4\.4\.2 /, 'timeout');
$_->sock->close for $a[1], $y;
sleep(0.3);
@a = map { client('lim', '127.0.0.2') } 1 .. 2;
like($_->reply(), $greeting, 'after timeouts: two sessions again') for @a;
refused(client('lim', '127.0.0.2'), $too_many, 'and no third');

# exempt: never refused
my @e = map { client('lim', '127.0.0.4') } 1 .. 4;
like($_->reply(), $greeting, 'exempt 127.0.0.4 is not limited') for @e;
$_->sock->close for @a, @b, @e;

like($n->error_log, qr/smtp_ext: client 127\.0\.0\.2 refused: too many connections/, 'the refusal logged with the client address');

# --- greeting delay and pregreet ----------------------------------------

my $t0 = time;
my $c = client('delay', '127.0.0.2');
like($c->reply(3), $greeting, 'greeting after the delay');
my $took = time - $t0;
ok($took >= 0.9 && $took < 2.5, "delayed 1s (took $took)");
$c->cmd('QUIT', qr/^221 /);

$c = client('delay', '127.0.0.2');
$c->send("EHLO early.test\r\n");
refused($c, $pregreet, 'pregreet');

# a refused session never counts, even while its connection lingers
# (write side shut, input drained) and its client keeps it open
my $r1 = client('lp', '127.0.0.5');
$r1->send("EHLO early.test\r\n");
is($r1->reply(), $pregreet, 'limit_conn 1: pregreet refused');
my $r2 = client('lp', '127.0.0.5');
like($r2->reply(3), $greeting,
    'limit_conn 1: the refused, still open session holds no slot');
refused(client('lp', '127.0.0.5'), $too_many,
    'limit_conn 1: the greeted one does');
$_->sock->close for $r1, $r2;

# the same line after the greeting is fine
$c = client('delay', '127.0.0.3');
like($c->reply(3), $greeting, 'waiting client greeted');
$c->cmd('EHLO late.test', qr/^250 /m);

# exempt: no delay
$t0 = time;
$c = client('delay', '127.0.0.4');
like($c->reply(3), $greeting, 'exempt client greeted');
ok(time - $t0 < 0.5, 'exempt client not delayed');

like($n->error_log, qr/client 127\.0\.0\.2 refused: talking before the greeting/, 'pregreet logged');

# --- PROXY protocol: the header is not talking, its address counts -------

sub pp {
    my ($src) = @_;
    my $c = client('pp', '127.0.0.1');
    $c->send("PROXY TCP4 $src 127.0.0.1 5555 25\r\n");
    return $c;
}

my $p1 = pp('192.0.2.10');
like($p1->reply(3), $greeting, 'PROXY header alone is not pregreet');
refused(pp('192.0.2.10'), $too_many, 'limit_conn counts the PROXY source');
my $p2 = pp('192.0.2.11');
like($p2->reply(3), $greeting, 'another PROXY source is apart');
my $p3 = pp('192.0.2.99');
my $p4 = pp('192.0.2.99');
like($_->reply(3), $greeting, 'server-level exempt from the PROXY source')
    for $p3, $p4;

my $p5 = pp('192.0.2.12');
$p5->send("EHLO x\r\n");
refused($p5, $pregreet, 'pregreet after the PROXY header');

# --- implicit TLS: the delay runs after the handshake ------------------

$c = client('tls', '127.0.0.2', ssl => 1);
$t0 = time;
like($c->reply(3), $greeting, 'TLS: greeting');
ok(time - $t0 >= 0.7, 'TLS: delayed after the handshake');

$c = client('tls', '127.0.0.2', ssl => 1);
$c->send("EHLO early.test\r\n");
refused($c, $pregreet, 'TLS: pregreet');

ok(error_log_clean($n), 'no alerts');

# --- nginx -t -----------------------------------------------------------

my @bad = (
    ['smtp_ext_limit_exempt 10.0.0.300/8;', qr/invalid network "10\.0\.0\.300\/8"/],
    ['smtp_ext_limit_conn 0;', qr/invalid number "0"/],
    ['smtp_ext_limit_conn x;', qr/invalid number "x"/],
    ['smtp_ext_greeting_delay abc;', qr/"smtp_ext_greeting_delay" directive invalid value/],
);

for my $b (@bad) {
    my ($rc, $out) = nginx_t(<<"EOF");
mail {
    server {
        listen 127.0.0.1:%%PORT_t%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        $b->[0]
    }
}
EOF
    isnt($rc, 0, "nginx -t fails: $b->[0]");
    like($out, $b->[1], "nginx -t says why: $b->[0]");
}

done_testing();
