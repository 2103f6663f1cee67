#!/usr/bin/perl

# AUTH hardening (SPEC §5): a session counts as authenticated only after a
# verified password.  Every other end of an AUTH exchange (an overlong
# line, "*", bad base64, a wrong password, Redis stopped or stalled, the
# client leaving) leaves it unauthenticated: MAIL under
# smtp_ext_require_auth gets 530 5.7.0, a relay RCPT gets 554 5.7.1, the
# user's own route is not used and the backend never sees LOGIN=.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
my $r2 = start_redis(name => 'redis2');
my $b1 = start_backend(name => 'b1');
my $b2 = start_backend(name => 'b2');

for my $rr ($r, $r2) {
    $rr->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');
    # a user with a route of its own: mail it submits goes to b2
    $rr->cmd('HSET', 'user:admin', 'password', '{PLAIN}admin-pw', 'route',
        'pool2');
    $rr->cmd('HSET', 'user:slow', 'password',
        hash_sha512('slow-pw', 400000));
}
# a check of a few seconds, longer than "timeout 1s"
$r->cmd('HSET', 'user:slowest', 'password',
    hash_sha512('slowest-pw', 3000000));

my $n = start_nginx(<<'EOF');
worker_shutdown_timeout 1s;

mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;

    smtp_ext_upstream pool1 {
        server 127.0.0.1:%%PORT_b1%%;
    }

    smtp_ext_upstream pool2 {
        server 127.0.0.1:%%PORT_b2%%;
    }

    server {
        listen 127.0.0.1:%%PORT_submit%%;
        protocol smtp_ext;
        smtp_ext_pass pool1;
        smtp_ext_auth plain login cram-md5;
        smtp_ext_require_auth on;
        smtp_ext_auth_fail_limit 1000;
        max_errors 0;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass pool1;
        smtp_ext_auth plain login cram-md5;
        smtp_ext_auth_fail_limit 1000;
        max_errors 0;
    }

    # lookups that outlast worker_shutdown_timeout
    server {
        listen 127.0.0.1:%%PORT_long%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis2%% timeout=10s;
        smtp_ext_pass pool1;
        smtp_ext_auth plain;
    }

    # a Redis of its own, stopped and stalled below
    server {
        listen 127.0.0.1:%%PORT_r2%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis2%% timeout=500ms;
        smtp_ext_pass pool1;
        smtp_ext_auth plain login;
        smtp_ext_require_auth on;
        smtp_ext_auth_fail_limit 1000;
        max_errors 0;
    }
}
EOF

my $need_auth = qr/^530 5\.7\.0 Authentication required\r\n\z/;
my $denied = qr/^554 5\.7\.1 Relay access denied\r\n\z/;
my $tempfail = "454 4.7.0 Temporary authentication failure\r\n";
my $ok = "235 2.7.0 Authentication successful\r\n";
my $bad = "535 5.7.8 Authentication credentials invalid\r\n";
my $user_ask = "334 VXNlcm5hbWU6\r\n";
my $pass_ask = "334 UGFzc3dvcmQ6\r\n";
my $too_long = "500 5.5.6 Line too long\r\n";

sub session {
    my ($port) = @_;
    my $c = smtp_client($port, timeout => 5);
    $c->expect(qr/^220 mx\.test ESMTP\r\n\z/);
    $c->cmd('EHLO client.test', qr/^250 HELP\r\n\z/m);
    return $c;
}

sub plain { b64("\0$_[0]\0$_[1]") }

# the connections b1 and b2 got so far
my %seen = (b1 => 0, b2 => 0);

# nothing reached a backend since the last call
sub no_backend {
    my ($what) = @_;
    is($b1->connections() + $b2->connections(), $seen{b1} + $seen{b2},
        "$what: no backend connection");
}

