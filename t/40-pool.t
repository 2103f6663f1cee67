#!/usr/bin/perl

# smtp_ext_upstream pools: weighted round robin, backup, down, max_fails,
# failover before the client sees anything, all servers down.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my %b;
$b{$_} = start_backend(name => $_)
    for qw(w1 w2 w3 bk1 bk2 dn1 dn2 fo1 fo2 fo3 mf2);
$b{g421} = start_backend(name => 'g421',
    args => ['--greeting', '421 4.3.2 Service shutting down']);
$b{g554} = start_backend(name => 'g554',
    args => ['--greeting', '554 5.3.2 No service']);
$b{stallg} = start_backend(name => 'stallg', args => ['--stall', 'greeting']);
$b{mf1} = start_backend(name => 'mf1',
    args => ['--greeting', '421 4.3.2 Service shutting down']);
$b{fo4} = start_backend(name => 'fo4');

# ports nobody listens on
SmtpExt::Test::port($_) for qw(dead1 dead2 dead3);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;

    smtp_ext_upstream wrr {
        server 127.0.0.1:%%PORT_w1%% weight=3;
        server 127.0.0.1:%%PORT_w2%% weight=2;
        server 127.0.0.1:%%PORT_w3%%;
    }
    smtp_ext_upstream bk {
        server 127.0.0.1:%%PORT_bk1%%;
        server 127.0.0.1:%%PORT_bk2%% backup;
    }
    smtp_ext_upstream dn {
        server 127.0.0.1:%%PORT_dn1%% down;
        server 127.0.0.1:%%PORT_dn2%%;
    }
    smtp_ext_upstream refused {
        server 127.0.0.1:%%PORT_dead1%%;
        server 127.0.0.1:%%PORT_fo1%%;
    }
    smtp_ext_upstream greet4xx {
        server 127.0.0.1:%%PORT_g421%%;
        server 127.0.0.1:%%PORT_g554%%;
        server 127.0.0.1:%%PORT_fo2%%;
    }
    smtp_ext_upstream stalled {
        server 127.0.0.1:%%PORT_stallg%%;
        server 127.0.0.1:%%PORT_fo3%%;
    }
    smtp_ext_upstream mf {
        server 127.0.0.1:%%PORT_mf1%% weight=10 max_fails=1 fail_timeout=30s;
        server 127.0.0.1:%%PORT_mf2%%;
    }
    smtp_ext_upstream alldown {
        server 127.0.0.1:%%PORT_dead2%%;
        server 127.0.0.1:%%PORT_dead3%%;
    }

    server {
        listen 127.0.0.1:%%PORT_s_wrr%%;
        protocol smtp_ext;
        smtp_ext_pass wrr;
    }
    server {
        listen 127.0.0.1:%%PORT_s_bk%%;
        protocol smtp_ext;
        smtp_ext_pass bk;
    }
    server {
        listen 127.0.0.1:%%PORT_s_dn%%;
        protocol smtp_ext;
        smtp_ext_pass dn;
    }
    server {
        listen 127.0.0.1:%%PORT_s_refused%%;
        protocol smtp_ext;
        smtp_ext_pass refused;
    }
    server {
        listen 127.0.0.1:%%PORT_s_greet4xx%%;
        protocol smtp_ext;
        smtp_ext_pass greet4xx;
    }
    server {
        listen 127.0.0.1:%%PORT_s_stalled%%;
        protocol smtp_ext;
        smtp_ext_pass stalled;
        smtp_ext_connect_timeout 1s;
    }
    server {
        listen 127.0.0.1:%%PORT_s_mf%%;
        protocol smtp_ext;
        smtp_ext_pass mf;
    }
    server {
        listen 127.0.0.1:%%PORT_s_alldown%%;
        protocol smtp_ext;
        smtp_ext_pass alldown;
        smtp_ext_connect_timeout 1s;
    }
    server {
        listen 127.0.0.1:%%PORT_s_single%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_fo4%%;
    }
}
EOF

# one session with one transaction; returns the RCPT reply and the
# end-of-data reply
sub session {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->send("RCPT TO:<c\@d.test>\r\n");
    my $rcpt = $c->reply(6) // '';
    my $dot = '';
    if ($rcpt =~ /^250/) {
        $c->cmd('DATA', qr/^354 /);
        $c->send("x\r\n.\r\n");
        $dot = $c->reply() // '';
    }
    $c->cmd('QUIT', qr/^221 /);
    $c->closed();
    return ($rcpt, $dot);
}

sub count {
    my ($name) = @_;
    my $b = $b{$name};
    my $k = $b->connections;
    $b->wait_closed($_, 2) for 1 .. $k;
    return scalar($b->messages);
}

# weighted round robin 3:2:1 over 12 sessions

for (1 .. 12) {
    my ($rcpt, $dot) = session('s_wrr');
    like($dot, qr/^250 2\.0\.0 Ok: queued/, "wrr session $_");
}
is_deeply([map { count($_) } qw(w1 w2 w3)], [6, 4, 2], 'wrr 6:4:2');

# backup only when the primary is down

for (1 .. 3) {
    my ($rcpt, $dot) = session('s_bk');
    like($dot, qr/^250 2\.0\.0 /, "bk session $_");
}
is_deeply([count('bk1'), $b{bk2}->connections], [3, 0],
    'backup not used while the primary is up');

$b{bk1}->stop();
for (1 .. 2) {
    my ($rcpt, $dot) = session('s_bk');
    like($dot, qr/^250 2\.0\.0 /, "bk session with primary down $_");
}
is(count('bk2'), 2, 'backup used when the primary is down');

# down is never used

for (1 .. 3) {
    session('s_dn');
}
is_deeply([$b{dn1}->connections, count('dn2')], [0, 3], 'down never used');

# failover: refused, 4xx/5xx greeting, stalled greeting

my ($rcpt, $dot) = session('s_refused');
is($rcpt, "250 2.1.5 Ok\r\n", 'refused: next server used');
like($dot, qr/^250 2\.0\.0 /, 'refused: message delivered');
is(count('fo1'), 1, 'refused: fo1 got it');

($rcpt, $dot) = session('s_greet4xx');
is($rcpt, "250 2.1.5 Ok\r\n", '421 and 554 greetings: next server used');
is(count('fo2'), 1, 'greeting failures: fo2 got it');
ok($b{g421}->connections >= 1 && $b{g554}->connections >= 1,
    'both failing servers were tried');

my $t = time;
($rcpt, $dot) = session('s_stalled');
is($rcpt, "250 2.1.5 Ok\r\n", 'stalled greeting: next server used');
ok(time - $t < 5, 'stalled greeting: connect timeout of 1s');
is(count('fo3'), 1, 'stalled greeting: fo3 got it');
ok($b{stallg}->wait_closed(1), 'stalled backend connection closed');

# max_fails=1: after one failure mf1 is out for fail_timeout

for (1 .. 4) {
    ($rcpt, $dot) = session('s_mf');
    like($dot, qr/^250 2\.0\.0 /, "mf session $_");
}
is($b{mf1}->connections, 1, 'max_fails: failed server tried once');
is(count('mf2'), 4, 'max_fails: the other server got all');

# everything down

($rcpt, $dot) = session('s_alldown');
is($rcpt, "451 4.4.1 No backend available, try again later\r\n",
    'all down: 451 4.4.1 at RCPT');

# a single host:port that is down

$b{fo4}->stop();
($rcpt, $dot) = session('s_single');
is($rcpt, "451 4.4.1 No backend available, try again later\r\n",
    'single backend down: 451 4.4.1');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
