#!/usr/bin/perl

# Redis behind Sentinel (SPEC §11): a real master, replica and Sentinel;
# two nginx nodes send mail continuously while the master is killed.
# Only temporary errors during the switch, never a 5xx, never a 250 for
# a message the backend did not get; mail flows again within
# 2 * timeout + 1s of the moment the Sentinel names the promoted replica;
# every acknowledged message at the backend exactly once.  A sentinel
# that names a replica (failed ROLE check) and a master demoted under
# the module (-READONLY) make it ask again.  nginx -t refuses an unknown
# sentinel name.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(time sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $timeout = 1;    # the module's timeout=1s

# nginx -t: an unknown sentinel name is a configuration error

{
    my ($rc, $out) = nginx_t(<<'EOF');
mail {
    smtp_ext_redis_sentinel other 127.0.0.1:%%PORT_s1%%;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_redis sentinel:mymaster timeout=1s;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
}
EOF
    isnt($rc, 0, 'nginx -t: unknown sentinel name fails');
    like($out, qr/unknown Redis sentinel "mymaster"/,
        'nginx -t: names the unknown sentinel');

    ($rc, $out) = nginx_t(<<'EOF');
mail {
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_redis sentinel:mymaster timeout=1s;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }

    # defined after its use: still found
    smtp_ext_redis_sentinel mymaster 127.0.0.1:%%PORT_s1%% password=x;
}
EOF
    is($rc, 0, 'nginx -t: sentinel defined after use') or diag($out);
}

my $b1 = start_backend(name => 'b1');

sub populate {
    my ($r) = @_;
    $r->cmd('SET', 'domain:example.org', '127.0.0.1:' . $b1->port);
    $r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');
}

sub replica_up {
    my ($r) = @_;
    return wait_for(sub {
        my $i = eval { $r->cmd('INFO', 'replication') } // '';
        return $i =~ /master_link_status:up/ ? 1 : 0;
    }, 15) == 1;
}

my $m = start_redis(name => 'rm');
populate($m);
my $rr = start_redis(name => 'rr',
    args => ['--replicaof', '127.0.0.1', $m->port]);
ok(replica_up($rr), 'replica in sync');

my $s1 = start_redis(name => 's1', sentinel => 1, conf => <<"EOF");
sentinel resolve-hostnames no
sentinel monitor mymaster 127.0.0.1 ${\ $m->port} 1
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 4000
sentinel parallel-syncs mymaster 1
EOF

sub sentinel_master {
    my $a = eval { $s1->cmd('SENTINEL', 'get-master-addr-by-name',
        'mymaster') };
    return ref $a eq 'ARRAY' ? $a->[1] : undef;
}

