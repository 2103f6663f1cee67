#!/usr/bin/perl

# smtp_ext_ratelimit (SPEC §10): GCRA in Redis shared by two nginx
# instances; connect, mail and rcpt events with each key; exact burst and
# refill; a refused event is not counted; a RCPT counts only once routing
# accepted it; dry_run; Redis down, stalled and restarted (NOSCRIPT);
# nginx -t errors.

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

$r->cmd('SET', 'rl:domain:d1.test', "127.0.0.1:" . port('b1'));
$r->cmd('SET', 'rl:domain:d2.test', "127.0.0.1:" . port('b1'));
$r->cmd('HSET', 'rl:user:alice', 'password', '{PLAIN}secret');

my $conf = <<'EOF';
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% prefix=rl: timeout=1s;
    smtp_ext_pass 127.0.0.1:%%PORT_b1%%;

    server {
        listen 127.0.0.1:%%PORT_conn_NAME%%;
        protocol smtp_ext;
        smtp_ext_ratelimit connect ip 2/m;
    }
    server {
        listen 127.0.0.1:%%PORT_rcpt_NAME%%;
        protocol smtp_ext;
        smtp_ext_max_recipients 50;
        smtp_ext_ratelimit rcpt ip 1/s burst=2;
        smtp_ext_ratelimit rcpt rcpt_domain 3/h;
        smtp_ext_ratelimit rcpt sender 1/m dry_run;
    }
    server {
        listen 127.0.0.1:%%PORT_mail_NAME%%;
        protocol smtp_ext;
        smtp_ext_auth plain;
        smtp_ext_ratelimit mail sender 1/m;
        smtp_ext_ratelimit mail sender_domain 3/h;
        smtp_ext_ratelimit mail user 1/m;
        smtp_ext_limit_exempt 127.0.0.5;
    }
}
EOF

(my $c1 = $conf) =~ s/NAME/n1/g;
(my $c2 = $conf) =~ s/NAME/n2/g;
my $n1 = start_nginx($c1);
my $n2 = start_nginx($c2);

my $greeting = qr/^220 mx\.test ESMTP\r\n\z/;
my $slow_conn = "421 4.7.0 Too many connections, slow down\r\n";
my $slow_mail = "450 4.7.1 Too much mail, slow down\r\n";
my $slow_rcpt = "450 4.7.1 Too many recipients, slow down\r\n";

sub client {
    my ($port, $local) = @_;
    my $c = smtp_client($port, local => $local);
    return $c;
}

sub session {
    my ($port, $local) = @_;
    my $c = client($port, $local);
    $c->expect($greeting, "greeting on $port from $local");
    $c->cmd('EHLO c.test', qr/^250 /m);
    return $c;
}

# --- connect: two nodes, one budget ------------------------------------

my $a = client(port('conn_n1'), '127.0.0.2');
like($a->reply(), $greeting, 'connect 1 (node 1)');
my $b = client(port('conn_n2'), '127.0.0.2');
like($b->reply(), $greeting, 'connect 2 (node 2)');
my $x = client(port('conn_n1'), '127.0.0.2');
is($x->reply(), $slow_conn, 'connect 3 refused: the nodes share the budget');
ok(!defined $x->reply(2), 'then closed');
my $y = client(port('conn_n2'), '127.0.0.3');
like($y->reply(), $greeting, 'another address has its own budget');

my $pttl = $r->cmd('PTTL', 'rl:ratelimit:connect:ip:127.0.0.2');
ok($pttl > 0 && $pttl <= 60000, "key with a TTL of at most burst x T/N: $pttl");
like($r->cmd('GET', 'rl:ratelimit:connect:ip:127.0.0.2'), qr/^\d+\z/,
    'it holds a time');
$_->sock->close for $a, $b, $y;

like($n1->error_log, qr/smtp_ext: client 127\.0\.0\.2 refused: connect rate limit/,
    'connect refusal logged');

# --- rcpt: burst, refill, refused not counted, routing first ------------

my $c = session(port('rcpt_n1'), '127.0.0.2');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);

