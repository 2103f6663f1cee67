#!/usr/bin/perl

# Break attempts on edge protection (SPEC §10): a limit_conn slot must come
# back however a session ends (QUIT, RST, close or RST during the greeting
# delay, pregreet, DNSBL refusal, timeout, RST in DATA and in BDAT, TLS
# handshake failure, reload); IPv6 /64 keys through PROXY; a DNSBL answer
# that arrives after the client left.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use POSIX qw(:sys_wait_h);
use Socket qw(SOL_SOCKET SO_LINGER);
use Time::HiRes qw(time sleep);
use SmtpExt::Test;

require_programs(nginx_bin(), 'openssl');

my @dns;
END {
    local $?;
    for my $pid (@dns) { kill 'TERM', $pid; waitpid($pid, 0); }
}

{
    my $dir = testdir() . "/dns";
    mkdir $dir or die "$dir: $!";
    my $p = port('dns');
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', "$dir/stdout.log";
        open STDERR, '>', "$dir/stderr.log";
        exec($^X, 't/bin/dns-server.pl', '--port', $p, '--pidfile',
            "$dir/pid", '--log', "$dir/queries.log",
            '--a', '5.0.0.127.bl.test=127.0.0.2',
            '--a', '6.0.0.127.bl.test=127.0.0.2',
            '--delay', '6.0.0.127.bl.test=700') or POSIX::_exit(127);
    }
    push @dns, $pid;
    wait_for(sub { -e "$dir/pid" }, 10) or die "no dns server\n";
}

my ($crt, $key) = gen_cert('mx.test');
my $b1 = start_backend(name => 'b1',
    args => ['--caps', 'PIPELINING,8BITMIME,ENHANCEDSTATUSCODES,CHUNKING']);

my $conf = <<"EOF2";
mail {
    server_name mx.test;
    ssl_certificate $crt;
    ssl_certificate_key $key;
    smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    resolver 127.0.0.1:%%PORT_dns%% ipv6=off;
    resolver_timeout 2s;

    server {
        listen 127.0.0.1:%%PORT_lim%%;
        protocol smtp_ext;
        smtp_ext_limit_conn 1;
        timeout 1s;
    }
    server {
        listen 127.0.0.1:%%PORT_gd%%;
        protocol smtp_ext;
        smtp_ext_limit_conn 1;
        smtp_ext_greeting_delay 600ms;
        smtp_ext_dnsbl bl.test;
    }
    server {
        listen 127.0.0.1:%%PORT_tls%% ssl;
        protocol smtp_ext;
        smtp_ext_limit_conn 1;
    }
    server {
        listen 127.0.0.1:%%PORT_pp%% proxy_protocol;
        protocol smtp_ext;
        set_real_ip_from 127.0.0.1;
        smtp_ext_limit_conn 1;
    }
}
EOF2

my $n = start_nginx($conf);
my $wpid = $n->worker_pid;

my $greeting = qr/^220 mx\.test ESMTP\r\n\z/;
my $too_many = "421 4.7.0 Too many connections from your address\r\n";