# the sentinel must know the replica before it can promote it
ok(wait_for(sub {
    my $l = eval { $s1->cmd('SENTINEL', 'replicas', 'mymaster') };
    return 0 unless ref $l eq 'ARRAY';
    for my $r (@$l) {
        my %h = @$r;
        return 1 if ($h{port} // 0) == $rr->port
            && ($h{flags} // '') eq 'slave'
            && ($h{'master-link-status'} // '') eq 'ok';
    }
    return 0;
}, 20) == 1, 'sentinel knows the replica');

is(sentinel_master(), $m->port, 'sentinel names the master');

# a fake sentinel: answers get-master-addr-by-name with the port in a file

my $fake_file = SmtpExt::Test::testdir() . '/fake-master';
my $fake_pid;

sub fake_names { write_file($fake_file, $_[0]) }

sub start_fake_sentinel {
    my $l = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
        LocalPort => SmtpExt::Test::port('fs'), Listen => 16,
        ReuseAddr => 1) or die "fake sentinel: $!\n";
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        $SIG{TERM} = sub { POSIX::_exit(0) };
        for (;;) {
            my $c = $l->accept() or next;
            my $buf = '';
            while ($buf !~ /get-master-addr-by-name\r\n\$\d+\r\n[^\r]*\r\n/) {
                my $n = sysread($c, $buf, 4096, length $buf);
                last unless $n;
            }
            my $p = SmtpExt::Test::read_file($fake_file) // '';
            chomp $p;
            syswrite($c, $p eq '' ? "*-1\r\n"
                : "*2\r\n\$9\r\n127.0.0.1\r\n\$" . length($p) . "\r\n$p\r\n");
            close $c;
        }
    }
    close $l;
    $fake_pid = $pid;
}

END {
    if ($fake_pid) {
        kill 'TERM', $fake_pid;
        waitpid($fake_pid, 0);
    }
}

# fake sentinel part: A replica of B at first
my $ra = start_redis(name => 'ra');
my $rb = start_redis(name => 'rb');
populate($rb);
$ra->cmd('REPLICAOF', '127.0.0.1', $rb->port);
ok(replica_up($ra), 'A is a replica of B');
fake_names($ra->port);
start_fake_sentinel();

SmtpExt::Test::port('nosentinel');    # reserved, nothing listens there

my $conf = <<'EOF';
mail {
    server_name mx.test;

    # the first sentinel is down: asked in turn
    smtp_ext_redis_sentinel mymaster 127.0.0.1:%%PORT_nosentinel%%
                                     127.0.0.1:%%PORT_s1%%;
    smtp_ext_redis_sentinel fake 127.0.0.1:%%PORT_fs%%;

    server {
        listen 127.0.0.1:%%PORT_NODE%%;
        protocol smtp_ext;
        smtp_ext_redis sentinel:mymaster timeout=1s;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        timeout 30s;
    }

    server {
        listen 127.0.0.1:%%PORT_NODEf%%;
        protocol smtp_ext;
        smtp_ext_redis sentinel:fake timeout=1s;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_auth plain;
        smtp_ext_auth_fail_limit 1000;
        timeout 30s;
    }
}
EOF

my @nodes;
for my $i (1, 2) {
    (my $c = $conf) =~ s/%%PORT_NODE(f?)%%/%%PORT_smtp$i$1%%/g;
    push @nodes, start_nginx($c, workers => 2);
}

# one message through a node; returns (RCPT reply, final reply)
my $seq = 0;
my %sent;    # seq => acknowledged

sub message {
    my ($port) = @_;
    my $id = ++$seq;
    my $c = eval { smtp_client($port, timeout => 5) } or return ('', '');
    my $rc = '';
    my $fin = '';
    eval {
        $c->expect(qr/^220 /);
        $c->cmd('EHLO client.test', qr/^250 /m);
        $c->cmd('MAIL FROM:<s@x.test>', qr/^250 /);
        $c->send("RCPT TO:<bob\@example.org>\r\n");
        $rc = $c->reply(5) // '';
        if ($rc =~ /^250 /) {
            $c->send("DATA\r\n");
            my $d = $c->reply(5) // '';
            die "DATA: $d" unless $d =~ /^354 /;
            $c->send("Subject: seq $id\r\n\r\nbody $id\r\n.\r\n");
            $fin = $c->reply(5) // '';
            $sent{$id} = 1 if $fin =~ /^250 /;
        }
        $c->send("QUIT\r\n");
        $c->close();
    };
    return ($rc, $fin);
}

for my $i (1, 2) {
    my ($rc, $fin) = message("smtp$i");
    like($fin, qr/^250 /, "node $i: mail flows through the sentinel's master");
}

# the master is killed while mail flows through both nodes

my $t_kill = time;
$m->kill();

my ($t_switch, $t_flow);
my (@bad, $tempfails, $after_flow_fail);
my $end = $t_kill + 30;

while (time < $end) {
    if (!defined $t_switch) {
        my $p = sentinel_master();
        $t_switch = time if defined $p && $p == $rr->port;
    }

    for my $i (1, 2) {
        my $t0 = time;
        my ($rc, $fin) = message("smtp$i");

        if ($rc =~ /^451 4\.3\.0 /) {
            $tempfails++;
            $after_flow_fail++ if defined $t_flow;
        } elsif ($rc =~ /^250 /) {
            push @bad, "seq $seq: DATA answered '$fin'"
                unless $fin =~ /^250 /;
            $t_flow //= time if defined $t_switch && $t0 > $t_switch;
        } else {
            push @bad, "seq $seq: RCPT answered '$rc'";
        }
    }

    last if defined $t_flow && time > $t_flow + 2;
    sleep(0.15);
}

ok(!@bad, 'only 451 4.3.0 or an end-to-end 250 during the failover')
    or diag(join "\n", @bad);
ok($tempfails, "lookups failed temporarily while there was no master "
    . "($tempfails)");
ok(defined $t_switch, 'the sentinel promoted the replica')
    and diag(sprintf 'promotion seen %.1fs after the kill',
        $t_switch - $t_kill);
ok(defined $t_flow, 'mail flows again after the promotion');
if (defined $t_flow) {
    cmp_ok($t_flow - $t_switch, '<=', 2 * $timeout + 1,
        'within 2 * timeout + 1s of the promotion')
        and diag(sprintf 'flowing %.2fs after the promotion',
            $t_flow - $t_switch);
}
ok(!$after_flow_fail, 'no failure once mail flows again');

# every acknowledged message exactly once at the backend

{
    my %got;
    for my $msg ($b1->messages()) {
        $got{$1}++ while $msg =~ /^Subject: seq (\d+)\r?$/mg;
    }
    my @missing = grep { !$got{$_} } sort { $a <=> $b } keys %sent;
    my @dup = grep { $got{$_} > 1 } keys %got;
    my @extra = grep { !$sent{$_} } keys %got;
    ok(!@missing, scalar(keys %sent) . ' acknowledged messages delivered')
        or diag("missing: @missing");
    ok(!@dup, 'none twice') or diag("twice: @dup");
    ok(!@extra, 'none delivered without a 250')
        or diag("unacknowledged: @extra");
}

# a sentinel that names a replica: ROLE check fails, 451, asked again

like((message('smtp1f'))[0], qr/^451 4\.3\.0 /,
    'sentinel names a replica: 451 4.3.0');
ok(wait_for(sub { error_log($nodes[0]) =~ /is not a master/ }, 5),
    'failed ROLE check logged');

fake_names($rb->port);
my $t0 = time;
ok(wait_for(sub { (message('smtp1f'))[0] =~ /^250 / }, 10),
    'sentinel names the master: mail flows');
cmp_ok(time - $t0, '<=', 2 * $timeout + 1, 'within 2 * timeout + 1s');

# B demoted under the module: reads still work, a write gets -READONLY

$ra->cmd('REPLICAOF', 'NO', 'ONE');
$rb->cmd('REPLICAOF', '127.0.0.1', $ra->port);
ok(replica_up($rb), 'B is a replica of A now');
fake_names($ra->port);

sub failed_auth {
    my $c = smtp_client('smtp1f', timeout => 5);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->send('AUTH PLAIN ' . b64("\0alice\0wrong") . "\r\n");
    my $r = $c->reply(5) // '';
    $c->send("QUIT\r\n");
    $c->close();
    return $r;
}

like(failed_auth(), qr/^535 /, 'failed AUTH while connected to B');
ok(wait_for(sub { error_log($nodes[0]) =~ /is read-only now/ }, 5),
    '-READONLY from the demoted master logged');
ok(wait_for(sub {
    failed_auth();
    return ($ra->cmd('GET', 'authfail:127.0.0.1') // 0) > 0;
}, 2 * $timeout + 3), 'failed AUTHs counted on the new master A');
like((message('smtp1f'))[1], qr/^250 /, 'mail flows through A');

for my $n (@nodes) {
    ok(error_log_clean($n), 'no alert or crash in the error log');
}

done_testing();