# a recipient refused by routing is not counted
$c->cmd('RCPT TO:<u@unrouted.test>', qr/^554 5\.7\.1 /, 'unrouted: relay denied');
$c->cmd('RCPT TO:<u1@d1.test>', qr/^250 /, 'rcpt 1');

my $e = session(port('rcpt_n2'), '127.0.0.2');
$e->cmd('MAIL FROM:<s2@x.test>', qr/^250 2\.1\.0 /);
$e->cmd('RCPT TO:<u2@d2.test>', qr/^250 /, 'rcpt 2 (other node)');
is($e->cmd('RCPT TO:<u3@d2.test>', qr/^450/), $slow_rcpt,
    'rcpt 3 refused: burst 2');
$c->cmd('RCPT TO:<u3@d1.test>', qr/^450 4\.7\.1 /, 'still refused');

sleep(1.1);
$c->cmd('RCPT TO:<u4@d1.test>', qr/^250 /,
    'one more after T/N: the refused ones did not count');
$c->cmd('RCPT TO:<u5@d1.test>', qr/^450 4\.7\.1 /, 'and only one');

# rcpt_domain (burst 3, case folded): d1 saw u1, u4; another address
my $d = session(port('rcpt_n1'), '127.0.0.3');
$d->cmd('MAIL FROM:<t@x.test>', qr/^250 /);
$d->cmd('RCPT TO:<v1@D1.TEST>', qr/^250 /, 'rcpt_domain: 3rd for d1');
is($d->cmd('RCPT TO:<v2@d1.test>', qr/^450/), $slow_rcpt,
    'rcpt_domain: 4th for d1 refused');
$d->cmd('RCPT TO:<v3@d2.test>', qr/^250 /, 'rcpt_domain: d2 apart');
$d->cmd('DATA', qr/^354 /);
$d->cmd(".", qr/^250 /, 'the message goes with the accepted recipients');

ok($r->cmd('EXISTS', 'rl:ratelimit:rcpt:rcpt_domain:d1.test'),
    'rcpt_domain key lower case');

# dry_run: "rcpt sender 1/m" is over from the 2nd rcpt on, never refuses
like($n1->error_log, qr/smtp_ext: dry run: rate limit exceeded: event=rcpt key=sender value="s\@x\.test" client=127\.0\.0\.2/,
    'dry_run logs event, key, value and client');
unlike($n1->error_log . $n2->error_log, qr/refused.*sender/,
    'dry_run refuses nothing');
$_->sock->close for $c, $e, $d;

# --- mail: sender, sender_domain, user ----------------------------------

$c = session(port('mail_n1'), '127.0.0.2');
$c->cmd('MAIL FROM:<A@Example.ORG>', qr/^250 2\.1\.0 /, 'mail 1');
$c->cmd('RSET', qr/^250 /);
is($c->cmd('MAIL FROM:<a@example.org>', qr/^450/), $slow_mail,
    'mail: the same sender (any case) refused');
$c->cmd('RCPT TO:<u@d1.test>', qr/^503 /, 'no transaction after the refusal');
$c->cmd('MAIL FROM:<b@example.org>', qr/^250 /, 'another sender');
$c->cmd('RSET', qr/^250 /);
$c->cmd('MAIL FROM:<c@example.org>', qr/^250 /, 'sender_domain 3rd');
$c->cmd('RSET', qr/^250 /);
$c->cmd('MAIL FROM:<d@example.org>', qr/^450 4\.7\.1 Too much mail/,
    'sender_domain 4th refused');
$c->cmd('RSET', qr/^250 /);

# user: only after AUTH
$c->cmd('MAIL FROM:<u1@other.test>', qr/^250 /, 'no AUTH: no user limit');
$c->cmd('RSET', qr/^250 /);
$c->cmd('AUTH PLAIN ' . SmtpExt::Redis::b64("\0alice\0secret"), qr/^235 /);
$c->cmd('MAIL FROM:<u2@other.test>', qr/^250 /, 'user alice 1');
$c->cmd('RSET', qr/^250 /);
$c->cmd('MAIL FROM:<u3@other.test>', qr/^450 4\.7\.1 /, 'user alice 2 refused');
ok($r->cmd('EXISTS', 'rl:ratelimit:mail:user:alice'), 'user key');
$c->sock->close;

