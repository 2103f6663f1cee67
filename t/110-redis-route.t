#!/usr/bin/perl

# Recipient routing and relay policy from Redis (SPEC §4, §5): user route,
# rcpt:ADDRESS over domain:DOMAIN, smtp_ext_pass for authenticated clients
# only, reject, case-insensitive keys, pool names and IP:port literals,
# one backend per transaction, prefix=, db=, password=, unix sockets.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis(unixsocket => 1);
my $rp = start_redis(name => 'redis_pw', password => 'sesame');

my @caps = (args => ['--caps', 'PIPELINING,ENHANCEDSTATUSCODES']);
my %b = map { $_ => start_backend(name => $_, @caps) }
    qw(ba bb bdef blit);

my $lit = '127.0.0.1:' . $b{blit}->port;

$r->cmd('SET', 'domain:example.org', 'poolA');
$r->cmd('SET', 'rcpt:special@example.org', 'poolB');
$r->cmd('SET', 'rcpt:bounce@example.org', 'reject');
$r->cmd('SET', 'domain:lit.test', $lit);
$r->cmd('SET', 'domain:bad.test', 'no-such-pool');
$r->cmd('HSET', 'user:routed', 'password', '{PLAIN}pw1', 'route', 'poolB');
$r->cmd('HSET', 'user:plain', 'password', '{PLAIN}pw2');

# database 2 with a prefix: only mx: keys count there
for my $c (['SET', 'mx:domain:pfx.test', 'poolB'],
    ['SET', 'domain:nopfx.test', 'poolB'],
    ['HSET', 'mx:user:pu', 'password', '{PLAIN}pw3'])
{
    my $s = $r->connect();
    syswrite($s, SmtpExt::Redis::encode('SELECT', '2')
        . SmtpExt::Redis::encode(@$c));
    my $buf = '';
    SmtpExt::Redis::read_reply($s, \$buf, time + 5) for 1 .. 2;
    close $s;
}
$r->cmd('SET', 'mx:domain:db0.test', 'poolB');    # db 0: invisible

$rp->cmd('SET', 'domain:pw.test', 'poolA');

my $sock = $r->unixsocket;
my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;

    smtp_ext_upstream poolA {
        server 127.0.0.1:%%PORT_ba%%;
    }
    smtp_ext_upstream poolB {
        server 127.0.0.1:%%PORT_bb%%;
    }
    smtp_ext_upstream pooldef {
        server 127.0.0.1:%%PORT_bdef%%;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass pooldef;
        smtp_ext_auth plain;
    }

    server {
        listen 127.0.0.1:%%PORT_pfx%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis%% db=2 prefix=mx: timeout=2s;
        smtp_ext_pass pooldef;
        smtp_ext_auth plain;
    }

    server {
        listen 127.0.0.1:%%PORT_pw%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis_pw%% password=sesame;
        smtp_ext_pass pooldef;
    }

    server {
        listen 127.0.0.1:%%PORT_badpw%%;
        protocol smtp_ext;
        smtp_ext_redis 127.0.0.1:%%PORT_redis_pw%% password=wrong
                       timeout=500ms;
        smtp_ext_pass pooldef;
    }

    server {
        listen 127.0.0.1:%%PORT_unix%%;
        protocol smtp_ext;
        smtp_ext_redis unix:$sock;
        smtp_ext_pass pooldef;
    }
}
EOF

sub session {
    my ($port) = @_;
    my $c = smtp_client($port // 'smtp', timeout => 5);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 HELP\r\n\z/m);
    return $c;
}

sub auth {
    my ($c, $u, $p) = @_;
    $c->cmd('AUTH PLAIN ' . b64("\0$u\0$p"), qr/^235 2\.7\.0 /,
        "AUTH as $u");
}

# the bytes of the last connection of a backend, once it is closed
sub last_raw {
    my ($name) = @_;
    my $be = $b{$name};
    my $k = $be->connections() or return '';
    $be->wait_closed($k, 5);
    return $be->raw($k);
}

sub conns { map { $_ => $b{$_}->connections() } sort keys %b }

my $relay = qr/^554 5\.7\.1 Relay access denied\r\n\z/;

# one message, returns the backend that got it

sub deliver {
    my ($c, $rcpt, $name) = @_;
    my %before = conns();
    $c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
    $c->cmd("RCPT TO:<$rcpt>", qr/^250 2\.1\.5 Ok\r\n\z/, "RCPT $rcpt");
    $c->cmd('DATA', qr/^354 /);
    $c->send("hi\r\n.\r\n");
    $c->expect(qr/^250 2\.0\.0 Ok: queued/, "$rcpt delivered");
    $c->cmd('QUIT', qr/^221 /);
    my %after = conns();
    my @got = grep { $after{$_} != $before{$_} } sort keys %after;
    is("@got", $name, "$rcpt went to $name");
    is(last_raw($name), "EHLO mx.test\r\nMAIL FROM:<s\@x.test>\r\n"
        . "RCPT TO:<$rcpt>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
        "$name: exact bytes") if @got == 1 && $got[0] eq $name;
}

# unauthenticated

deliver(session(), 'bob@example.org', 'ba');                # domain
deliver(session(), 'special@example.org', 'bb');            # rcpt: wins
deliver(session(), 'Bob@Example.ORG', 'ba');                # case
deliver(session(), 'SPECIAL@example.ORG', 'bb');            # case, rcpt:
deliver(session(), 'x@lit.test', 'blit');                   # IP:port
deliver(session('pfx'), 'y@pfx.test', 'bb');                # prefix, db
deliver(session('pw'), 'z@pw.test', 'ba');                  # password=
deliver(session('unix'), 'u@example.org', 'ba');            # unix:

my %before = conns();

my $c = session();
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<x@nowhere.test>', $relay, 'no route: 554 5.7.1');
$c->cmd('RCPT TO:<bounce@example.org>',
    qr/^550 5\.1\.1 Recipient address rejected\r\n\z/, 'reject: 550 5.1.1');
$c->cmd('RCPT TO:<Bounce@EXAMPLE.org>', qr/^550 5\.1\.1 /,
    'reject, case-insensitive');
$c->cmd('RCPT TO:<x@bad.test>', qr/^451 4\.3\.0 /,
    'route that is not a pool nor IP:port: 451 4.3.0');
$c->cmd('DATA', qr/^554 5\.5\.1 No valid recipients\r\n\z/);
$c->cmd('RSET', qr/^250 /);
$c->cmd('QUIT', qr/^221 /);

$c = session('pfx');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<x@nopfx.test>', $relay, 'prefix=: unprefixed key ignored');
$c->cmd('RCPT TO:<x@db0.test>', $relay, 'db=2: db 0 key ignored');
$c->cmd('QUIT', qr/^221 /);

$c = session('pw');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<x@example.org>', $relay,
    'password= server uses its own Redis');