# after an AUTH exchange that did not succeed: still unauthenticated
sub unauthenticated {
    my ($c, $what, $relay) = @_;
    if ($relay) {
        $c->cmd('MAIL FROM:<admin@ex.test>', qr/^250 2\.1\.0 /,
            "$what: MAIL (no require_auth)");
        $c->cmd('RCPT TO:<victim@elsewhere.test>', $denied,
            "$what: relay RCPT 554 5.7.1");
        $c->cmd('RSET', qr/^250 /);
    } else {
        $c->cmd('MAIL FROM:<admin@ex.test>', $need_auth,
            "$what: MAIL 530 5.7.0");
        $c->cmd('RCPT TO:<victim@elsewhere.test>', qr/^503 5\.5\.1 /,
            "$what: RCPT without MAIL 503");
    }
}

# --- the reproducer: AUTH LOGIN user, then an overlong password line

for my $port ('submit', 'smtp') {
    my $relay = $port eq 'smtp';
    my $c = session($port);
    $c->send("AUTH LOGIN\r\n");
    is($c->reply(), $user_ask, "$port: LOGIN Username:");
    $c->send(b64('admin') . "\r\n");
    is($c->reply(), $pass_ask, "$port: LOGIN Password:");
    $c->send(('A' x 600) . "\r\n");
    is($c->reply(), $too_long, "$port: 600-octet password line: 500 5.5.6");
    unauthenticated($c, "$port: overlong password line", $relay);

    # the same with the user name as an initial response
    $c->send('AUTH LOGIN ' . b64('admin') . "\r\n");
    is($c->reply(), $pass_ask, "$port: LOGIN initial user: Password:");
    $c->send(('B' x 2000) . "\r\n");
    is($c->reply(), $too_long, "$port: 2000-octet password line");
    unauthenticated($c, "$port: overlong line after initial user", $relay);

    # a real login still works after that
    $c->cmd('AUTH PLAIN ' . plain('alice', 'secret'), qr/^235 2\.7\.0 /,
        "$port: AUTH after the abandoned exchanges: 235");
    $c->cmd('QUIT', qr/^221 /);
}
no_backend('overlong password lines');
$seen{b1} = $b1->connections();

# --- the other ends of an exchange: "*", bad base64, wrong password

{
    my $c = session('submit');

    $c->send("AUTH LOGIN\r\n");
    $c->reply();
    $c->send(b64('admin') . "\r\n");
    $c->reply();
    $c->send("*\r\n");
    is($c->reply(), "501 5.7.0 Authentication aborted\r\n", '"*": 501');
    unauthenticated($c, 'LOGIN "*"');

    $c->send("AUTH LOGIN\r\n");
    $c->reply();
    $c->send(b64('admin') . "\r\n");
    $c->reply();
    $c->send("!!!!\r\n");
    like($c->reply(), qr/^501 5\.5\.2 /, 'LOGIN bad base64 password: 501');
    unauthenticated($c, 'LOGIN bad base64');

    $c->send("AUTH LOGIN\r\n");
    $c->reply();
    $c->send(b64('admin') . "===\r\n");
    like($c->reply(), qr/^501 5\.5\.2 /, 'LOGIN over-padded user: 501');
    unauthenticated($c, 'LOGIN over-padded user');

    $c->send("AUTH LOGIN\r\n");
    $c->reply();
    $c->send(b64('admin') . "\r\n");
    $c->reply();
    $c->send(b64('wrong') . "\r\n");
    is($c->reply(), $bad, 'LOGIN wrong password: 535');
    unauthenticated($c, 'LOGIN wrong password');

    $c->send('AUTH PLAIN ' . plain('admin', 'wrong') . "\r\n");
    is($c->reply(), $bad, 'PLAIN wrong password: 535');
    unauthenticated($c, 'PLAIN wrong password');

    $c->send('AUTH PLAIN ' . b64("\0admin\0admin-pw\0x") . "\r\n");
    like($c->reply(), qr/^501 5\.5\.2 /, 'PLAIN with a third NUL: 501');
    unauthenticated($c, 'PLAIN third NUL');

    $c->send('AUTH PLAIN ' . plain('nobody', 'x') . "\r\n");
    is($c->reply(), $bad, 'PLAIN unknown user: 535');
    unauthenticated($c, 'PLAIN unknown user');

    $c->send("AUTH CRAM-MD5\r\n");
    my $chal = $c->reply() // '';
    like($chal, qr/^334 /, 'CRAM-MD5 challenge');
    $c->send(cram_md5_response('admin', 'nope', $chal) . "\r\n");
    is($c->reply(), $bad, 'CRAM-MD5 wrong secret: 535');
    unauthenticated($c, 'CRAM-MD5 wrong secret');

    $c->send("AUTH CRAM-MD5\r\n");
    $c->reply();
    $c->send(('C' x 700) . "\r\n");
    is($c->reply(), $too_long, 'CRAM-MD5 overlong response: 500 5.5.6');
    unauthenticated($c, 'CRAM-MD5 overlong response');

    $c->cmd('QUIT', qr/^221 /);
}

