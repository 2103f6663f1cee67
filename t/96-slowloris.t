#!/usr/bin/perl

# Slow clients (SPEC §5): `timeout` bounds each whole command line and
# AUTH line from its first octet, not each read; in DATA the deadline,
# counted from the 354, is timeout + octets received / smtp_ext_min_data_rate
# (default 500 octets per second), and no single read waits longer than
# timeout.  A client past its deadline gets "421 4.4.2 ... Timeout
# exceeded" and is closed; an unfinished message never gets its final dot
# at the backend.
#
# The scenarios of one phase run at the same time (one select loop), so
# that the file stays short; each is judged on its own.

use strict;
use warnings;

use lib 't/lib';
use IO::Select;
use Test::More;
use Time::HiRes qw(time sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $TIMEOUT = 3;
my $TIMEOUT_421 = qr/^421 4\.4\.2 .*Timeout exceeded/;
my $PARALLEL = 50;

my $r = start_redis();

my @caps = (args => ['--caps', 'PIPELINING,ENHANCEDSTATUSCODES']);
my %b = map { $_ => start_backend(name => $_, @caps) }
    qw(bslow bstall bgood brate1 brate2);
$r->cmd('SET', "domain:$_.test", '127.0.0.1:' . $b{$_}->port)
    for keys %b;

my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_auth plain login;
        smtp_ext_auth_fail_limit 1000;
        timeout ${TIMEOUT}s;
        max_errors 1000;
    }
}
EOF


# The driver: each client has a script of [offset, bytes] sends (offsets
# in seconds from the start of the phase) and a goal: 'eof' (the server
# must close it) or a number of replies.  Every reply is recorded with
# its time; so are the first octet sent and the close.