# exempt: nothing read or written
$r->monitor_start;
$c = session(port('mail_n1'), '127.0.0.5');
$c->cmd('MAIL FROM:<a@example.org>', qr/^250 /, 'exempt: not limited');
$c->cmd('QUIT', qr/^221 /);
$c->sock->close;
my @seen = $r->monitor_stop;
ok(!grep(/ratelimit|EVALSHA/, @seen), 'exempt: no rate-limit key touched');

# --- Redis down, stalled, restarted -------------------------------------

$r->kill;
$c = session(port('mail_n1'), '127.0.0.6');
$c->cmd('MAIL FROM:<z@z.test>', qr/^250 2\.1\.0 /, 'Redis down: allowed');
$c->cmd('RSET', qr/^250 /);
$c->cmd('MAIL FROM:<z@z.test>', qr/^250 2\.1\.0 /, 'Redis down: allowed again');
like($n1->error_log, qr/\[warn\].*mail rate limit not checked/,
    'logged at warn');
$c->sock->close;

$r->restart;
$r->monitor_start;
sleep(1.5);    # the worker reconnects
$c = session(port('mail_n1'), '127.0.0.6');
$c->cmd('MAIL FROM:<z@z.test>', qr/^250 2\.1\.0 /, 'restarted Redis: allowed');
$c->cmd('RSET', qr/^250 /);
$c->cmd('MAIL FROM:<z@z.test>', qr/^450 4\.7\.1 /,
    'restarted Redis (no script): the limit works again');
@seen = $r->monitor_stop;
ok(grep(/"SCRIPT" "LOAD"/i, @seen), 'NOSCRIPT: SCRIPT LOAD');
is(scalar(grep(/"SCRIPT" "LOAD"/i, @seen)), 1, 'loaded once');
ok(grep(/"TIME"/, @seen), 'the script reads the server time');
$c->cmd('RSET', qr/^250 /);

$r->stall;
my $t0 = time;
$c->cmd('MAIL FROM:<w@w.test>', qr/^250 2\.1\.0 /, 'Redis silent: allowed');
my $took = time - $t0;
ok($took >= 0.8 && $took < 3, "after timeout= ($took s)");
$r->resume;
$c->sock->close;

ok(error_log_clean($n1) && error_log_clean($n2), 'no alerts');

# --- nginx -t -----------------------------------------------------------

my @bad = (
    ['smtp_ext_ratelimit mail ip 10/x;', qr/invalid rate "10\/x"/],
    ['smtp_ext_ratelimit mail ip 0/s;', qr/invalid rate "0\/s"/],
    ['smtp_ext_ratelimit mail ip ten/m;', qr/invalid rate "ten\/m"/],
    ['smtp_ext_ratelimit connect sender 1/s;',
        qr/invalid key "sender" for event "connect"/],
    ['smtp_ext_ratelimit mail rcpt_domain 1/s;',
        qr/invalid key "rcpt_domain" for event "mail"/],
    ['smtp_ext_ratelimit data ip 1/s;', qr/invalid event "data"/],
    ['smtp_ext_ratelimit mail ip 1/s burst=0;', qr/invalid burst "burst=0"/],
    ['smtp_ext_ratelimit mail ip 1/s slow;', qr/invalid parameter "slow"/],
);

for my $t (@bad) {
    my ($rc, $out) = nginx_t(<<"EOF");
mail {
    server {
        listen 127.0.0.1:%%PORT_t%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis%%;
        $t->[0]
    }
}
EOF
    isnt($rc, 0, "nginx -t fails: $t->[0]");
    like($out, $t->[1], "nginx -t says why: $t->[0]");
}

my ($rc, $out) = nginx_t(<<'EOF');
mail {
    server {
        listen 127.0.0.1:%%PORT_t%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_ratelimit rcpt ip 1/s;
    }
}
EOF
isnt($rc, 0, 'nginx -t fails: ratelimit without Redis');
like($out, qr/"smtp_ext_ratelimit" needs "smtp_ext_redis"/, 'and says so');

done_testing();