# the user's route is not taken by an unverified user either

{
    my $c = session('smtp');
    $c->send('AUTH LOGIN ' . b64('admin') . "\r\n");
    $c->reply();
    $c->send(('A' x 600) . "\r\n");
    $c->reply();
    $c->cmd('MAIL FROM:<admin@ex.test>', qr/^250 /);
    $c->cmd('RCPT TO:<x@nowhere.test>', $denied,
        'unverified user with a route: 554, the route is not used');
    $c->cmd('QUIT', qr/^221 /);
}
no_backend('failed exchanges');

# --- Redis stopped and stalled: 454 4.7.0, then still unauthenticated

{
    my $c = session('r2');
    $c->send('AUTH LOGIN ' . b64('admin') . "\r\n");
    is($c->reply(), $pass_ask, 'r2: Password:');
    $r2->kill();
    $c->send(b64('admin-pw') . "\r\n");
    is($c->reply(), $tempfail, 'Redis stopped: 454 4.7.0');
    unauthenticated($c, 'Redis stopped');
    $c->send('AUTH PLAIN ' . plain('admin', 'admin-pw') . "\r\n");
    is($c->reply(), $tempfail, 'Redis stopped, PLAIN: 454 4.7.0');
    unauthenticated($c, 'Redis stopped, PLAIN');
    $c->cmd('QUIT', qr/^221 /);

    ok($r2->restart(), 'Redis restarted');
    $r2->cmd('HSET', 'user:admin', 'password', '{PLAIN}admin-pw', 'route',
        'pool2');
    $r2->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');

    # stalled: the lookup times out
    $c = session('r2');
    my $rep;
    for (1 .. 20) {
        # the worker reconnects on its own schedule: wait for it
        $c->send('AUTH PLAIN ' . plain('admin', 'wrong') . "\r\n");
        $rep = $c->reply() // '';
        last if $rep eq $bad;
        sleep(0.2);
    }
    is($rep, $bad, 'r2 back: 535 for a wrong password');
    $r2->stall();
    $c->send('AUTH PLAIN ' . plain('admin', 'admin-pw') . "\r\n");
    is($c->reply(3), $tempfail, 'Redis stalled: 454 4.7.0 after the timeout');
    unauthenticated($c, 'Redis stalled');

    # leaving while the lookup is pending (it may still end in a 235 that
    # nobody reads: the worker notices the close only after the lookup)
    my $c2 = session('r2');
    $c2->send('AUTH PLAIN ' . plain('alice', 'secret') . "\r\n");
    sleep(0.1);
    $c2->close();
    $r2->resume();
    $c->cmd('NOOP', qr/^250 /, 'the worker goes on after a client left '
        . 'during a lookup');
    $c->cmd('QUIT', qr/^221 /);
}
no_backend('Redis faults');

# --- disconnects in the middle of an exchange

