#!/usr/bin/perl

# Break attempts on smtp_ext_ratelimit (SPEC §10): GCRA exactness (burst,
# then one per period/N, refused events not counted), the reply text, the
# TTL bound, dry_run, and Redis answers arriving for sessions already gone
# (client RST or pregreet while the connect check is pending).

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

my $n = start_nginx(<<'EOF2');
mail {
    server_name mx.test;
    smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% prefix=rl: timeout=2s;

    server {
        listen 127.0.0.1:%%PORT_g%%;
        protocol smtp_ext;
        smtp_ext_ratelimit connect ip 4/s burst=3;
    }
    server {
        listen 127.0.0.1:%%PORT_d%%;
        protocol smtp_ext;
        smtp_ext_ratelimit connect ip 1/m dry_run;
    }
    server {
        listen 127.0.0.1:%%PORT_p%%;
        protocol smtp_ext;
        smtp_ext_greeting_delay 300ms;
        smtp_ext_ratelimit connect ip 100/s;
    }
}
EOF2
my $wpid = $n->worker_pid;

my $greeting = qr/^220 mx\.test ESMTP\r\n\z/;
my $slow = "421 4.7.0 Too many connections, slow down\r\n";

sub conn {
    my ($port, $local) = @_;
    my $c = smtp_client($port, local => $local);
    my $rep = $c->reply(3) // '';
    close $c->sock;
    return $rep;
}

# GCRA: burst 3 at once, then one every 250 ms; refusals do not count
{
    sleep(1);
    my @rep = map { conn('g', '127.0.0.2') } 1 .. 3;
    like($_, $greeting, 'burst: greeted') for @rep;
    is(conn('g', '127.0.0.2'), $slow, 'past the burst: the exact reply');
    # hammer: every one refused, none counted
    my $t0 = time;
    my $refused = 0;
    while (time - $t0 < 0.15) {
        $refused++ if conn('g', '127.0.0.2') eq $slow;
    }
    ok($refused > 0, "refused while hammering ($refused)");
    sleep(0.35 - (time - $t0) > 0 ? 0.35 - (time - $t0) : 0);
    like(conn('g', '127.0.0.2'), $greeting,
        'one period (250 ms) after the burst: one more, despite refusals');
    is(conn('g', '127.0.0.2'), $slow, 'and only one');
    my $pttl = $r->cmd('PTTL', 'rl:ratelimit:connect:ip:127.0.0.2');
    ok($pttl > 0 && $pttl <= 1000,
        "TTL at most burst x period / N, rounded up to a second ($pttl)");
}

# dry_run never refuses
{
    like(conn('d', '127.0.0.3'), $greeting, "dry_run: $_") for 1 .. 3;
    like($n->error_log, qr/\[info\].*dry run: rate limit exceeded: event=connect key=ip value="127\.0\.0\.3" client=127\.0\.0\.3/,
        'dry_run: logged at info');
}

# Redis stalled: the sessions leave (RST, pregreet) while checks pend
{
    $r->stall;
    my @c;
    for my $i (1 .. 5) {
        my $c = smtp_client('p', local => '127.0.0.4');
        push @c, $c;
    }
    $c[0]->send("EHLO early\r\n");
    is($c[0]->reply(3),
        "554 5.5.1 Protocol error: talking before the greeting\r\n",
        'pregreet while the connect check pends: refused');
    for my $c (@c) {
        use Socket qw(SOL_SOCKET SO_LINGER);
        setsockopt($c->sock, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
        close $c->sock;
    }
    sleep(0.5);
    $r->resume;
    sleep(1);
    is($n->worker_pid, $wpid, 'answers for gone sessions: the worker lives');
    like(conn('p', '127.0.0.5'), $greeting, 'a new session is greeted');
}

unlike($n->error_log, qr/\[alert\]|\[crit\]|\[emerg\]|exited on signal/,
    'no alerts');

done_testing();
