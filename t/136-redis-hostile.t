#!/usr/bin/perl

# A hostile or broken Redis (SPEC §5): unsolicited replies, huge arrays
# and bulk strings streamed forever, deep and wide arrays, wrong types,
# silence, garbage.  Each costs temporary errors and a reconnect: RCPT
# 451 4.3.0 and AUTH 454 4.7.0 (never 5xx), the same worker (no crash),
# a few MB of worker memory at most, and mail flows again within
# 2 x timeout + 5 s once Redis behaves.  t/bin/redis-hostile.pl sits
# between nginx and a real Redis and misbehaves as its control file says.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(time sleep);
use POSIX ();
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $timeout = 1;    # smtp_ext_redis timeout=, seconds

my $r = start_redis();
my $b1 = start_backend(name => 'b1');

$r->cmd('SET', 'domain:example.org', '127.0.0.1:' . $b1->port);
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');

# the hostile server

my $h = start_hostile_redis($r);
sub set_mode { $h->mode($_[0]) }

my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_hostile%% timeout=${timeout}s;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_auth plain;
        timeout 30s;
    }
}
EOF

my $worker = worker_pid($n);

my $tempfail_rcpt = qr/^451 4\.3\.0 [^\r\n]*\r\n\z/;
my $tempfail_auth = qr/^454 4\.7\.0 [^\r\n]*\r\n\z/;

sub session {
    my $c = smtp_client('smtp', timeout => 8);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 HELP\r\n\z/m);
    return $c;
}

# the same without test results, for polling
sub quiet_session {
    my $c = smtp_client('smtp', timeout => 8);
    $c->send("EHLO client.test\r\n");
    ($c->reply(4) // '') =~ /^220 / or return undef;
    ($c->reply(4) // '') =~ /^250 HELP\r\n\z/m or return undef;
    return $c;
}

sub auth_line { 'AUTH PLAIN ' . b64("\0$_[0]\0$_[1]") }

# peak and current RSS of the worker, kB
sub worker_mem {
    my $pid = worker_pid($n) or return (0, 0);
    my $st = read_file("/proc/$pid/status") // '';
    my ($hwm) = $st =~ /^VmHWM:\s+(\d+)\s+kB/m;
    my ($rss) = $st =~ /^VmRSS:\s+(\d+)\s+kB/m;
    return ($hwm // 0, $rss // 0);
}

# one message to example.org: true when the end of data got 250 and the
# backend has it
my $seq = 0;
sub mail_flows {
    my $id = 'msg-' . ++$seq . "-$$";
    my $c = eval { quiet_session() } or return 0;
    $c->send("MAIL FROM:<s\@x.test>\r\n");
    my $rep = $c->reply(4) // '';
    $c->send("RCPT TO:<bob\@example.org>\r\n");
    $rep = $c->reply(4) // '';
    if ($rep !~ /^250 /) {
        $c->close();
        return 0;
    }
    $c->send("DATA\r\n");
    ($c->reply(4) // '') =~ /^354 / or return 0;
    $c->send("Subject: $id\r\n\r\nhello\r\n.\r\n");
    $rep = $c->reply(8) // '';
    $c->send("QUIT\r\n");
    $c->close();
    return 0 unless $rep =~ /^250 /;
    return wait_for(sub { grep { /Subject: \Q$id\E/ } $b1->messages() }, 3);
}

ok(mail_flows(), 'proxy: mail flows');
{
    my $c = session();
    $c->cmd(auth_line('alice', 'secret'), qr/^235 2\.7\.0 /,
        'proxy: AUTH works');
    $c->cmd('QUIT', qr/^221 /);
}

# warm up: the worker's memory after a few sessions
ok(mail_flows(), 'proxy: mail flows again') for 1 .. 3;
my ($hwm0, $rss0) = worker_mem();

my %mem;

for my $mode (qw(unsolicited hugearray hugebulk deep wide wrongtype
                 silent garbage refuse))
{
    set_mode($mode);

    # a few rounds: each may land on a fresh connection
    for my $round (1 .. 3) {
        # past the reconnect delay (100 ms after a drop), so that each
        # round meets the hostile server, not a fast "not connected"
        sleep(0.3);

        my $c = session();
        $c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
        $c->send("RCPT TO:<bob\@example.org>\r\n");
        my $rep = $c->reply(3 * $timeout + 2) // '<no reply>';
        like($rep, $tempfail_rcpt, "$mode #$round: RCPT 451 4.3.0");

        $c->cmd('RSET', qr/^250 /);
        $c->send(auth_line('alice', 'secret') . "\r\n");
        $rep = $c->reply(3 * $timeout + 2) // '<no reply>';

        if ($mode eq 'unsolicited') {
            # the user's hash came back intact, only the authfail
            # counter got the extra "+OK": either answer is right
            like($rep, qr/^(235 2\.7\.0|454 4\.7\.0) /,
                "$mode #$round: AUTH 235 or 454, never 5xx");

        } elsif ($mode eq 'wrongtype') {
            like($rep, $tempfail_auth, "$mode #$round: AUTH 454 4.7.0");

        } else {
            like($rep, $tempfail_auth, "$mode #$round: AUTH 454 4.7.0");
        }

        $c->cmd('QUIT', qr/^221 /);
    }

    my ($hwm, $rss) = worker_mem();
    is(worker_pid($n), $worker, "$mode: same worker, it never crashed");

    # Redis behaves again: mail flows within 2 x timeout + 5 s
    set_mode('proxy');
    my $t = time;
    my $ok = wait_for(sub { mail_flows() }, 2 * $timeout + 5);
    my $took = time - $t;
    ok($ok && $took <= 2 * $timeout + 5,
        sprintf('%s: mail flows again after %.2fs', $mode, $took));

    my ($hwm2, $rss2) = worker_mem();
    $mem{$mode} = [ $hwm2 - $hwm0, $rss2 - $rss0 ];
    diag(sprintf('%s: worker peak RSS +%d kB, RSS +%d kB', $mode,
        $hwm2 - $hwm0, $rss2 - $rss0));
}

# a few MB: one 1 MiB reply buffered at a time, and nothing kept; not
# under AddressSanitizer (scripts/asan-test.sh), whose quarantine keeps
# freed memory
SKIP: {
    my $maps = read_file('/proc/' . worker_pid($n) . '/maps') // '';
    skip('RSS under AddressSanitizer', 2 * keys %mem)
        if $maps =~ /libasan/;

    for my $mode (sort keys %mem) {
        cmp_ok($mem{$mode}[0], '<', 8 * 1024,
            "$mode: peak RSS growth < 8 MB");
        cmp_ok($mem{$mode}[1], '<', 4 * 1024, "$mode: RSS growth < 4 MB");
    }
}

is(worker_pid($n), $worker, 'same worker at the end');

my $log = error_log($n);
unlike($log, qr/\[alert\]|exited on signal|signal [0-9] |core dumped/,
    'no alert, no signal in error.log');
# hiredis 0.14 refuses a ninth level itself, before our reader would
for my $what ('unsolicited reply', 'array over 1024 elements',
    'reply over 1 MiB', 'nested (over 8 levels|multi bulk replies)',
    'Protocol error', 'requests timed out',
    'unsolicited reply "-ERR max number of clients reached"')
{
    like($log, qr/redis 127\.0\.0\.1:\d+: .*$what/,
        "error.log says \"$what\"");
}

done_testing();
