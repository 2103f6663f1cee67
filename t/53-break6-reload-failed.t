#!/usr/bin/perl

# smtp_ext_redis_cache and a reload that fails (SPEC 11: "emptied by a
# reload").  nginx initialises the shared zones of the new configuration
# before it opens the listening sockets: a reload whose new listen
# cannot be bound is given up, the old workers go on.  They must go on
# with a working cache: hits counted, a stale entry answering while
# Redis is down.  Then several reloads in a row: the newest workers hit.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(sleep);
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
my $b = start_backend(name => 'b');

$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret');

my $conf = <<'EOF2';
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=1s;
    smtp_ext_redis_cache 64k valid=1h;
    timeout 10s;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_auth plain;
        smtp_ext_auth_fail_limit 1000;
        smtp_ext_pass 127.0.0.1:%%PORT_b%%;
    }
}
http {
    access_log off;
    server {
        listen 127.0.0.1:%%PORT_http%%;
        location = /metrics { smtp_ext_status; }
    }
    %%EXTRA%%
}
EOF2

sub conf {
    my ($extra) = @_;
    my $c = $conf;
    $c =~ s/%%EXTRA%%/$extra/;
    return $c;
}

my $n = start_nginx(conf(''));

sub auth {
    my ($name) = @_;
    my $c = smtp_client('smtp');
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('AUTH PLAIN ' . b64("\0alice\0secret"), qr/^235 /, $name);
    $c->cmd('QUIT', qr/^221 /);
}

# two AUTHs, the second one from the cache
sub two_auths_hit {
    my ($what) = @_;
    auth("$what: AUTH 1");
    my $before = cache_counts();
    auth("$what: AUTH 2");
    my $d = cache_delta($before, cache_counts());
    is($d, 'hit=1 miss=0 stale=0', "$what: the second AUTH is a cache hit");
}

two_auths_hit('first configuration');

my $worker = $n->worker_pid();

# the new configuration listens on Redis's port: bind() fails, the
# reload is given up (after nginx's five tries)
my $log_len = length(error_log($n));
$n->reload(conf("server { listen 127.0.0.1:%%PORT_redis%%; }"));
ok(wait_for(sub { substr(error_log($n), $log_len)
    =~ /bind\(\) to 127\.0\.0\.1:\d+ failed/ }, 15),
    'the reload fails: bind() failed');
sleep 3;
$n->{worker} = undef;
is($n->worker_pid(), $worker, 'the first configuration\'s worker goes on');

two_auths_hit('after a failed reload');

# Redis silent: the cached user still answers (without the counter)
$r->stall();
auth('after a failed reload, Redis silent: the cache answers');
$r->resume();

# several reloads in a row, each of them working
for my $k (1 .. 3) {
    $n->reload(conf(''));
    sleep 1.5;
}
ok($n->worker_pid() && $n->worker_pid() != $worker, 'new worker');

two_auths_hit('after three more reloads');

$n->stop();

done_testing();
