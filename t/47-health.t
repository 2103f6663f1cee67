#!/usr/bin/perl

# Active SMTP health checks (SPEC §8): health_check in smtp_ext_upstream,
# with worker_processes 2.  A peer that fails its checks gets no
# transactions, comes back after "passes" good ones; the probe is exactly
# greeting, "EHLO name", QUIT; refused, stalled and rejecting peers; one
# probe per peer and interval for the whole node; backups probed, down
# peers never; mandatory; reload with a probe under way; nginx -t.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use File::Path qw(make_path);
use POSIX qw(:sys_wait_h);
use Sys::Hostname qw(hostname);
use Time::HiRes qw(time sleep);
use SmtpExt::Test;

require_programs(nginx_bin());

# nginx -t: health_check needs a zone

{
    my ($rc, $out) = nginx_t(<<'EOF');
mail {
    server_name mx.test;
    smtp_ext_upstream nozone {
        server 127.0.0.1:%%PORT_x1%%;
        health_check interval=1s;
    }
    server {
        listen 127.0.0.1:%%PORT_t1%%;
        protocol smtp_ext;
        smtp_ext_pass nozone;
    }
}
EOF
    isnt($rc, 0, 'nginx -t fails: health_check without zone');
    like($out, qr/"health_check" in smtp_ext_upstream "nozone" needs a "zone"/,
        'nginx -t names the pool');
}

my %b;
$b{$_} = start_backend(name => $_) for qw(a1 p2 p3 p4 dn bk mgood px py);
$b{b1} = start_backend(name => 'b1',
    args => ['--greeting', '421 4.3.2 Service shutting down']);
$b{se} = start_backend(name => 'se', args => ['--stall', 'ehlo']);
$b{ms} = start_backend(name => 'ms', args => ['--stall', 'greeting']);
$b{sl} = start_backend(name => 'sl', args => ['--stall', 'greeting']);

# nothing listens there
SmtpExt::Test::port('dead');

my $conf = <<'EOF';
mail {
    server_name mx.test;

    smtp_ext_upstream hc {
        zone hc 64k;
        server 127.0.0.1:%%PORT_a1%%;
        server 127.0.0.1:%%PORT_b1%%;
        health_check interval=300ms fails=2 passes=2 timeout=1s
                     ehlo=probe.test;
    }
    smtp_ext_upstream dead {
        zone dead 64k;
        server 127.0.0.1:%%PORT_dead%%;
        server 127.0.0.1:%%PORT_p2%%;
        health_check interval=300ms;
    }
    smtp_ext_upstream st {
        zone st 64k;
        server 127.0.0.1:%%PORT_se%%;
        server 127.0.0.1:%%PORT_p3%%;
        health_check interval=500ms timeout=400ms;
    }
    smtp_ext_upstream bd {
        zone bd 64k;
        server 127.0.0.1:%%PORT_p4%%;
        server 127.0.0.1:%%PORT_dn%% down;
        server 127.0.0.1:%%PORT_bk%% backup;
        health_check interval=300ms;
    }
    smtp_ext_upstream mand {
        zone mand 64k;
        server 127.0.0.1:%%PORT_ms%%;
        health_check interval=20s timeout=3s mandatory;
    }
    smtp_ext_upstream mg {
        zone mg 64k;
        server 127.0.0.1:%%PORT_mgood%%;
        health_check interval=20s mandatory ehlo=mg.test;
    }
    smtp_ext_upstream slow {
        zone slow 64k;
        server 127.0.0.1:%%PORT_sl%%;
        health_check interval=1s timeout=20s;
    }

    smtp_ext_upstream pf {
        zone pf 64k;
        server 127.0.0.1:%%PORT_px%% max_fails=1 fail_timeout=60s;
        server 127.0.0.1:%%PORT_py%%;
        health_check interval=300ms fails=5;
    }

    server {
        listen 127.0.0.1:%%PORT_s_pf%%;
        protocol smtp_ext;
        smtp_ext_pass pf;
    }
    server {
        listen 127.0.0.1:%%PORT_s_hc%%;
        protocol smtp_ext;
        smtp_ext_pass hc;
    }
    server {
        listen 127.0.0.1:%%PORT_s_mand%%;
        protocol smtp_ext;
        smtp_ext_pass mand;
        smtp_ext_connect_timeout 500ms;
    }
    server {
        listen 127.0.0.1:%%PORT_s_mg%%;
        protocol smtp_ext;
        smtp_ext_pass mg;
    }
}
EOF

# start_nginx() runs one worker: this test needs two

my $n;

