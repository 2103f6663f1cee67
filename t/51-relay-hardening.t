#!/usr/bin/perl

# Regression tests for the relay hardening findings: a backend reply while
# DATA is blocked (use-after-free, the dot sent after the client was told
# 554), a session that hangs on a backend that stopped reading, plaintext
# injected after the backend's STARTTLS 220, long multiline replies cut
# mid-line or refused, failure accounting of pool peers, a long reply to
# the dot, and backends that close or reset at every step (SPEC §3, §5,
# §6).

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;
use Time::HiRes qw(time sleep);

require_programs(nginx_bin(), 'openssl');

# ASan makes everything slower: the deadlines below get this much more
my $slack = is_asan() ? 10 : 4;

my ($crt, $key) = gen_cert('backend.test');

my @early = ('--rcvbuf', 2048, '--pause-after-354', 2500,
    '--early-reply', '1500=554 5.7.1 Early rejection');

my %b = (
    early => start_backend(name => 'early', args => [@early]),
    early3 => start_backend(name => 'early3', args => [@early]),
    stall354 => start_backend(name => 'stall354',
        args => ['--rcvbuf', 2048, '--pause-after-354', 600000]),
    inject => start_backend(name => 'inject',
        args => ['--caps', 'PIPELINING,ENHANCEDSTATUSCODES',
            '--tls', "$crt,$key", '--starttls-extra', '250 2.0.0 injected',
            '--mail-reply', '250 2.1.0 Sender ok MAILREPLY',
            '--rcpt-reply', '250 2.1.5 Recipient ok RCPTREPLY']),
    ml_mail => start_backend(name => 'ml_mail',
        args => ['--reply-lines', 'mail=4,200,550']),
    ml_rcpt => start_backend(name => 'ml_rcpt',
        args => ['--reply-lines', 'rcpt=16,510,550']),
    ml_rcpt2 => start_backend(name => 'ml_rcpt2',
        args => ['--reply-lines', 'rcpt=100,100,550']),
    longdot => start_backend(name => 'longdot',
        args => ['--reply-lines', 'dot=60,100,250']),
    a7 => start_backend(name => 'a7',
        args => ['--greeting-from', '2=421 4.3.2 Going down']),
    b7 => start_backend(name => 'b7'),
    b7b => start_backend(name => 'b7b'),
    stalldot => start_backend(name => 'stalldot', args => ['--stall', 'dot']),
    g7 => start_backend(name => 'g7'),
    bytes => start_backend(name => 'bytes', args => ['--byte-by-byte']),
);

my @steps = qw(greeting ehlo mail rcpt data body dot);
for my $st (@steps) {
    for my $k (qw(close rst)) {
        $b{"${k}_$st"} = start_backend(name => "${k}_$st",
            args => ["--$k-at", $st]);
    }
}

# a port where nothing listens
port('dead7');

my %timeouts = (early3 => '3s', stall354 => '3s', stalldot => '2s',
    p7c => '2s');

my $conf = <<'EOF';
mail {
    server_name mx.test;

    smtp_ext_upstream p7a {
        server 127.0.0.1:%%PORT_a7%% max_fails=1 fail_timeout=30s;
        server 127.0.0.1:%%PORT_b7%% max_fails=1 fail_timeout=30s;
    }
    smtp_ext_upstream p7b {
        server 127.0.0.1:%%PORT_dead7%% max_fails=1 fail_timeout=30s;
        server 127.0.0.1:%%PORT_b7b%% max_fails=1 fail_timeout=30s;
    }
    smtp_ext_upstream p7c {
        server 127.0.0.1:%%PORT_stalldot%% max_fails=1 fail_timeout=30s;
        server 127.0.0.1:%%PORT_g7%% max_fails=1 fail_timeout=30s;
    }
EOF

for my $k (sort(keys %b), 'p7a', 'p7b', 'p7c') {
    next if $k =~ /^(a7|b7|b7b|stalldot|g7)$/;
    my $pass = $k =~ /^p7/ ? $k : "127.0.0.1:%%PORT_$k%%";
    my $ut = $timeouts{$k} // '10s';
    my $tls = $k eq 'inject' ? "        smtp_ext_upstream_tls on;\n" : '';
    $conf .= <<"EOF";
    server {
        listen 127.0.0.1:%%PORT_s_$k%%;
        protocol smtp_ext;
        smtp_ext_pass $pass;
        smtp_ext_connect_timeout 3s;
        smtp_ext_upstream_timeout $ut;
        smtp_ext_max_message_size 64m;
        timeout 30s;
$tls    }
EOF
}
$conf .= "}\n";

my $n = start_nginx($conf);

my @base = worker_sockets($n);
ok(scalar(@base), 'worker sockets at start: ' . scalar @base);

sub client {
    my ($k, $timeout) = @_;
    my $c = smtp_client("s_$k", timeout => $timeout // 10);
    $c->expect(qr/^220 /, "$k: greeting");
    $c->cmd('EHLO client.test', qr/^250 /m, "$k: EHLO");
    return $c;
}

sub open_data {
    my ($k, $c) = @_;
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /, "$k: MAIL");
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /, "$k: RCPT");
    $c->cmd('DATA', qr/^354 /, "$k: DATA");
}

