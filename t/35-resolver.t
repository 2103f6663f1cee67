#!/usr/bin/perl

# The client's name for XCLIENT NAME= through the mail "resolver": a PTR
# lookup, then a forward lookup that must lead back to the client, before
# the greeting (SPEC §3, docs/directives.md "resolver").

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);
use SmtpExt::Test;

require_programs(nginx_bin());

my $ptr = '1.0.0.127.in-addr.arpa';
my $dns_script = 't/bin/dns-server.pl';

# one dns-server.pl per server block: every client is 127.0.0.1

my @dns;

sub start_dns {
    my ($name, @args) = @_;
    my $dir = testdir() . "/dns-$name";
    mkdir $dir or die "$dir: $!";
    my $pidfile = "$dir/pid";
    # in the parent: a port first taken in the child would be lost
    my $p = port("dns_$name");

    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', "$dir/stdout.log";
        open STDERR, '>', "$dir/stderr.log";
        exec($^X, $dns_script, '--port', $p,
            '--pidfile', $pidfile, '--log', "$dir/queries.log", @args)
            or POSIX::_exit(127);
    }

    my $d = { pid => $pid, dir => $dir };
    push @dns, $d;

    my $ok = wait_for(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        return -e $pidfile ? 1 : 0;
    }, 10);
    if ($ok != 1) {
        diag(read_file("$dir/stderr.log") // '');
        die "dns server $name did not start\n";
    }
    return $d;
}

sub queries {
    my ($d) = @_;
    return read_file("$d->{dir}/queries.log") // '';
}

END {
    local $?;
    for my $d (@dns) {
        kill 'TERM', $d->{pid};
    }
    for my $d (@dns) {
        my $gone = wait_for(sub { waitpid($d->{pid}, WNOHANG) != 0 }, 3);
        if (!$gone) {
            kill 'KILL', $d->{pid};
            waitpid($d->{pid}, 0);
        }
    }
}

# name => [dns-server arguments, extra directives]; no arguments: no
# resolver at all

my %case = (
    ok => [['--ptr', "$ptr=client.example.test",
            '--a', 'client.example.test=127.0.0.9',
            '--a', 'client.example.test=127.0.0.1'], ''],
    # A only
    ok4 => [['--ptr', "$ptr=client4.example.test",
            '--a', 'client4.example.test=127.0.0.1'], 'ipv6=off'],
    nx => [['--nxdomain', $ptr], ''],
    mismatch => [['--ptr', "$ptr=other.example.test",
            '--a', 'other.example.test=127.0.0.2'], ''],
    fwd_nx => [['--ptr', "$ptr=gone.example.test"], ''],
    underscore => [['--ptr', "$ptr=bad_name.example",
            '--a', 'bad_name.example=127.0.0.1'], ''],
    space => [['--ptr', "$ptr=x y",
            '--a', 'x y=127.0.0.1'], ''],
    servfail => [['--servfail', $ptr], ''],
    fwd_servfail => [['--ptr', "$ptr=flaky.example.test",
            '--servfail', 'flaky.example.test'], ''],
    drop => [['--drop', $ptr], ''],
    gone => [['--drop', $ptr], ''],
    idle => [['--drop', $ptr], ''],
    none => [undef, ''],
);

my (%dns, %backend);
my $servers = '';

for my $name (sort keys %case) {
    my ($args, $extra) = @{ $case{$name} };
    $backend{$name} = start_backend(name => "b_$name");

    my $res = '';
    if ($args) {
        $dns{$name} = start_dns($name, @$args);
        my $rt = $name =~ /^(drop|gone)$/ ? '1s'
            : $name eq 'idle' ? '4s' : '5s';
        $res = "        resolver 127.0.0.1:%%PORT_dns_$name%%"
            . ($extra ? " $extra" : '') . ";\n"
            . "        resolver_timeout $rt;\n";
    }
    # the client's own timeout ends a session still waiting for the name
    $res .= "        timeout 1s;\n" if $name eq 'idle';

    $servers .= <<"EOF";
    server {
        listen 127.0.0.1:%%PORT_s_$name%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_$name%%;
$res    }
EOF
}

my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;
$servers}
EOF

my $tail = "MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\nDATA\r\n"
    . "hi\r\n.\r\nQUIT\r\n";