sub start_nginx2 {
    my ($text) = @_;
    my $dir = testdir() . '/nginx-hc';
    make_path("$dir/logs");
    my $full = nginx_conf_text($text, $dir);
    $full =~ s/^worker_processes 1;$/worker_processes 2;/m
        or die "no worker_processes line\n";
    write_file("$dir/nginx.conf", $full);

    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', "$dir/stdout.log";
        open STDERR, '>', "$dir/stderr.log";
        exec(nginx_bin(), '-p', "$dir/", '-c', "$dir/nginx.conf",
            '-e', "$dir/error.log")
            or POSIX::_exit(127);
    }

    my $ng = bless { pid => $pid, dir => $dir, conf => $full },
        'SmtpExt::Test::Nginx';
    my @ports = map { port($_) } qw(s_hc s_mand s_mg s_pf);
    my $up = wait_for(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        return 0 if grep { !SmtpExt::Test::listening($_) } @ports;
        my $w = nginx_workers($ng);
        return (grep { /worker process$/ } values %$w) == 2 ? 1 : 0;
    }, 10);
    if ($up != 1) {
        diag(read_file("$dir/error.log") // '');
        kill 'KILL', $pid if $up != -1;
        die "nginx did not start\n";
    }
    return $ng;
}

END {
    local $?;
    $n->stop() if $n;
}

# log lines of state changes
sub changes {
    my ($pool, $peer) = @_;
    my $re = qr/\[warn\].*smtp_ext: upstream "\Q$pool\E" peer \Q$peer\E is /;
    return grep { /$re/ } split /\n/, error_log($n);
}