# a whole transaction: the reply to the dot
sub tx {
    my ($c, $body) = @_;
    $c->send("MAIL FROM:<a\@b.test>\r\n");
    my $r = $c->reply() // '';
    return $r unless $r =~ /^250 /;
    $c->send("RCPT TO:<c\@d.test>\r\n");
    $r = $c->reply() // '';
    return $r unless $r =~ /^250 /;
    $c->send("DATA\r\n");
    $r = $c->reply() // '';
    return $r unless $r =~ /^354 /;
    $c->send(($body // "Subject: t\r\n\r\nhi\r\n") . ".\r\n");
    return $c->reply() // '';
}

# a message of about $size octets of numbered lines, no dots, no bare LF
sub message {
    my ($tag, $size) = @_;
    my $m = "Subject: $tag\r\nMessage-ID: <$tag\@client.test>\r\n\r\n";
    my $i = 0;
    while (length $m < $size) {
        $m .= sprintf("%s line %07d %s\r\n", $tag, $i++, 'x' x 50);
    }
    return $m;
}

# send in pieces; false when a reply arrived before all was sent
sub send_watching {
    my ($c, $data, $timeout, $name) = @_;
    my $deadline = time + $timeout;
    my $chunk = 65536;
    my $early = '';
    for (my $off = 0; $off < length $data; $off += $chunk) {
        my $piece = substr($data, $off, $chunk);
        my $w = $c->send_within($piece, $deadline - time);
        if ($w != length $piece) {
            fail("$name: the client could send its data (stuck at "
                . ($off + $w) . ' of ' . length($data) . ')');
            return 0;
        }
        $early .= $c->pending_input(0) if !length $early;
    }
    is($early, '', "$name: no reply before the end of data");
    return 1;
}

# the DATA part of what a backend received on connection $conn
sub backend_data {
    my ($b, $conn) = @_;
    my $raw = $b->raw($conn) // '';
    my $i = index($raw, "DATA\r\n");
    return $i < 0 ? undef : substr($raw, $i + 6);
}

# $got is $full cut to whole lines: the first lines, then the final line
# (or, when $strict_last is false, the first lines with the last of them
# turned into a final line); same code, CRLF everywhere
sub check_cut {
    my ($got, $full, $name, %opt) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    if (!defined $got || $got !~ /\r\n\z/) {
        fail("$name: a complete reply");
        diag(substr($got // '<none>', 0, 300));
        return;
    }
    my @g = split /\r\n/, $got;
    my @f = split /\r\n/, $full;
    my ($code) = $f[0] =~ /^(\d{3})/;
    my $bad = 0;
    for my $i (0 .. $#g) {
        my $want = $i == $#g ? "$code " : "$code-";
        if (substr($g[$i], 0, 4) ne $want) {
            $bad = "line " . ($i + 1) . " starts with '"
                . substr($g[$i], 0, 4) . "', not '$want'";
            last;
        }
        next if $i == $#g;
        if ($i > $#f || $g[$i] ne $f[$i]) {
            $bad = "line " . ($i + 1) . " is not the backend's";
            last;
        }
    }
    if (!$bad) {
        my $last = $g[-1];
        my $cut = $#g <= $#f ? $f[$#g] : '';
        $cut =~ s/^(\d{3})-/$1 /;
        if ($last ne $f[-1] && ($opt{strict_last} || $last ne $cut)) {
            $bad = 'the last line is not the final one';
        }
    }
    ok(!$bad, "$name: code $code, whole lines of the backend's reply ("
        . scalar(@g) . ' of ' . scalar(@f) . ' lines, ' . length($got)
        . ' octets)') or diag("$bad; got:\n" . substr($got, 0, 600));
    if ($opt{max}) {
        ok(length $got <= $opt{max},
            "$name: at most $opt{max} octets (" . length($got) . ')');
    }
}

sub sockets_clean {
    my ($name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    my @busy;
    my $ok = wait_for(sub {
        @busy = worker_busy_sockets($n);
        return !@busy && scalar(worker_sockets($n)) == scalar(@base);
    }, 5 + $slack);
    ok($ok, "$name: the worker holds no socket but its listeners")
        or diag(join "\n", @busy, 'sockets: ' . scalar(worker_sockets($n))
            . ', at start: ' . scalar(@base));
}


# finding 2: a reply while the last chunk of DATA is blocked

{
    my $k = 'early';
    my $c = client($k, 20);
    open_data($k, $c);
    my $msg = message('f2', 2 * 1024 * 1024);
    my $t = time;
    send_watching($c, $msg . ".\r\n", 30, $k);
    my $r = $c->reply(15 + $slack);
    like($r // '<no reply>',
        qr/^(451 4\.4\.2 |554 5\.7\.1 Early rejection)[^\r\n]*\r\n\z/,
        "$k: 451 4.4.2 or the backend's 554 after the dot");
    $c->cmd('NOOP', qr/^250 2\.0\.0 /, "$k: the session goes on");
    $c->cmd('QUIT', qr/^221 /, "$k: QUIT");

    my $b = $b{$k};
    ok($b->wait_closed(1, 10), "$k: backend connection closed");
    is(scalar($b->messages), 0, "$k: the backend recorded no message");
    ok(($b->log(1) // '') !~ /^\* message/m,
        "$k: no end of data at the backend");
    my $d = backend_data($b, 1) // '';
    my $end = index($d, "\r\n.\r\n");
    ok($end < 0, "$k: no final dot at the backend");
    $d = substr($d, 0, $end + 5) if $end >= 0;
    ok(length($d) < length($msg) + 3,
        "$k: the backend got part of the message (" . length($d) . ' of '
        . (length($msg) + 3) . ' octets)');
    ok($d eq substr($msg . ".\r\n", 0, length $d),
        "$k: what it got is what the client sent (no stale memory)");
}


# finding 3: no hang on a backend that stopped reading, no leaked socket

for my $k (qw(early3 stall354)) {
    my $c = client($k, 20);
    open_data($k, $c);
    my $msg = message("f3$k", 2160 * 1024);
    my $tail = message("f3tail", 30 * 1024);
    $tail =~ s/^.*?\r\n\r\n//s;
    send_watching($c, $msg, 25, "$k: 2.16 MB");
    sleep(1);
    send_watching($c, $tail . ".\r\n", 10 + $slack, "$k: 30 KB and the dot");
    my $t = time;
    my $r = $c->reply(20 + $slack);
    my $took = time - $t;
    my $re = $k eq 'early3' ? qr/^(451 4\.4\.\d |554 5\.7\.1 )/
        : qr/^451 4\.4\.\d /;
    like($r // '<no reply>', $re, "$k: a 451 4.4.x after the dot");
    ok($took <= 3 + $slack,
        sprintf("%s: within upstream_timeout + slack (%.1f s)", $k, $took));
    $c->cmd('QUIT', qr/^221 /, "$k: QUIT");
    $c->close();
    is(scalar($b{$k}->messages), 0, "$k: the backend recorded no message");
}
sockets_clean('after finding 3');


# finding 5: plaintext after the backend's STARTTLS 220 is no reply

{
    my $k = 'inject';
    my $c = client($k);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /, "$k: MAIL");
    $c->send("RCPT TO:<c\@d.test>\r\n");
    my $r = $c->reply() // '<no reply>';
    like($r, qr/^(250 2\.1\.5 Recipient ok RCPTREPLY|451 4\.4\.\d [^\r\n]*)\r\n\z/,
        "$k: RCPT gets the backend's RCPT reply or 451");
    unlike($r, qr/injected|MAILREPLY/, "$k: never an injected or shifted reply");
    if ($r =~ /^250/) {
        $c->cmd('DATA', qr/^354 /, "$k: DATA");
        $c->send("Subject: t\r\n\r\nhi\r\n.\r\n");
        $c->expect(qr/^250 2\.0\.0 Ok: queued as 1-1\r\n\z/,
            "$k: the backend's reply to the dot");
        my @cmds = $b{$k}->commands(1);
        is_deeply([map { /^(\S+)/ } @cmds],
            [qw(EHLO STARTTLS EHLO MAIL RCPT DATA)],
            "$k: the backend's commands in order");
    }
    $c->cmd('NOOP', qr/^250 2\.0\.0 /, "$k: NOOP");
    $c->cmd('QUIT', qr/^221 /, "$k: QUIT");
}


# finding 6: multiline replies are passed on in whole lines

{
    my $k = 'ml_mail';
    my $full = lines_reply(550, 4, 200);
    my $c = client($k);
    $c->send("MAIL FROM:<a\@b.test>\r\n");
    my $r = $c->reply();
    if (($r // '') =~ /^250 /) {
        $c->send("RCPT TO:<c\@d.test>\r\nNOOP\r\n");
        $r = $c->reply();
    } else {
        $c->send("NOOP\r\n");
    }
    is($r, $full, "$k: the backend's four-line 550, exactly");
    $c->expect(qr/^250 2\.0\.0 [^\r\n]*\r\n\z/, "$k: then the NOOP reply");
    $c->cmd('QUIT', qr/^221 /, "$k: QUIT");
}

for my $k (qw(ml_rcpt ml_rcpt2)) {
    my $full = $k eq 'ml_rcpt' ? lines_reply(550, 16, 510)
        : lines_reply(550, 100, 100);
    my $c = client($k);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /, "$k: MAIL");
    $c->send("RCPT TO:<c\@d.test>\r\nNOOP\r\n");
    check_cut($c->reply(), $full, "$k: RCPT");
    $c->expect(qr/^250 2\.0\.0 [^\r\n]*\r\n\z/, "$k: then the NOOP reply");
    $c->cmd('QUIT', qr/^221 /, "$k: QUIT");
}


# finding 11: a long reply to the dot is a 250, cut to whole lines

{
    my $k = 'longdot';
    my $c = client($k);
    check_cut(tx($c), lines_reply(250, 60, 100), "$k: end of data",
        strict_last => 1, max => 4096);
    $c->cmd('NOOP', qr/^250 2\.0\.0 [^\r\n]*\r\n\z/, "$k: NOOP");
    $c->cmd('QUIT', qr/^221 /, "$k: QUIT");
    is(scalar($b{$k}->messages), 1, "$k: the backend has the message");
}


# finding 7: failure accounting

# an old session on a peer that failed since: its normal end must not
# make the peer usable again within fail_timeout
{
    my ($a7, $b7) = ($b{a7}, $b{b7});
    my $old = client('p7a');
    like(tx($old), qr/^250 2\.0\.0 /, 'p7a: old session, first message');
    is($a7->connections, 1, 'p7a: the old session talks to a7');

    for my $i (1 .. 3) {
        last if $a7->connections >= 2;
        my $c = client('p7a');
        like(tx($c), qr/^250 2\.0\.0 /, "p7a: session $i");
        $c->cmd('QUIT', qr/^221 /);
    }
    is($a7->connections, 2, 'p7a: a7 refused a new session (421 greeting)');

    like(tx($old), qr/^250 2\.0\.0 /, 'p7a: old session, second message');
    $old->cmd('QUIT', qr/^221 /, 'p7a: old session ends normally');
    ok($a7->wait_closed(1, 5), 'p7a: its connection to a7 closed');

    for my $i (1 .. 4) {
        my $c = client('p7a');
        like(tx($c), qr/^250 2\.0\.0 /, "p7a: later session $i");
        $c->cmd('QUIT', qr/^221 /);
    }
    is($a7->connections, 2, 'p7a: a7 not tried again within fail_timeout');
}

# a dead peer, an old session on the other one ends
{
    my $dead = port('dead7');
    my $tries = sub {
        scalar grep { /:$dead\b/ } split /\n/, error_log($n);
    };
    my $old = client('p7b');
    like(tx($old), qr/^250 2\.0\.0 /, 'p7b: old session on b7b');
    my $k0 = $tries->();
    ok($k0 > 0, "p7b: the dead peer was tried ($k0 log lines)");
    my $c = client('p7b');
    like(tx($c), qr/^250 2\.0\.0 /, 'p7b: second session');
    $c->cmd('QUIT', qr/^221 /);
    $old->cmd('QUIT', qr/^221 /, 'p7b: old session ends normally');
    for my $i (1 .. 4) {
        $c = client('p7b');
        like(tx($c), qr/^250 2\.0\.0 /, "p7b: later session $i");
        $c->cmd('QUIT', qr/^221 /);
    }
    is($tries->(), $k0, 'p7b: the dead peer not tried again');
}

# a timeout at the dot is a failure of that peer
{
    my $s = $b{stalldot};
    my $c = client('p7c', 10);
    my $t = time;
    like(tx($c), qr/^451 4\.4\.\d /, 'p7c: a backend stalled at the dot: 451');
    ok(time - $t <= 2 + $slack, 'p7c: within upstream_timeout');
    $c->cmd('QUIT', qr/^221 /);
    is($s->connections, 1, 'p7c: that was stalldot');
    for my $i (1 .. 4) {
        $c = client('p7c');
        like(tx($c), qr/^250 2\.0\.0 /, "p7c: later session $i");
        $c->cmd('QUIT', qr/^221 /);
    }
    is($s->connections, 1, 'p7c: stalldot not tried again within fail_timeout');
}


# a backend that closes or resets at each step: 451 4.4.x at that step

my %fails_at = (greeting => 'RCPT', ehlo => 'RCPT', mail => 'RCPT',
    rcpt => 'RCPT', data => 'DATA', body => 'dot', dot => 'dot');

for my $st (@steps) {
    for my $kind (qw(close rst)) {
        my $k = "${kind}_$st";
        my $c = client($k);
        my $body = message($k, 40000);
        my @seq = (['MAIL', "MAIL FROM:<a\@b.test>\r\n", qr/^250 /],
            ['RCPT', "RCPT TO:<c\@d.test>\r\n", qr/^250 /],
            ['DATA', "DATA\r\n", qr/^354 /],
            ['dot', "$body.\r\n", qr/^250 /]);
        my ($at, $r) = ('none', '');
        for my $s (@seq) {
            $c->send($s->[1]);
            $r = $c->reply() // '<no reply>';
            next if $r =~ $s->[2] && $s->[0] ne 'dot';
            $at = $s->[0];
            last;
        }
        my $want = $fails_at{$st};
        ok($at eq $want || ($want eq 'RCPT' && $at eq 'MAIL'),
            "$k: fails at $want (at $at)");
        like($r, qr/^451 4\.4\.\d [^\r\n]*\r\n\z/, "$k: 451 4.4.x");
        if ($c->closed(0.2)) {
            pass("$k: closed cleanly");
        } else {
            $c->cmd('NOOP', qr/^250 2\.0\.0 /, "$k: the session goes on");
            $c->cmd('QUIT', qr/^221 /, "$k: QUIT");
        }
        if ($st eq 'body') {
            is(scalar($b{$k}->messages), 0, "$k: no message at the backend");
        }
    }
}


# replies written one octet at a time

{
    my $k = 'bytes';
    my $c = client($k);
    like(tx($c), qr/^250 2\.0\.0 Ok: queued as 1-1\r\n\z/,
        "$k: a message through a backend writing octet by octet");
    $c->cmd('QUIT', qr/^221 /, "$k: QUIT");
}

sockets_clean('at the end');

$n->stop();
my @bad = grep { /\[(alert|crit|emerg)\]|exited on signal|signal (6|7|8|11)\b/ }
    split /\n/, error_log($n);
ok(!@bad, 'no alert, crit or crash signal in the error log')
    or diag(join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)]);

done_testing();