sub rst {
    my ($c) = @_;
    setsockopt($c->sock, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
    close $c->sock;
}

# a new session from $local on $port is greeted (its slot is free)
sub slot_free {
    my ($port, $local, $name, %opt) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my $ok = 0;
    my $r;
    # up to ~3 s: a refused or timed-out session lingers 2 s (FIN sent,
    # input drained) before its connection is closed
    for (1 .. 10) {
        sleep(0.3);
        my $c = eval { smtp_client($port, local => $local, %opt) };
        next unless $c;
        $r = $c->reply(3) // '';
        if ($r =~ $greeting) {
            $ok = 1;
            $c->cmd('QUIT', qr/^221 /);
            close $c->sock;
            last;
        }
        close $c->sock;
    }
    ok($ok, "$name: the slot came back") or diag("got: " . ($r // 'none'));
}

# plain port
{
    my $c = smtp_client('lim', local => '127.0.0.2');
    like($c->reply(), $greeting, 'lim: greeted');
    is(smtp_client('lim', local => '127.0.0.2')->reply(), $too_many,
        'lim: a second session refused');
    $c->cmd('QUIT', qr/^221 /);
    close $c->sock;
    slot_free('lim', '127.0.0.2', 'QUIT');

    $c = smtp_client('lim', local => '127.0.0.2');
    $c->reply();
    rst($c);
    slot_free('lim', '127.0.0.2', 'RST');

    $c = smtp_client('lim', local => '127.0.0.2');
    $c->reply();
    like($c->reply(3) // '', qr/^421 4\.4\.2 /, 'idle timeout');
    slot_free('lim', '127.0.0.2', 'timeout, client never closes');
    close $c->sock;

    $c = smtp_client('lim', local => '127.0.0.2');
    $c->reply();
    $c->cmd('EHLO x', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 /);
    $c->cmd('DATA', qr/^354 /);
    $c->send("Subject: x\r\n\r\npartial");
    sleep(0.2);
    rst($c);
    slot_free('lim', '127.0.0.2', 'RST in DATA');

    $c = smtp_client('lim', local => '127.0.0.2');
    $c->reply();
    $c->cmd('EHLO x', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 /);
    $c->send("BDAT 1000\r\npartial");
    sleep(0.2);
    rst($c);
    slot_free('lim', '127.0.0.2', 'RST in a BDAT chunk');

    # pipelined input right with the greeting, then RST with data unread
    $c = smtp_client('lim', local => '127.0.0.2');
    $c->send("EHLO x\r\nMAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\n"
        . "BDAT 99999999999999999 LAST\r\n" . ('z' x 100000));
    sleep(0.3);
    rst($c);
    slot_free('lim', '127.0.0.2', 'RST after a pipelined huge BDAT');
}

# greeting delay + DNSBL port
{
    my $c = smtp_client('gd', local => '127.0.0.2');
    sleep(0.1);
    close $c->sock;
    slot_free('gd', '127.0.0.2', 'close during the greeting delay');

    $c = smtp_client('gd', local => '127.0.0.2');
    sleep(0.1);
    rst($c);
    slot_free('gd', '127.0.0.2', 'RST during the greeting delay');

    $c = smtp_client('gd', local => '127.0.0.2');
    $c->send("EHLO early\r\n");
    is($c->reply(3), "554 5.5.1 Protocol error: talking before the "
        . "greeting\r\n", 'pregreet refused');
    slot_free('gd', '127.0.0.2', 'pregreet refusal (client keeps it open)');
    close $c->sock;

    $c = smtp_client('gd', local => '127.0.0.5');
    is($c->reply(3), "554 5.7.1 Service unavailable; client [127.0.0.5] "
        . "blocked using bl.test\r\n", 'DNSBL refusal');
    close $c->sock;
    # 127.0.0.5 is listed: a second refusal must not be "too many"
    $c = smtp_client('gd', local => '127.0.0.5');
    like($c->reply(3) // '', qr/^554 5\.7\.1 /,
        'DNSBL-refused client refused by DNSBL again, not limit_conn');
    close $c->sock;

    # the DNSBL answer (700 ms) comes after the client left (100 ms)
    for (1 .. 5) {
        $c = smtp_client('gd', local => '127.0.0.6');
        sleep(0.1);
        rst($c);
    }
    sleep(1.2);
    is($n->worker_pid, $wpid, 'DNSBL answers after the client left: '
        . 'the worker lives');
}

# TLS port: a failed handshake, garbage, a good session
{
    my $c = smtp_client('tls', local => '127.0.0.2');
    $c->send("EHLO not-tls\r\n");
    sleep(0.3);
    close $c->sock;
    $c = smtp_client('tls', local => '127.0.0.2');
    $c->send("\x16\x03\x01\x00\x05hello");
    sleep(0.3);
    rst($c);
    slot_free('tls', '127.0.0.2', 'TLS handshake failures', ssl => 1);

    $c = smtp_client('tls', local => '127.0.0.2', ssl => 1);
    like($c->reply(), $greeting, 'TLS: greeted');
    rst($c);
    slot_free('tls', '127.0.0.2', 'RST of a TLS session', ssl => 1);
}

# PROXY protocol: IPv6 per /64
{
    my @c;
    my $pp = sub {
        my ($src) = @_;
        my $c = smtp_client('pp');
        $c->send("PROXY TCP6 $src 2001:db8::25 5555 25\r\n");
        push @c, $c;
        return $c->reply(3) // '';
    };
    like($pp->('2001:db8:1:2::1'), $greeting, 'v6: first of a /64');
    is($pp->('2001:db8:1:2:ffff::9'), $too_many, 'v6: same /64 refused');
    like($pp->('2001:db8:1:3::1'), $greeting, 'v6: another /64 apart');
    like($pp->('2001:db8::1'), $greeting, 'v6: 2001:db8::/64 apart');
    is($pp->('2001:db8:0:0:1::1'), $too_many,
        'v6: 2001:db8:0:0:1::1 is in 2001:db8::/64');
    close $_->sock for @c;
}

# reload: an old worker's session still counts, and gives its slot back
{
    my $c = smtp_client('pp');
    $c->send("PROXY TCP4 192.0.2.7 127.0.0.1 5555 25\r\n");
    like($c->reply(3), $greeting, 'before reload: greeted');
    $n->reload($conf);
    sleep(1.5);
    my $d = smtp_client('pp');
    $d->send("PROXY TCP4 192.0.2.7 127.0.0.1 5555 25\r\n");
    is($d->reply(3), $too_many, 'after reload: the old session counts');
    close $d->sock;
    # the old worker may already have closed it while shutting down
    $c->send("QUIT\r\n");
    close $c->sock;
    sleep(0.5);
    $d = smtp_client('pp');
    $d->send("PROXY TCP4 192.0.2.7 127.0.0.1 5555 25\r\n");
    like($d->reply(3) // '', $greeting,
        'after reload: the old session gave its slot back');
    close $d->sock;
}

unlike($n->error_log, qr/\[alert\]|\[crit\]|\[emerg\]|exited on signal/,
    'no alerts, no crash');

done_testing();
