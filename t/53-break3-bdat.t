#!/usr/bin/perl

# Break attempts on CHUNKING/BDAT (SPEC §12): BDAT 0, the smuggling
# boundary of the BDAT -> DATA conversion with CR and LF split across
# chunks, huge chunk sizes and a client that leaves, interleaving with
# RSET/QUIT, memory with 100,000 one-octet chunks, slow chunk octets.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(time sleep);
use SmtpExt::Test;

require_programs(nginx_bin());

my $caps = 'PIPELINING,SIZE 10485760,8BITMIME,ENHANCEDSTATUSCODES';
my $ck = "$caps,CHUNKING";

my %b;
$b{ck} = start_backend(name => 'b_ck', args => ['--caps', $ck]);
$b{pl} = start_backend(name => 'b_pl', args => ['--caps', $caps]);
$b{lim} = start_backend(name => 'b_lim', args => ['--caps', $ck]);
$b{slow} = start_backend(name => 'b_slow', args => ['--caps', $caps]);

my $n = start_nginx(<<'EOF2');
mail {
    server_name mx.test;
    timeout 5s;

    server {
        listen 127.0.0.1:%%PORT_ck%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_ck%%;
    }
    server {
        listen 127.0.0.1:%%PORT_pl%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_pl%%;
    }
    server {
        listen 127.0.0.1:%%PORT_lim%%;
        protocol smtp_ext;
        smtp_ext_limit_conn 1;
        smtp_ext_pass 127.0.0.1:%%PORT_b_lim%%;
    }
    server {
        listen 127.0.0.1:%%PORT_slow%%;
        protocol smtp_ext;
        timeout 2s;
        smtp_ext_min_data_rate 1000;
        smtp_ext_pass 127.0.0.1:%%PORT_b_slow%%;
    }
}
EOF2

sub session {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /, "$port: greeting");
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

sub envelope {
    my ($c) = @_;
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 /);
}

my $ok = qr/^250 2\.0\.0 Ok: queued as /;

# --- smuggling boundary: CR and LF split across chunks -----------------

my @cases = (
    # chunks => the message a DATA backend must get (dot-stuffed body)
    [["x\r", "\n.\r", "\nRSET\r\n"], "x\r\n..\r\nRSET\r\n"],
    [["x\n.\nQUIT\n"], "x\r\n..\r\nQUIT\r\n"],
    [["x\r.\rQUIT\r"], "x\r\n..\r\nQUIT\r\n"],
    [["x\r\n", ".", "\r", "\n", "MAIL FROM:<e\@f.test>\r\n"],
        "x\r\n..\r\nMAIL FROM:<e\@f.test>\r\n"],
    [["x\r\n.\r\n"], "x\r\n..\r\n"],
    [["x\r", "\n", ".", "\r", "\n", "y"], "x\r\n..\r\ny\r\n"],
);

for my $k ('pl', 'ck') {
    my $c = session($k);
    for my $case (@cases) {
        my ($chunks) = @$case;
        envelope($c);
        for my $i (0 .. $#$chunks) {
            my $ch = $chunks->[$i];
            my $last = $i == $#$chunks ? ' LAST' : '';
            $c->send('BDAT ' . length($ch) . "$last\r\n$ch");
            $c->expect($last ? $ok : qr/^250 2\.0\.0 \d+ octets received/,
                "$k: chunk $i of " . join('|', map { s/\r/\\r/gr =~ s/\n/\\n/gr } @$chunks));
        }
    }
    $c->cmd('QUIT', qr/^221 /);
    ok($b{$k}->wait_closed(1), "$k: backend closed");
}

is_deeply([$b{pl}->messages], [map { $_->[1] } @cases],
    'DATA backend: each message dot-stuffed, none split or ended early');
is_deeply([$b{ck}->messages], [map { join '', @{ $_->[0] } } @cases],
    'CHUNKING backend: octets unchanged');
is(scalar($b{pl}->commands(1)) + 0 && (grep { /^(RSET|QUIT|MAIL FROM:<e)/ }
    ($b{pl}->commands(1))[0 .. 5]), 0, 'no smuggled command at the start');

# --- BDAT 0 without LAST ------------------------------------------------

for my $k ('pl', 'ck') {
    my $c = session($k);
    envelope($c);
    $c->cmd('BDAT 0', qr/^250 2\.0\.0 0 octets received\r\n\z/,
        "$k: BDAT 0: 250 0 octets received");
    $c->send("BDAT 3\r\nabc");
    $c->expect(qr/^250 2\.0\.0 3 octets received/, "$k: BDAT 3 after BDAT 0");
    $c->cmd('BDAT 0', qr/^250 2\.0\.0 0 octets/, "$k: BDAT 0 again");
    $c->send("BDAT 2 LAST\r\nde");
    $c->expect($ok, "$k: LAST after BDAT 0");
    $c->cmd('QUIT', qr/^221 /);
}

