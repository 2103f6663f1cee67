#!/usr/bin/perl

# Redis faults (SPEC §5): killed, stalled (SIGSTOP), restarted on the same
# port, absent at start; nginx reload and graceful quit with Redis
# connections.  Always 451 4.3.0 at RCPT and 454 4.7.0 at AUTH within the
# lookup timeout, never a 5xx, never a hang, no worker crash, no alert.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(time sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
my $b1 = start_backend(name => 'b1');

sub populate {
    $r->cmd('SET', 'domain:example.org', '127.0.0.1:' . $b1->port);
    $r->cmd('SET', 'rcpt:bounce@example.org', 'reject');
    $r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');
}
populate();

my $conf = <<'EOF';
worker_shutdown_timeout 2s;

mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=500ms;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_auth plain;
        timeout 30s;
    }

    # Redis that never comes up
    server {
        listen 127.0.0.1:%%PORT_dead%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_noredis%% timeout=500ms;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_auth plain;
    }
}
EOF

SmtpExt::Test::port('noredis');    # reserved, nothing listens there

my $n = start_nginx($conf);
my $worker = worker_pid($n);

my $tempfail_rcpt = qr/^451 4\.3\.0 [^\r\n]*\r\n\z/;
my $tempfail_auth = qr/^454 4\.7\.0 Temporary authentication failure\r\n\z/;

sub session {
    my ($port) = @_;
    my $c = smtp_client($port // 'smtp', timeout => 8);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 HELP\r\n\z/m);
    return $c;
}

# a command's reply and how long it took
sub timed {
    my ($c, $line) = @_;
    my $t = time;
    $c->send("$line\r\n");
    my $rep = $c->reply(8) // '<no reply>';
    return ($rep, time - $t);
}

sub auth_line { 'AUTH PLAIN ' . b64("\0$_[0]\0$_[1]") }

# the lookups work, a reject is not confused with a route
sub healthy {
    my ($what) = @_;
    my $c = session();
    $c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<bounce@example.org>', qr/^550 5\.1\.1 /,
        "$what: reject");
    $c->cmd('RCPT TO:<x@nowhere.test>', qr/^554 5\.7\.1 /,
        "$what: relay denied");
    $c->cmd('RCPT TO:<bob@example.org>', qr/^250 2\.1\.5 /, "$what: route");
    $c->cmd('RSET', qr/^250 /);
    $c->cmd(auth_line('alice', 'secret'), qr/^235 2\.7\.0 /, "$what: AUTH");
    $c->cmd('QUIT', qr/^221 /);
}

# wait until lookups work again; returns the seconds it took
sub recovers {
    my $t = time;
    my $ok = wait_for(sub {
        my $c = eval { session() } or return 0;
        $c->send("MAIL FROM:<s\@x.test>\r\nRCPT TO:<bob\@example.org>\r\n"
            . "QUIT\r\n");
        $c->reply(3);
        my $rep = $c->reply(3) // '';
        $c->close();
        return $rep =~ /^250 /;
    }, 8);
    return $ok ? time - $t : undef;
}

healthy('at start');

# operator errors in Redis: temporary failures, never 5xx, never a crash

$r->cmd('SET', 'user:str', 'not a hash');
$r->cmd('HSET', 'domain:hash.test', 'a', 'b');
$r->cmd('HSET', 'user:garbage', 'password', 'no-scheme-at-all');
$r->cmd('HSET', 'user:md5', 'password', '{MD5}XrY7u+Ae7tCTyyK7j1rNww==');
$r->cmd('HSET', 'user:badroute', 'password', '{PLAIN}pw', 'route', 'nope');

my $c = session();
$c->cmd(auth_line('str', 'x'), $tempfail_auth,
    'user: key of the wrong type: 454');
$c->cmd(auth_line('garbage', 'x'), $tempfail_auth,
    'password without a scheme: 454');
$c->cmd(auth_line('md5', 'x'), $tempfail_auth, 'unsupported scheme: 454');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<x@hash.test>', $tempfail_rcpt,
    'domain: key of the wrong type: 451 4.3.0');
