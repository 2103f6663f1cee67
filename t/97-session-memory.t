#!/usr/bin/perl

# A session's memory is bounded by the configured limits, not by the
# client's persistence (SPEC §5): one session sends 20,000 each of
# recipients refused by the backend (550, 450), recipients routed elsewhere
# (452), recipients without a route (554), recipients looked up while
# Redis is down (451) and NOOPs, all
# pipelined, inside one open transaction.  The worker may grow by less
# than 2 MB per batch, or end the session with 421 4.7.0 once the
# refusals reach max_errors (set far above the batch here, so in practice
# only the first is possible).

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(time);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $BATCH = $ENV{SMTP_EXT_MEMORY_BATCH} || 20000;
my $WARMUP = 2000;
my $LIMIT_KB = 2048;
my $MAX_ERRORS = 1000000;

# recipients with the longest local part RFC 5321 allows (64 octets), as
# a persistent client would choose them: memory kept per refused command
# shows as its size
sub local_part {
    my ($tag, $i) = @_;
    my $l = "$tag-$i-";
    return $l . ('x' x (64 - length $l));
}

my $r = start_redis();
$r->cmd('SET', 'domain:a.test', 'poolA');
$r->cmd('SET', 'domain:b.test', 'poolB');

my $ba = start_backend(name => 'ba', args => [
    '--caps', 'PIPELINING,ENHANCEDSTATUSCODES',
    '--rcpt', '<r550-=550 5.1.1 No such user',
    '--rcpt', '<grey-=450 4.2.0 greylisted',
]);
my $bb = start_backend(name => 'bb',
    args => ['--caps', 'PIPELINING,ENHANCEDSTATUSCODES']);

my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=1s;

    smtp_ext_upstream poolA {
        server 127.0.0.1:%%PORT_ba%%;
    }
    smtp_ext_upstream poolB {
        server 127.0.0.1:%%PORT_bb%%;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass poolA;
        max_errors $MAX_ERRORS;
        timeout 60s;
    }
}
EOF

my $c = smtp_client('smtp', timeout => 10);
$c->expect(qr/^220 /, 'greeting');
like($c->ehlo(), qr/^250[- ]/, 'EHLO');
$c->cmd('MAIL FROM:<sender@client.test>', qr/^250 2\.1\.0/, 'MAIL');
$c->cmd('RCPT TO:<ok@a.test>', qr/^250 2\.1\.5/,
    'first recipient accepted: the transaction goes to pool A');

my $start_rss = worker_rss($n);
my $closed = 0;
my $refusals = 0;
my $total_t0 = time;

# one batch: $count commands made by $make->($i), every reply must match
# $want.  Returns the number of matching replies; a 421 4.7.0 that ends
# the session is accepted only once the refusals reached max_errors.
sub batch {
    my ($make, $count, $want) = @_;
    my @cmds = map { $make->($_) } 1 .. $count;
    my $got = $c->pipeline(\@cmds, timeout => 120);
    my $ok = 0;
    for my $reply (@$got) {
        if ($reply =~ /^\d{3}[ -]/ && $reply =~ $want) {
            $ok++;
            $refusals++ if $reply =~ /^[45]/;
            next;
        }
        if ($reply =~ /^421 4\.7\.0 /) {
            $closed = $reply;
            last;
        }
        diag("unexpected reply: $reply");
        last;
    }
    return $ok;
}

# a phase: warm up, measure, $BATCH commands, measure
sub phase {
    my ($name, $make, $want) = @_;

    SKIP: {
        skip("session closed", 2) if $closed;

        my $ok = batch($make, $WARMUP, $want);
        my $before = worker_rss($n);
        my $t0 = time;
        $ok += batch(sub { $make->($WARMUP + $_[0]) }, $BATCH, $want);
        my $secs = time - $t0;
        my $after = worker_rss($n);
        my $growth = $after - $before;

        diag(sprintf("%s: %d commands in %.1f s, worker RSS %d -> %d kB"
            . " (%+d kB)", $name, $BATCH, $secs, $before, $after,
            $growth));

        if ($closed) {
            ok($refusals >= $MAX_ERRORS, "$name: the session ended with"
                . " 421 4.7.0 only at max_errors ($refusals refusals)")
                or diag($closed);
            ok($c->closed(3), "$name: closed after the 421 4.7.0");
            next;
        }

        is($ok, $WARMUP + $BATCH, "$name: every command got $want");
        SKIP: {
            # ASan's quarantine keeps freed memory: RSS says nothing
            skip("$name: RSS under AddressSanitizer", 1)
                if SmtpExt::Test::is_asan();
            cmp_ok($growth, '<', $LIMIT_KB,
                "$name: worker grew by less than 2 MB over $BATCH commands");
        }
    }
}

phase('RCPT 550 from the backend',
    sub { 'RCPT TO:<' . local_part('r550', $_[0]) . '@a.test>' }, qr/^550 5\.1\.1 No such user/);

phase('RCPT 450 from the backend (greylisting)',
    sub { 'RCPT TO:<' . local_part('grey', $_[0]) . '@a.test>' }, qr/^450 4\.2\.0 greylisted/);

phase('RCPT 452 routed elsewhere',
    sub { 'RCPT TO:<' . local_part('u', $_[0]) . '@b.test>' }, qr/^452 4\.5\.3 /);

phase('RCPT 554 relay access denied (no route)',
    sub { 'RCPT TO:<' . local_part('n', $_[0]) . '@c.test>' },
    qr/^554 5\.7\.1 /);

phase('NOOP', sub { 'NOOP' }, qr/^250 2\.0\.0/);

$r->kill();

phase('RCPT 451 with Redis down',
    sub { 'RCPT TO:<' . local_part('x', $_[0]) . '@a.test>' }, qr/^451 4\.3\.0 /);

my $end_rss = worker_rss($n);
diag(sprintf("whole session: %.1f s, worker RSS %d -> %d kB (%+d kB)",
    time - $total_t0, $start_rss, $end_rss, $end_rss - $start_rss));

# the backend saw each refused recipient exactly once
my @cmds = $ba->commands(1);
is(scalar(grep { /^RCPT TO:<r550-/ } @cmds), $WARMUP + $BATCH,
    'backend A got every 550 recipient once');
is(scalar(grep { /^RCPT TO:<grey-/ } @cmds), $WARMUP + $BATCH,
    'backend A got every 450 recipient once');
is(scalar(grep { /\@[bc]\.test/ } @cmds), 0,
    'backend A got no recipient routed elsewhere or refused');
is($bb->connections(), 0, 'pool B was never connected');

SKIP: {
    skip("session closed", 2) if $closed;
    $c->cmd('RSET', qr/^250 2\.0\.0/, 'the session still works: RSET');
    $c->cmd('QUIT', qr/^221 2\.0\.0/, 'QUIT');
}

ok(error_log_clean($n), 'no alerts in the error log');

done_testing();
