#!/usr/bin/perl

# smtp_ext_auth_fail_limit (SPEC §3, §4): the authfail:IP counter in
# Redis, its TTL, the 454 over the limit even with the right password,
# expiry, and the counter shared by two nginx instances.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
my $b1 = start_backend(name => 'b1');

$r->cmd('HSET', 'lim:user:alice', 'password', '{PLAIN}secret');
$r->cmd('HSET', 'win:user:alice', 'password', '{PLAIN}secret');

my $conf = <<'EOF';
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% prefix=lim: timeout=2s;

    server {
        listen 127.0.0.1:%%PORT_NAME%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_auth plain login;
        smtp_ext_auth_fail_limit 3 window=60s;
    }
EXTRA
}
EOF

my $extra = <<'EOF';
    server {
        listen 127.0.0.1:%%PORT_win%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis%% prefix=win: timeout=2s;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_auth plain;
        smtp_ext_auth_fail_limit 2 window=2s;
    }
EOF

(my $c1 = $conf) =~ s/NAME/smtp1/;
$c1 =~ s/EXTRA/$extra/;
(my $c2 = $conf) =~ s/NAME/smtp2/;
$c2 =~ s/EXTRA//;

my $n1 = start_nginx($c1);
my $n2 = start_nginx($c2);

my $ok = qr/^235 2\.7\.0 Authentication successful\r\n\z/;
my $bad = qr/^535 5\.7\.8 Authentication credentials invalid\r\n\z/;
my $limit = qr/^454\ 4\.7\.0\ Too\ many\ authentication\ failures,
    \ try\ again\ later\r\n\z/x;

sub session {
    my ($port) = @_;
    my $c = smtp_client($port, timeout => 5);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 HELP\r\n\z/m);
    return $c;
}

sub auth {
    my ($c, $u, $p, $re, $name) = @_;
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    $c->cmd('AUTH PLAIN ' . b64("\0$u\0$p"), $re, $name);
}

sub counter { $r->cmd('GET', 'lim:authfail:127.0.0.1') // 0 }

# wait until Redis has counted (the INCR is not waited for)
sub counted {
    my ($want) = @_;
    return wait_for(sub { counter() == $want }, 3);
}

ok(!defined $r->cmd('GET', 'lim:authfail:127.0.0.1'), 'no counter yet');

my $c = session('smtp1');
auth($c, 'alice', 'secret', $ok, 'right password: 235');
$c->cmd('QUIT', qr/^221 /);
ok(!defined $r->cmd('GET', 'lim:authfail:127.0.0.1'),
    'success does not count');

# three failures, over several sessions and mechanisms

$c = session('smtp1');
auth($c, 'alice', 'wrong1', $bad, 'failure 1: 535');
auth($c, 'nosuchuser', 'x', $bad, 'failure 2 (unknown user): 535');
$c->cmd('QUIT', qr/^221 /);
ok(counted(2), 'counter is 2');

$c = session('smtp1');
$c->send("AUTH LOGIN\r\n");
$c->reply();
$c->send(b64('alice') . "\r\n");
$c->reply();
$c->send(b64('wrong3') . "\r\n");
like($c->reply(), $bad, 'failure 3 (LOGIN): 535');
ok(counted(3), 'counter is 3');

my $ttl = $r->cmd('TTL', 'lim:authfail:127.0.0.1');
ok($ttl > 0 && $ttl <= 60, "prefixed key authfail:IP, TTL $ttl <= window");
ok(!defined $r->cmd('GET', 'authfail:127.0.0.1'), 'no unprefixed key');

auth($c, 'alice', 'secret', $limit,
    '4th AUTH with the right password: 454 4.7.0');
like($c->last_reply // '', qr/^4/, 'a temporary error, never 5xx');
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /, 'session goes on');
$c->cmd('QUIT', qr/^221 /);

# the other nginx shares the counter

$c = session('smtp2');
auth($c, 'alice', 'secret', $limit, 'second nginx: 454 too');
$c->cmd('QUIT', qr/^221 /);

is(counter(), 3, 'refusals over the limit are not counted');

# clearing the counter lets the client in again

$r->cmd('DEL', 'lim:authfail:127.0.0.1');
$c = session('smtp2');
auth($c, 'alice', 'secret', $ok, 'after DEL: 235');
$c->cmd('QUIT', qr/^221 /);

# failures on two nodes add up

$c = session('smtp1');
auth($c, 'alice', 'x1', $bad, 'node 1 failure');
auth($c, 'alice', 'x2', $bad, 'node 1 failure');
$c->cmd('QUIT', qr/^221 /);
ok(counted(2), 'counter is 2');
$c = session('smtp2');
auth($c, 'alice', 'x3', $bad, 'node 2 failure');
ok(counted(3), 'counter is 3 after the failure on node 2');
auth($c, 'alice', 'secret', $limit, 'node 2 refuses');
$c->cmd('QUIT', qr/^221 /);
$c = session('smtp1');
auth($c, 'alice', 'secret', $limit, 'node 1 refuses');
$c->cmd('QUIT', qr/^221 /);
$ttl = $r->cmd('TTL', 'lim:authfail:127.0.0.1');
ok($ttl > 0 && $ttl <= 60, "TTL $ttl set by the first failure");

# the window expires

$c = session('win');
auth($c, 'alice', 'x', $bad, 'window 2s: failure 1');
auth($c, 'alice', 'y', $bad, 'window 2s: failure 2');
auth($c, 'alice', 'secret', $limit, 'window 2s: refused');
$ttl = $r->cmd('TTL', 'win:authfail:127.0.0.1');
ok($ttl > 0 && $ttl <= 2, "TTL $ttl <= 2");
ok(wait_for(sub { !defined $r->cmd('GET', 'win:authfail:127.0.0.1') }, 5),
    'the counter expires');
auth($c, 'alice', 'secret', $ok, 'after the window: 235');
$c->cmd('QUIT', qr/^221 /);

$n1->stop();
$n2->stop();
ok(error_log_clean($n1), 'no alerts (1)');
ok(error_log_clean($n2), 'no alerts (2)');

done_testing();