$c->cmd('RSET', qr/^250 /);
$c->cmd(auth_line('badroute', 'pw'), qr/^235 2\.7\.0 /);
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<x@example.org>', $tempfail_rcpt,
    'user route that is not a pool nor IP:port: 451 4.3.0');
$c->cmd('QUIT', qr/^221 /);

# Redis killed: refused connections, immediate or within the timeout

$r->kill();

$c = session();
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
for my $rcpt ('bob@example.org', 'x@nowhere.test', 'bounce@example.org') {
    my ($rep, $dt) = timed($c, "RCPT TO:<$rcpt>");
    like($rep, $tempfail_rcpt, "killed: RCPT $rcpt 451 4.3.0");
    ok($dt < 3, sprintf('killed: answered in %.2fs', $dt));
}
$c->cmd('RSET', qr/^250 /);
my ($rep, $dt) = timed($c, auth_line('alice', 'secret'));
like($rep, $tempfail_auth, 'killed: AUTH 454 4.7.0');
ok($dt < 3, sprintf('killed: AUTH answered in %.2fs', $dt));
($rep, $dt) = timed($c, auth_line('alice', 'wrong'));
like($rep, $tempfail_auth, 'killed: wrong password also 454, not 535');
$c->cmd('NOOP', qr/^250 2\.0\.0 /, 'killed: session goes on');
$c->cmd('QUIT', qr/^221 /);

# restarted on the same port (empty: nothing is saved)

