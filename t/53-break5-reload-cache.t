#!/usr/bin/perl

# smtp_ext_redis_cache across reloads (SPEC 11: "emptied by a reload"):
# a worker of an older configuration, kept alive by a session, still
# writes to the zone.  Its entries must never answer the workers of a
# newer configuration, even when two reloads later the new configuration
# sits at the same addresses as the old one (the master frees a cycle
# at the next reload): here the old worker's Redis has another password
# for the same user.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r1 = start_redis(name => 'redis1');
my $r2 = start_redis(name => 'redis2');
my $b = start_backend(name => 'b');

$r1->cmd('HSET', 'user:alice', 'password', '{PLAIN}old');
$r1->cmd('SET', 'domain:d.test', '127.0.0.1:' . $b->port);
$r2->cmd('HSET', 'user:alice', 'password', '{PLAIN}new');

my $conf = <<'EOF2';
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_REDIS%% timeout=8s;
    smtp_ext_redis_cache 64k valid=1h;
    timeout 30s;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_auth plain;
        smtp_ext_auth_fail_limit 1000;
        smtp_ext_pass 127.0.0.1:%%PORT_b%%;
    }
}
EOF2

sub conf { my $c = $conf; $c =~ s/%%PORT_REDIS%%/%%PORT_$_[0]%%/; $c }

my $n = start_nginx(conf('redis1'));

sub client {
    my $c = smtp_client('smtp');
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

# an AUTH of the first configuration's worker, its Redis silent
my $old = client();
$r1->stall();
$old->send('AUTH PLAIN ' . b64("\0alice\0old") . "\r\n");
sleep 0.3;

$n->reload(conf('redis2'));
sleep 1.5;
$n->reload(conf('redis2'));
sleep 1.5;

# its Redis answers: the old worker caches what it said
$r1->resume();
$old->expect(qr/^235 /, 'the first configuration\'s worker: its Redis, 235');

for my $k (1 .. 3) {
    my $c = client();
    $c->cmd('AUTH PLAIN ' . b64("\0alice\0old"), qr/^535 /,
        "new configuration, AUTH $k: the old worker's entry is not used");
    $c->cmd('QUIT', qr/^221 /);
    $c = client();
    $c->cmd('AUTH PLAIN ' . b64("\0alice\0new"), qr/^235 /,
        "new configuration, AUTH $k: its Redis's password");
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    $c->cmd('RCPT TO:<x@d.test>', qr/^250 /,
        "new configuration, RCPT $k: authenticated, smtp_ext_pass");
    $c->cmd('QUIT', qr/^221 /);
}

$old->close();

$n->stop();
ok(error_log_clean($n), 'no alerts in the error log');

done_testing();