sub wait_change {
    my ($pool, $peer, $what, $count, $timeout) = @_;
    $count //= 1;
    return wait_for(sub {
        my @l = grep { /is \Q$what\E/ } changes($pool, $peer);
        return @l >= $count ? $l[$count - 1] : 0;
    }, $timeout // 5);
}

sub peer { '127.0.0.1:' . port($_[0]) }

# one session with one transaction; returns the RCPT and end-of-data
# replies
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

# connections of a backend, once they are over
sub settled {
    my ($be) = @_;
    my $k = $be->connections;
    $be->wait_closed($_, 3) for 1 .. $k;
    return $k;
}

my $PROBE = "EHLO probe.test\r\nQUIT\r\n";

$n = start_nginx2($conf);
my $t0 = time;

# mandatory: the only peer is stalled in its greeting, its first check
# is under way for 3 s: it is unhealthy until then and gets no connection

{
    my $c = smtp_client('s_mand');
    $c->expect(qr/^220 /, 'mandatory: greeting');
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    my $t = time;
    $c->cmd('RCPT TO:<c@d.test>', qr/^451 4\.4\.1 /,
        'mandatory: no transaction before the first good check');
    ok(time - $t < 0.5, 'mandatory: refused at once, no connect tried');
    $c->cmd('QUIT', qr/^221 /);
    sleep(0.7);
    is($b{ms}->connections, 1, 'mandatory: the backend saw the probe only');
}

# a mandatory peer that passes its first check serves at once

ok(wait_change('mg', peer('mgood'), 'healthy again', 1, 3),
    'mandatory: healthy after the first good check');
{
    my ($rcpt, $dot) = session('s_mg');
    like($dot, qr/^250 2\.0\.0 /, 'mandatory: delivered after the check');
    is($b{mgood}->raw(1), "EHLO mg.test\r\nQUIT\r\n",
        'mandatory: the probe came first');
}

# a 421 greeting: unhealthy after fails=2 checks, logged once for the node

my $l = wait_change('hc', peer('b1'), 'unhealthy', 1, 5);
my $g421 = qr/greeting 421 4\.3\.2 Service shutting down$/;
like($l, qr/upstream "hc" peer \Q${\ peer('b1')}\E is unhealthy: $g421/,
    '421 greeting: warn line names the pool, the peer and the greeting');
is(scalar(changes('hc', peer('b1'))), 1, 'one line for the node');
ok(settled($b{b1}) >= 2, 'unhealthy after 2 failed checks');

# now it greets but rejects EHLO: still unhealthy, no transactions

$b{b1}->stop();
$b{b1} = start_backend(name => 'b1',
    args => ['--ehlo-reply', '550 5.7.1 Go away']);
ok(wait_for(sub { $b{b1}->connections >= 3 }, 5), 'rejecting peer probed');

for my $i (1 .. 4) {
    my ($rcpt, $dot) = session('s_hc');
    like($dot, qr/^250 2\.0\.0 /, "unhealthy peer: session $i delivered");
}
{
    my $k = settled($b{b1});
    is(scalar($b{b1}->messages), 0, 'unhealthy peer got no transaction');
    is(scalar(grep { $b{b1}->raw($_) eq $PROBE } 1 .. $k), $k,
        'unhealthy peer: only probes, EHLO then QUIT');
    is(scalar($b{a1}->messages), 4, 'all mail went to the healthy peer');
}
is(scalar(changes('hc', peer('b1'))), 1, 'no state change while rejecting');

# good again: healthy after passes=2 good checks

$b{b1}->stop();
$b{b1} = start_backend(name => 'b1');
$l = wait_change('hc', peer('b1'), 'healthy again', 1, 5);
like($l, qr/upstream "hc" peer \Q${\ peer('b1')}\E is healthy again$/,
    'healthy again logged');
{
    my $k = settled($b{b1});
    ok($k >= 2, "healthy after 2 good checks ($k probes)");
    is($b{b1}->raw(1), $PROBE, 'probe transcript: EHLO name, QUIT');
    is_deeply([$b{b1}->commands(1)], ['EHLO probe.test', 'QUIT'],
        'probe commands at the backend');
}
for my $i (1 .. 4) {
    my ($rcpt, $dot) = session('s_hc');
    like($dot, qr/^250 2\.0\.0 /, "healthy again: session $i delivered");
}
settled($b{b1});
is(scalar($b{b1}->messages), 2, 'the recovered peer gets its share');

# one probe per peer and interval for the node, not per worker

{
    my $k0 = $b{a1}->connections;
    my $t = time;
    sleep(3);
    my $got = $b{a1}->connections - $k0;
    my $want = (time - $t) / 0.3;
    ok($got >= 0.6 * $want && $got <= 1.4 * $want,
        sprintf('%d probes in %.1f s at interval 300ms (about %d)',
            $got, time - $t, $want));
}

# a good check ends a passive fail_timeout period: px refuses one
# connection (max_fails=1 fail_timeout=60s), is back at once, and gets
# its share again after its next good check, not 60 s later

$b{px}->stop();
for my $i (1 .. 2) {
    my ($rcpt, $dot) = session('s_pf');
    like($dot, qr/^250 2\.0\.0 /, "passive failure: session $i delivered");
}
is(scalar($b{py}->messages), 2, 'passive failure: py took both');
like(error_log($n), qr/\[error\].* backend \Q${\ peer('px')}\E /,
    'passive failure: px was tried');
$b{px} = start_backend(name => 'px');
ok(wait_for(sub { $b{px}->connections >= 1 && $b{px}->closed(1) }, 3),
    'px probed again');
for my $i (1 .. 4) {
    my ($rcpt, $dot) = session('s_pf');
    like($dot, qr/^250 2\.0\.0 /, "after a good check: session $i");
}
settled($b{px});
# its weight comes back gradually, as after any failure
ok(scalar($b{px}->messages) >= 1, 'after a good check px is used again');

# refused port

like(wait_change('dead', peer('dead'), 'unhealthy', 1, 3),
    qr/is unhealthy: connect\(\) failed \(111: Connection refused\)$/,
    'refused: the connect error is the reason');

# stalled after the greeting: timeout; the default EHLO name is the host's

like(wait_change('st', peer('se'), 'unhealthy', 1, 3),
    qr/is unhealthy: timeout$/, 'stalled EHLO: timeout');
$b{se}->wait_closed(1, 2);
is($b{se}->raw(1), 'EHLO ' . lc(hostname()) . "\r\n",
    'default EHLO name: the host name');

# backups are probed, down peers never

{
    my $bk = $b{bk}->connections;
    ok($bk >= 3, "backup probed ($bk probes)");
    is($b{bk}->raw(1), 'EHLO ' . lc(hostname()) . "\r\nQUIT\r\n",
        'backup probe transcript');
    is($b{dn}->connections, 0, 'down peer never probed');
    ok($b{p4}->connections >= 3, 'primary probed');
}

# mandatory first check timed out: logged, the peer stays out

like(wait_change('mand', peer('ms'), 'unhealthy', 1, 5),
    qr/is unhealthy: timeout$/, 'mandatory: failed first check logged');

# reload with a probe under way (slow: stalled greeting, 20 s timeout):
# the old workers close it and exit at once; mandatory peers are checked
# again at once, not an interval later

{
    ok($b{sl}->connections >= 1 && !$b{sl}->closed($b{sl}->connections),
        'a probe is under way');
    my $k = $b{sl}->connections;
    my $old = nginx_workers($n);
    my $t = time;
    kill 'HUP', $n->pid;
    ok(wait_for(sub {
        my $w = nginx_workers($n);
        return !grep { exists $w->{$_} } keys %$old;
    }, 5), 'old workers exited');
    ok(time - $t < 3, sprintf('in %.1f s', time - $t));
    ok($b{sl}->wait_closed($k, 3), 'the probe under way was closed');
    ok(wait_change('mg', peer('mgood'), 'healthy again', 2, 3),
        'mandatory peer checked again right after the reload');
    my ($rcpt, $dot) = session('s_mg');
    like($dot, qr/^250 2\.0\.0 /, 'mandatory pool serves after the reload');
}

ok(error_log_clean($n), 'no alert in the error log');
unlike(error_log($n), qr/open socket .* left/, 'no socket left open');

diag(sprintf('%.1f s', time - $t0));

done_testing();