# one transaction; returns the client's port and the greeting's delay
sub transaction {
    my ($name) = @_;
    my $start = time;
    my $c = smtp_client("s_$name", timeout => 8);
    $c->expect(qr/^220 /, "$name: greeting");
    my $delay = time - $start;
    $c->cmd('EHLO client.test', qr/^250[ -]/, "$name: EHLO");
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /, "$name: MAIL");
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /, "$name: RCPT");
    $c->cmd('DATA', qr/^354 /, "$name: DATA");
    $c->send("hi\r\n.\r\n");
    $c->expect(qr/^250 2\.0\.0 /, "$name: queued");
    $c->cmd('QUIT', qr/^221 /, "$name: QUIT");
    return ($c->sock->sockport(), $delay);
}

sub check_name {
    my ($name, $host, $conn) = @_;
    $conn //= 1;
    my ($cport, $delay) = transaction($name);
    my $b = $backend{$name};
    ok($b->wait_closed($conn), "$name: backend session over");
    is($b->raw($conn), "EHLO mx.test\r\n"
        . "XCLIENT ADDR=127.0.0.1 PORT=$cport HELO=client.test"
        . " NAME=$host PROTO=ESMTP\r\n"
        . "EHLO client.test\r\n" . $tail, "$name: NAME=$host");
    return $delay;
}

# a client that waits for a greeting the resolver holds back, and a client
# that leaves before it: both run while the other cases go on

my $idle = smtp_client('s_idle', timeout => 8);
my $idle_start = time;

my $gone = smtp_client('s_gone');
sleep(0.2);
$gone->close();

# confirmed: the PTR name has the client's address among its A records

check_name('ok', 'client.example.test');
like(queries($dns{ok}), qr/^PTR \Q$ptr\E -> 1 records\n/,
    'ok: PTR query');
like(queries($dns{ok}), qr/^A client\.example\.test -> 2 records$/m,
    'ok: forward A query');

check_name('ok4', 'client4.example.test');
unlike(queries($dns{ok4}), qr/^AAAA/m, 'ipv6=off: no AAAA query');

# not found, not confirmed, not a host name

check_name('nx', '[UNAVAILABLE]');
unlike(queries($dns{nx}), qr/^A /m, 'PTR NXDOMAIN: no forward lookup');

check_name('mismatch', '[UNAVAILABLE]');
like(queries($dns{mismatch}), qr/^A other\.example\.test /m,
    'mismatch: forward lookup made');

check_name('fwd_nx', '[UNAVAILABLE]');

check_name('underscore', '[UNAVAILABLE]');
unlike(queries($dns{underscore}), qr/^A /m,
    'invalid name: no forward lookup');

check_name('space', '[UNAVAILABLE]');
unlike(queries($dns{space}), qr/^A /m, 'name with a space: no forward lookup');

# temporary failures

check_name('servfail', '[TEMPUNAVAIL]');
check_name('fwd_servfail', '[TEMPUNAVAIL]');

my $delay = check_name('drop', '[TEMPUNAVAIL]');
cmp_ok($delay, '>=', 0.8, 'no answer: greeting waits for resolver_timeout');
cmp_ok($delay, '<', 5, 'no answer: greeting after resolver_timeout');

# no resolver

$delay = check_name('none', '[UNAVAILABLE]');
cmp_ok($delay, '<', 0.8, 'no resolver: greeting at once');

# cached: the second session gets the answer without a query

my $before = queries($dns{ok});
check_name('ok', 'client.example.test', 2);
is(queries($dns{ok}), $before, 'cached: no new queries');

# the client that left during the lookup: nothing reached the backend

sleep(0.5);
is($backend{gone}->connections(), 0, 'client gone: no backend session');

# the client timeout ended the waiting session (and its pending lookup)

my $r = $idle->reply(6);
ok($idle->closed(6), 'idle client closed while the lookup was pending');
unlike($r // '', qr/^220 /, 'idle client: no greeting');
cmp_ok(time - $idle_start, '<', 3.5, 'idle client: closed by its timeout');

# past the cancelled lookup's resolver_timeout, nginx is still fine

sleep(4.5 - (time - $idle_start)) if time - $idle_start < 4.5;

check_name('ok', 'client.example.test', 3);
is($backend{idle}->connections(), 0, 'idle: no backend session');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