$c->cmd('QUIT', qr/^221 /);

$c = session('badpw');
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<x@pw.test>', qr/^451 4\.3\.0 /,
    'wrong Redis password: 451 4.3.0');
$c->cmd('QUIT', qr/^221 /);

is_deeply({ conns() }, \%before, 'no backend was contacted');

# authenticated

deliver(do { my $c = session(); auth($c, 'plain', 'pw2'); $c },
    'x@nowhere.test', 'bdef');                              # smtp_ext_pass
deliver(do { my $c = session(); auth($c, 'plain', 'pw2'); $c },
    'x@lit.test', 'blit');                                  # domain still
deliver(do { my $c = session(); auth($c, 'routed', 'pw1'); $c },
    'bob@example.org', 'bb');                               # user route
deliver(do { my $c = session(); auth($c, 'routed', 'pw1'); $c },
    'x@nowhere.test', 'bb');                                # user route
deliver(do { my $c = session('pfx'); auth($c, 'pu', 'pw3'); $c },
    'x@nowhere.test', 'bdef');                              # prefixed user

# one transaction goes to one backend

%before = conns();
$c = session();
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<bob@example.org>', qr/^250 2\.1\.5 /);
$c->cmd('RCPT TO:<special@example.org>',
    qr/^\Q452 4.5.3 Recipient routed elsewhere, send it in a new\E
        \Q transaction\E\r\n\z/x,
    'second recipient routed elsewhere: 452 4.5.3');
$c->cmd('RCPT TO:<x@lit.test>', qr/^452 4\.5\.3 /, 'IP:port elsewhere: 452');
$c->cmd('RCPT TO:<carol@EXAMPLE.org>', qr/^250 2\.1\.5 /,
    'same route again: accepted');
$c->cmd('DATA', qr/^354 /);
$c->send("one\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued/);
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<special@example.org>', qr/^250 2\.1\.5 /,
    'the deferred recipient in a new transaction');
$c->cmd('DATA', qr/^354 /);
$c->send("two\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued/);
$c->cmd('QUIT', qr/^221 /);

my %after = conns();
is($after{ba} - $before{ba}, 1, 'poolA: one connection');
is($after{bb} - $before{bb}, 1, 'poolB: one connection');
is($after{blit}, $before{blit}, 'IP:port backend not contacted');
is(last_raw('ba'), "EHLO mx.test\r\nMAIL FROM:<s\@x.test>\r\n"
    . "RCPT TO:<bob\@example.org>\r\nRCPT TO:<carol\@EXAMPLE.org>\r\n"
    . "DATA\r\none\r\n.\r\nQUIT\r\n",
    'poolA saw only its recipients');
is(last_raw('bb'), "EHLO mx.test\r\nMAIL FROM:<s\@x.test>\r\n"
    . "RCPT TO:<special\@example.org>\r\nDATA\r\ntwo\r\n.\r\nQUIT\r\n",
    'poolB got the second transaction');

# the route of a transaction is fixed by its first accepted recipient, a
# rejected one does not count

$c = session();
$c->cmd('MAIL FROM:<s@x.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<nobody@nowhere.test>', $relay);
$c->cmd('RCPT TO:<special@example.org>', qr/^250 2\.1\.5 /,
    'first accepted recipient fixes the route');
$c->cmd('RCPT TO:<bob@example.org>', qr/^452 4\.5\.3 /);
$c->cmd('QUIT', qr/^221 /);

# pipelined RCPTs with lookups are answered in order

$c = session();
$c->send("MAIL FROM:<s\@x.test>\r\nRCPT TO:<a\@example.org>\r\n"
    . "RCPT TO:<x\@nowhere.test>\r\nRCPT TO:<bounce\@example.org>\r\n"
    . "RCPT TO:<b\@example.org>\r\nRCPT TO:<special\@example.org>\r\n"
    . "NOOP\r\n");
like($c->reply(), qr/^250 2\.1\.0 /, 'pipelined MAIL');
like($c->reply(), qr/^250 2\.1\.5 /, 'pipelined RCPT 1: routed');
like($c->reply(), qr/^554 5\.7\.1 /, 'pipelined RCPT 2: relay denied');
like($c->reply(), qr/^550 5\.1\.1 /, 'pipelined RCPT 3: reject');
like($c->reply(), qr/^250 2\.1\.5 /, 'pipelined RCPT 4: routed');
like($c->reply(), qr/^452 4\.5\.3 /, 'pipelined RCPT 5: elsewhere');
like($c->reply(), qr/^250 2\.0\.0 /, 'pipelined NOOP');
$c->cmd('QUIT', qr/^221 /);

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