ok($r->restart(), 'Redis restarted on the same port');
populate();
my $took = recovers();
ok(defined $took, sprintf('recovered by itself after restart (%.2fs)',
    $took // -1));
healthy('after restart');

# stalled: connected, answers nothing

$r->stall();

$c = session();
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
for my $rcpt ('bob@example.org', 'x@nowhere.test') {
    ($rep, $dt) = timed($c, "RCPT TO:<$rcpt>");
    like($rep, $tempfail_rcpt, "stalled: RCPT $rcpt 451 4.3.0");
    ok($dt >= 0.4 && $dt < 3, sprintf('stalled: after the timeout (%.2fs)',
        $dt));
}
$c->cmd('RSET', qr/^250 /);
($rep, $dt) = timed($c, auth_line('alice', 'secret'));
like($rep, $tempfail_auth, 'stalled: AUTH 454 4.7.0');
ok($dt < 3, sprintf('stalled: AUTH answered in %.2fs', $dt));

# pipelined lookups while stalled: each gets its temporary failure, in order
$c->send("MAIL FROM:<s\@x.test>\r\nRCPT TO:<a\@example.org>\r\n"
    . "RCPT TO:<b\@example.org>\r\nNOOP\r\n");
like($c->reply(8), qr/^250 2\.1\.0 /, 'stalled, pipelined: MAIL');
like($c->reply(8), $tempfail_rcpt, 'stalled, pipelined: RCPT 1');
like($c->reply(8), $tempfail_rcpt, 'stalled, pipelined: RCPT 2');
like($c->reply(8), qr/^250 2\.0\.0 /, 'stalled, pipelined: NOOP');

# a client that leaves while its lookup is pending
my $gone = session();
$gone->send("MAIL FROM:<s\@x.test>\r\nRCPT TO:<bob\@example.org>\r\n");
$gone->reply();
$gone->close();

$c->cmd('RSET', qr/^250 /);
$c->cmd('NOOP', qr/^250 2\.0\.0 /, 'stalled: session alive');

$r->resume();

# late replies of timed-out lookups must not answer newer ones
$took = recovers();
ok(defined $took, sprintf('recovered after SIGCONT (%.2fs)', $took // -1));
healthy('after SIGCONT');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<bounce@example.org>', qr/^550 5\.1\.1 /,
    'old session: reject after resume');
$c->cmd('RCPT TO:<bob@example.org>', qr/^250 2\.1\.5 /,
    'old session: route after resume');
$c->cmd('QUIT', qr/^221 /);

# Redis that is not there at all

$c = session('dead');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
($rep, $dt) = timed($c, 'RCPT TO:<bob@example.org>');
like($rep, $tempfail_rcpt, 'never up: RCPT 451 4.3.0');
ok($dt < 3, sprintf('never up: in %.2fs', $dt));
$c->cmd('RSET', qr/^250 /);
($rep, $dt) = timed($c, auth_line('alice', 'secret'));
like($rep, $tempfail_auth, 'never up: AUTH 454 4.7.0');
$c->cmd('QUIT', qr/^221 /);

is(worker_pid($n), $worker, 'same worker: it never crashed');

# reload: the old worker closes its Redis connection, the new one connects

my $old = $worker;
$c = session();    # held across the reload, inside a transaction
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$n->reload($conf);
ok(wait_for(sub { find_new_worker($n, $old) }, 10),
    'new worker after reload');

# the held session finishes its transaction with the old worker, then
# is told to go (SPEC 5)
$c->cmd('RCPT TO:<bob@example.org>', qr/^250 2\.1\.5 /,
    'old worker still does lookups');
$c->cmd('RSET', qr/^250 /);
$c->expect(qr/^421 4\.3\.2 /, 'then 421 4.3.2: the old worker exits');
ok(wait_for(sub { !kill(0, $old) || zombie($old) }, 10),
    'old worker exits');

healthy('after reload');

# reload while a lookup is pending on a stalled Redis

$r->stall();
$old = worker_pid($n);
$c = session();
$c->send("MAIL FROM:<s\@x.test>\r\nRCPT TO:<bob\@example.org>\r\n");
like($c->reply(), qr/^250 2\.1\.0 /, 'MAIL before the reload');
$n->reload($conf);
ok(wait_for(sub { find_new_worker($n, $old) }, 10),
    'new worker after the second reload');
like($c->reply(8), $tempfail_rcpt, 'pending lookup: 451 4.3.0 across reload');
$c->cmd('QUIT', qr/^221 /);
ok(wait_for(sub { !kill(0, $old) || zombie($old) }, 10),
    'old worker exits');
$r->resume();
ok(defined recovers(), 'new worker does lookups');

# graceful quit with a connected Redis, an idle session and a session
# whose lookup is pending: worker_shutdown_timeout closes them

$c = session();
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<bob@example.org>', qr/^250 2\.1\.5 /);
my $idle = session();
$r->stall();
my $pending = session();
$pending->send("MAIL FROM:<s\@x.test>\r\nRCPT TO:<bob\@example.org>\r\n");
$pending->reply();
kill 'QUIT', $n->pid;
ok(wait_for(sub { waitpid($n->pid, POSIX::WNOHANG()) == $n->pid }, 10),
    'graceful quit');
$n->{pid} = undef;
$r->resume();
ok($idle->closed(3), 'idle session closed at shutdown');
ok($pending->closed(3), 'pending session closed at shutdown');
unlike($pending->pending_input() // '', qr/^[25]\d\d /m,
    'pending session never got a 2xx or 5xx');
$c->close();

my $log = error_log($n);
unlike($log, qr/\[alert\]/, 'no [alert] in error.log');
unlike($log, qr/open socket/, 'no "open socket" left');
unlike($log, qr/exited on signal|signal 11|core dumped/,
    'no worker crash');
ok(error_log_clean($n), 'no alerts');

done_testing();

sub zombie {
    my ($pid) = @_;
    my $st = read_file("/proc/$pid/stat") // return 1;
    return $st =~ /\)\s+[ZX]\s/;
}

# a worker of $n that is not $old and not shutting down
sub find_new_worker {
    my ($nx, $old) = @_;
    opendir my $d, '/proc' or return 0;
    for my $p (grep { /^\d+$/ } readdir $d) {
        next if $p == $old;
        my $st = read_file("/proc/$p/stat") // next;
        next unless $st =~ /\)\s+\S+\s+(\d+)/ && $1 == $nx->pid;
        my $cmd = read_file("/proc/$p/cmdline") // '';
        if ($cmd =~ /worker process/ && $cmd !~ /shutting down/) {
            $nx->{worker} = $p;
            return $p;
        }
    }
    return 0;
}