sub client {
    my ($name, %opt) = @_;
    my $c = smtp_client(delete $opt{port} // 'smtp', timeout => 5);
    my $g = $c->reply();
    die "$name: no greeting\n" unless ($g // '') =~ /^220 /;
    return { name => $name, c => $c, script => [], want => 'eof',
        ready => time, %opt };
}

# ready: the time of the last reply of the setup (the client is idle since)
sub setup {
    my ($cl, @cmds) = @_;
    for my $cmd (@cmds) {
        my ($line, $re) = @$cmd;
        $cl->{c}->send("$line\r\n");
        my $rep = $cl->{c}->reply() // '<none>';
        die "$cl->{name}: $line -> $rep" unless $rep =~ $re;
    }
    $cl->{ready} = time;
}

# one octet every $interval seconds from offset $at
sub trickle {
    my ($data, $interval, $at) = @_;
    $at //= 0;
    return map { [$at + $_ * $interval, substr($data, $_, 1)] }
        0 .. length($data) - 1;
}

# $size octets every $interval seconds, $count times, from offset $at
sub stream {
    my ($line, $interval, $count, $at) = @_;
    $at //= 0;
    return map { [$at + $_ * $interval, $line] } 0 .. $count - 1;
}

sub done {
    my ($cl) = @_;
    return 1 if $cl->{eof_at};
    return 0 if $cl->{want} eq 'eof' || $cl->{i} < @{ $cl->{script} };
    return @{ $cl->{replies} } >= $cl->{want};
}

sub drive {
    my ($cap, @cls) = @_;
    my $start = time;
    local $SIG{PIPE} = 'IGNORE';

    for my $cl (@cls) {
        $cl->{i} = 0;
        $cl->{replies} = [];
        $cl->{part} = '';
        $cl->{c}->sock->blocking(0);
    }

    for (;;) {
        my $now = time;
        last if $now - $start > $cap;
        last unless grep { !done($_) } @cls;

        my $next = $start + $cap;
        for my $cl (@cls) {
            next if $cl->{eof_at};
            my $s = $cl->{script};
            while ($cl->{i} < @$s && $start + $s->[$cl->{i}][0] <= $now) {
                $cl->{first} //= time;
                syswrite($cl->{c}->sock, $s->[$cl->{i}][1]);
                $cl->{i}++;
            }
            $next = $start + $s->[$cl->{i}][0]
                if $cl->{i} < @$s && $start + $s->[$cl->{i}][0] < $next;
        }

        my $sel = IO::Select->new(map { $_->{c}->sock }
            grep { !$_->{eof_at} } @cls);
        my $wait = $next - time;
        $wait = 0 if $wait < 0;
        $wait = 0.05 if $wait > 0.05;
        my @ready = $sel->count ? $sel->can_read($wait) : ();
        sleep($wait) unless $sel->count;

        for my $sock (@ready) {
            my ($cl) = grep { $_->{c}->sock == $sock } @cls;
            my $got = sysread($sock, my $buf, 65536);
            if (!defined $got) {
                next if $!{EAGAIN} || $!{EINTR};
                $got = 0;
            }
            if ($got == 0) {
                $cl->{eof_at} = time;
                next;
            }
            $cl->{part} .= $buf;
            while ($cl->{part} =~ s/^((?:\d{3}-[^\n]*\n)*[^\n]*\n)//) {
                push @{ $cl->{replies} }, [time, $1];
            }
        }
    }

    for my $cl (@cls) {
        $cl->{c}->close();
    }
}

# the first reply after the script started
sub first_reply {
    my ($cl) = @_;
    my $r = $cl->{replies}[0];
    return $r ? ($r->[1], $r->[0]) : ('<no reply>', undef);
}

# "421 4.4.2 ... Timeout exceeded" between $lo and $hi seconds after
# $from, then the close
sub timed_out_ok {
    my ($cl, $from, $lo, $hi, $what) = @_;
    my ($text, $at) = first_reply($cl);
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    like($text, $TIMEOUT_421, "$what: 421 4.4.2 Timeout exceeded");
    my $after = defined $at && defined $from ? $at - $from : -1;
    ok($after >= $lo && $after <= $hi, "$what: the 421 came after "
        . sprintf('%.2f s', $after) . " (expected $lo to $hi)");
    ok($cl->{eof_at} && defined $at && $cl->{eof_at} - $at < 1,
        "$what: closed after the 421");
    return $after;
}

# the backend got the start of the message but never its end
sub unfinished_ok {
    my ($be, $what) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    ok($be->wait_closed(1, 5), "$what: backend connection closed");
    my $raw = $be->raw(1) // '';
    my ($data) = $raw =~ /\r\nDATA\r\n(.*)\z/s;
    ok(defined $data && length $data, "$what: backend got message data");
    unlike($data // '', qr/(?:^|\r\n)\.\r\n/,
        "$what: backend never got the final dot");
    is(scalar $be->message_files(), 0, "$what: no message at the backend");
}

sub data_setup {
    my ($cl, $domain) = @_;
    setup($cl, ['EHLO client.test', qr/^250[ -]/],
        ['MAIL FROM:<slow@client.test>', qr/^250 /],
        ["RCPT TO:<rcpt\@$domain>", qr/^250 /],
        ['DATA', qr/^354 /]);
}


###########################################################################
# phase 1: command lines and AUTH lines trickled, an idle client, a DATA
# burst followed by silence, many tricklers at once

my @par = map { client("parallel $_") } 1 .. $PARALLEL;
for my $i (0 .. $#par) {
    # a trickled EHLO (longer than 10 s at this pace)
    $par[$i]{script} = [trickle("EHLO client-$i.slowloris.test\r\n", 0.5)];
}

my $cmd = client('command line');
setup($cmd, ['EHLO client.test', qr/^250[ -]/]);
$cmd->{script} = [trickle("MAIL FROM:<trickle\@client.test>\r\n", 0.5)];

my $auth = client('AUTH line');
setup($auth, ['EHLO client.test', qr/^250[ -]/],
    ['AUTH LOGIN', qr/^334 VXNlcm5hbWU6/]);
$auth->{script} = [trickle("dXNlckBjbGllbnQudGVzdA==\r\n", 0.5)];

my $idle = client('idle');
setup($idle, ['EHLO client.test', qr/^250[ -]/]);

my $stall = client('DATA stalled');
data_setup($stall, 'bstall.test');
$stall->{script} = [[0, "Subject: burst\r\n\r\n" . ("y" x 78 . "\r\n") x 50]];

drive(2 * $TIMEOUT + 1, @par, $cmd, $auth, $idle, $stall);

for my $cl (@par, $cmd, $auth) {
    diag(sprintf("%s: idle %.2f s before its first octet", $cl->{name},
        $cl->{first} - $cl->{ready})) if $cl->{first} - $cl->{ready} > 0.3;
}

# (a) a command line trickled one octet every 0.5 s
timed_out_ok($cmd, $cmd->{first}, $TIMEOUT - 0.5, $TIMEOUT + 1.5,
    'command line trickled');
cmp_ok($cmd->{i}, '<', length("MAIL FROM:<trickle\@client.test>\r\n"),
    'command line trickled: cut before the line was complete');

# (e) an AUTH continuation line trickled
timed_out_ok($auth, $auth->{first}, $TIMEOUT - 0.5, $TIMEOUT + 1.5,
    'AUTH line trickled');

# (b) an idle client without a partial line: the plain idle timeout
timed_out_ok($idle, $idle->{ready}, $TIMEOUT - 0.5, $TIMEOUT + 1.5,
    'idle client');

# DATA: no single read waits longer than timeout, whatever the deadline
timed_out_ok($stall, $stall->{first}, $TIMEOUT - 0.5, $TIMEOUT + 1.5,
    'DATA burst then silence');
unfinished_ok($b{bstall}, 'DATA burst then silence');

# (f) many tricklers at once: every one is cut in time
my (@late, @wrong, @open);
my ($min, $max) = (1e9, 0);
for my $cl (@par) {
    my ($text, $at) = first_reply($cl);
    push @wrong, "$cl->{name}: $text" unless $text =~ $TIMEOUT_421;
    push @open, $cl->{name} unless $cl->{eof_at};
    next unless defined $at;
    my $after = $at - $cl->{first};
    $min = $after if $after < $min;
    $max = $after if $after > $max;
    push @late, sprintf('%s: %.2f s', $cl->{name}, $after)
        if $after < $TIMEOUT - 0.5 || $after > $TIMEOUT + 1.5;
}
diag(sprintf("%d parallel tricklers: 421 after %.2f to %.2f s",
    $PARALLEL, $min, $max)) if $max;
is(scalar @wrong, 0, "$PARALLEL parallel tricklers: all got 421 4.4.2")
    or diag(join "\n", @wrong[0 .. ($#wrong < 4 ? $#wrong : 4)]);
is(scalar @late, 0, "$PARALLEL parallel tricklers: all within timeout")
    or diag(join "\n", @late[0 .. ($#late < 4 ? $#late : 4)]);
is(scalar @open, 0, "$PARALLEL parallel tricklers: all closed");


###########################################################################
# phase 2: DATA too slow, DATA slow but above the minimal rate, command
# lines that are slow but complete within timeout

# (c) 100 octets per second: the deadline is at timeout + 100 t / 500 = t,
# t = 3.75 s after the 354
my $slow = client('DATA at 100 B/s');
data_setup($slow, 'bslow.test');
my $slow_354 = time;
$slow->{script} = [stream("abcdefgh\r\n", 0.1, 150)];

# (d) 1000 octets per second for 5 s: longer than timeout, always ahead
# of the deadline
my $good = client('DATA at 1000 B/s');
data_setup($good, 'bgood.test');
my $line = ('z' x 98) . "\r\n";
$good->{script} = [stream($line, 0.1, 50), [5, ".\r\n"], [5.1, "QUIT\r\n"]];
$good->{want} = 2;

# (b) a command line that takes 2 s (less than timeout) works, also twice
# in a row: the limit is per line, not per session
my $lines = client('NOOP lines in 2 s each');
setup($lines, ['EHLO client.test', qr/^250[ -]/]);
$lines->{script} = [trickle("NOOP\r\n", 0.4), trickle("NOOP\r\n", 0.4, 2.4),
    [4.5, "QUIT\r\n"]];
$lines->{want} = 3;

drive(3 * $TIMEOUT, $slow, $good, $lines);

my $cut = timed_out_ok($slow, $slow_354, 3.25, 5.5,
    'DATA at 100 B/s');
diag(sprintf('DATA at 100 B/s: cut after %d octets',
    $slow->{i} * 10));
unfinished_ok($b{bslow}, 'DATA at 100 B/s');

my @r = map { $_->[1] } @{ $good->{replies} };
like($r[0] // '<no reply>', qr/^250 2\.0\.0 /,
    'DATA at 1000 B/s for 5 s (longer than timeout): 250');
like($r[1] // '<no reply>', qr/^221 /, 'DATA at 1000 B/s: QUIT after it');
my @msgs = $b{bgood}->messages();
is_deeply(\@msgs, [$line x 50], 'DATA at 1000 B/s: the message at the'
    . ' backend');

@r = map { $_->[1] } @{ $lines->{replies} };
is(scalar(grep { /^250 2\.0\.0/ } @r[0, 1]), 2,
    'two NOOP lines of 2 s each: both answered 250') or diag(@r);
like($r[2] // '<no reply>', qr/^221 /, 'NOOP lines: then QUIT');


###########################################################################
# phase 3: smtp_ext_min_data_rate in mail {} and in server {}

my $n2 = eval {
    start_nginx(<<"EOF");
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;
    smtp_ext_min_data_rate 4000;

    server {
        listen 127.0.0.1:%%PORT_rate%%;
        protocol smtp_ext;
        timeout ${TIMEOUT}s;
    }

    server {
        listen 127.0.0.1:%%PORT_rate_srv%%;
        protocol smtp_ext;
        timeout ${TIMEOUT}s;
        smtp_ext_min_data_rate 500;
    }
}
EOF
};
ok($n2, 'nginx starts with smtp_ext_min_data_rate in mail {} and server {}');

SKIP: {
    skip('no nginx with smtp_ext_min_data_rate', 8) unless $n2;

    # 1000 B/s under a minimal rate of 4000: t = 3 + 1000 t / 4000, 4 s
    my $m = client('rate 4000, DATA at 1000 B/s', port => 'rate');
    data_setup($m, 'brate1.test');
    my $m_354 = time;
    $m->{script} = [stream($line, 0.1, 80)];

    # the same under 500 in server {}: fine
    my $s = client('rate 500 in server, DATA at 1000 B/s',
        port => 'rate_srv');
    data_setup($s, 'brate2.test');
    $s->{script} = [stream($line, 0.1, 45), [4.5, ".\r\n"],
        [4.6, "QUIT\r\n"]];
    $s->{want} = 2;

    drive(3 * $TIMEOUT, $m, $s);

    timed_out_ok($m, $m_354, 3.5, 5.5,
        'smtp_ext_min_data_rate 4000, DATA at 1000 B/s');
    unfinished_ok($b{brate1}, 'smtp_ext_min_data_rate 4000');

    my ($t) = first_reply($s);
    like($t, qr/^250 2\.0\.0 /,
        'smtp_ext_min_data_rate 500 in server {}: DATA at 1000 B/s: 250');
}

ok(error_log_clean($n), 'no alerts in the error log');

done_testing();