# --- a huge chunk size, the client leaves in it --------------------------

{
    my $c = session('lim');
    envelope($c);
    $c->send("BDAT 99999999999999999\r\n" . ('q' x 5000));
    sleep(0.3);
    close($c->sock);
    sleep(0.5);
    my $c2 = smtp_client('lim');
    like($c2->reply(3) // '', qr/^220 /,
        'huge chunk, client gone: its limit_conn slot is back');
    $c2->cmd('QUIT', qr/^221 /);
    ok($b{lim}->wait_closed(scalar $b{lim}->connections),
        'huge chunk: the backend connection closed');
    unlike($b{lim}->raw(1) // '', qr/LAST|\r\n\.\r\n/,
        'huge chunk: nothing ended at the backend');
}

# a huge refused chunk: octets dropped, then the client leaves
{
    my $c = session('lim');
    $c->send("BDAT 99999999999999999 LAST\r\n" . ("QUIT\r\n" x 100));
    $c->expect(qr/^503 5\.5\.1 /, 'huge refused BDAT: 503');
    ok(!defined $c->reply(1), 'its octets are not commands (no 221)');
    close($c->sock);
    sleep(0.5);
    my $c2 = smtp_client('lim');
    like($c2->reply(3) // '', qr/^220 /,
        'refused huge chunk, client gone: slot back');
    $c2->cmd('QUIT', qr/^221 /);
}

# --- interleaving: QUIT and RSET inside a BDAT transaction, DATA backend --

{
    my $before = scalar $b{pl}->messages;
    my $c = session('pl');
    envelope($c);
    $c->send("BDAT 5\r\nhello");
    $c->expect(qr/^250 2\.0\.0 5 octets/);
    $c->cmd('RSET', qr/^250 /, 'RSET in a BDAT transaction');
    envelope($c);
    $c->send("BDAT 3 LAST\r\nnew");
    $c->expect($ok, 'the next transaction after RSET');
    envelope($c);
    $c->send("BDAT 5\r\nhello");
    $c->expect(qr/^250 2\.0\.0 5 octets/);
    $c->cmd('QUIT', qr/^221 /, 'QUIT in a BDAT transaction');
    ok($b{pl}->wait_closed(scalar $b{pl}->connections), 'backend closed');
    is_deeply([(($b{pl}->messages)[$before .. scalar($b{pl}->messages) - 1])],
        ["new\r\n"], 'only the finished message reached the backend');
}

# --- 100,000 one-octet chunks in one transaction: memory stays bounded ----

for my $k ('ck', 'pl') {
    my $c = session($k);
    envelope($c);
    my $rss0 = worker_rss($n);
    my $total = 100000;
    my $batch = 2000;
    my $good = 0;
    my $t0 = time;
    for (my $i = 0; $i < $total; $i += $batch) {
        my $last_batch = $i + $batch >= $total;
        my $out = "BDAT 1\r\nx" x ($batch - ($last_batch ? 1 : 0));
        $out .= "BDAT 1 LAST\r\nx" if $last_batch;
        $c->send($out);
        for my $j (1 .. $batch) {
            my $r = $c->reply(10) // '';
            $good++ if ($last_batch && $j == $batch) ? $r =~ $ok
                : $r =~ /^250 2\.0\.0 1 octets received/;
        }
        last if time - $t0 > 40;
    }
    my $rss1 = worker_rss($n);
    is($good, $total, "$k: 100,000 BDAT 1: all replies");
    my $grow = ($rss1 // 0) - ($rss0 // 0);
    diag("$k: worker RSS $rss0 kB -> $rss1 kB (+$grow kB)");
    cmp_ok($grow, '<', 8192, "$k: worker RSS grew by under 8 MiB");
    $c->cmd('QUIT', qr/^221 /);
}
is((grep { $_ eq ('x' x 100000) } $b{ck}->messages), 1,
    'CHUNKING: the 100,000-octet message intact');
is((grep { $_ eq ('x' x 100000) . "\r\n" } $b{pl}->messages), 1,
    'DATA: the 100,000-octet message intact');

# --- slow chunk octets past the deadline of message data ----------------

{
    # timeout 2s, 1000 octets/s: 20 octets in 3.5 s is past 2 s + 20 ms
    my $c = session('slow');
    envelope($c);
    $c->send("BDAT 100000\r\n");
    my $t0 = time;
    my $closed_at;
    for (1 .. 40) {
        last unless $c->send('y');
        sleep(0.1);
        if ($c->closed(0.01)) {
            $closed_at = time - $t0;
            last;
        }
    }
    ok(defined $closed_at && $closed_at < 3.5,
        'slow chunk octets: closed at the deadline ('
        . ($closed_at // 'never') . ')');
}

unlike($n->error_log, qr/\[alert\]|\[crit\]|\[emerg\]/, 'no alerts');

done_testing();