{
    my $c = session('submit');
    $c->send("AUTH LOGIN\r\n");
    $c->reply();
    $c->send(b64('admin') . "\r\n");
    $c->reply();
    $c->close();

    $c = session('submit');
    $c->send("AUTH PLAIN\r\n");
    $c->reply();
    $c->send(substr(plain('admin', 'admin-pw'), 0, 5));
    $c->close();

    # while the password hash is being checked in a thread
    for (1 .. 5) {
        $c = session('submit');
        $c->send('AUTH PLAIN ' . plain('slow', 'slow-pw') . "\r\n");
        $c->close();
    }
    sleep(0.5);

    $c = session('submit');
    $c->cmd('AUTH PLAIN ' . plain('slow', 'slow-pw'), qr/^235 2\.7\.0 /,
        'slow hash: 235 after others left mid-check');
    $c->cmd('QUIT', qr/^221 /);
}

# --- success still works, and XCLIENT carries LOGIN=; the user's route

{
    my $c = session('submit');
    $c->cmd('AUTH PLAIN ' . plain('alice', 'secret'), qr/^235 2\.7\.0 /,
        'alice: 235');
    $c->cmd('MAIL FROM:<alice@ex.test>', qr/^250 2\.1\.0 /,
        'MAIL after AUTH: 250');
    $c->cmd('RCPT TO:<x@nowhere.test>', qr/^250 2\.1\.5 /);
    $c->cmd('DATA', qr/^354 /);
    $c->send("hi\r\n.\r\n");
    $c->expect(qr/^250 2\.0\.0 /);
    $c->cmd('QUIT', qr/^221 /);
    my $conn = $b1->connections();
    is($conn, $seen{b1} + 1, 'one connection to b1');
    ok($b1->wait_closed($conn), 'b1 closed');
    like($b1->raw($conn), qr/^XCLIENT [^\r\n]* LOGIN=alice\r\n/m,
        'XCLIENT LOGIN=alice');
    $seen{b1} = $conn;

    $c = session('smtp');
    $c->send("AUTH LOGIN\r\n");
    is($c->reply(), $user_ask);
    $c->send(b64('admin') . "\r\n");
    is($c->reply(), $pass_ask);
    $c->send(b64('admin-pw') . "\r\n");
    is($c->reply(), $ok, 'admin via LOGIN: 235');
    $c->cmd('MAIL FROM:<admin@ex.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<x@nowhere.test>', qr/^250 2\.1\.5 /,
        'admin: RCPT on the user route');
    $c->cmd('QUIT', qr/^221 /);
    $conn = $b2->connections();
    is($conn, 1, 'the user route took b2');
    ok($b2->wait_closed($conn), 'b2 closed');
    like($b2->raw($conn), qr/^XCLIENT [^\r\n]* LOGIN=admin\r\n/m,
        'XCLIENT LOGIN=admin');
}

# no backend ever saw the LOGIN= of an unverified user before that

for my $i (1 .. $seen{b1} - 1) {
    unlike($b1->raw($i) // '', qr/LOGIN=admin/,
        "b1 connection $i: no LOGIN=admin");
}

my $log = error_log($n);
my @as_admin = $log =~ /authenticated as "admin"/g;
is(scalar @as_admin, 1, '"authenticated as admin" logged once, at the end');
unlike($log, qr/admin-pw|slow-pw|slowest-pw|secret/,
    'no password in the error log');

# the worker shuts down while a lookup and a password check are pending:
# worker_shutdown_timeout closes their sessions, which take the lookup
# and the check with them

$r2->stall();
my $cl = session('long');
$cl->send('AUTH PLAIN ' . plain('alice', 'secret') . "\r\n");
my $ch = session('submit');
$ch->send('AUTH PLAIN ' . plain('slowest', 'slowest-pw') . "\r\n");
sleep(0.3);
my $worker = worker_pid($n);
kill 'QUIT', $n->pid;
ok(wait_for(sub { !kill(0, $worker) }, 8),
    'worker gone after worker_shutdown_timeout');
ok($cl->closed(2) && $ch->closed(2), 'both sessions closed');
$r2->resume();

like(error_log($n), qr/gracefully shutting down/, 'graceful shutdown');
$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
