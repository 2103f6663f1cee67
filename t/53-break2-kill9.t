#!/usr/bin/perl

# Break: a worker killed with SIGKILL while it holds a backend connection
# of a pool with a zone.  nginx restarts the worker; the peer's connection
# count in the zone (SPEC 8 max_conns, SPEC 9
# smtp_ext_upstream_peer_connections_active) must come back to 0 and the
# max_conns=1 peer must take a new transaction.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use IO::Socket::INET;
use SmtpExt::Test;

require_programs(nginx_bin());

my $b = start_backend(name => 'mc');

my $conf = <<'EOF2';
mail {
    server_name mx.test;
    smtp_ext_upstream limited {
        zone limited 64k;
        server 127.0.0.1:%%PORT_mc%% max_conns=1;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass limited;
        timeout 10s;
    }
}
http {
    access_log off;
    server {
        listen 127.0.0.1:%%PORT_http%%;
        location = /metrics { smtp_ext_status; }
    }
}
EOF2

my $n = start_nginx($conf, workers => 2);
my $L = '127.0.0.1:' . SmtpExt::Test::port('smtp');
my $peer = '127.0.0.1:' . SmtpExt::Test::port('mc');
my $PCA = qq(smtp_ext_upstream_peer_connections_active)
    . qq({upstream="limited",peer="$peer"});
my $CA = qq(smtp_ext_connections_active{listen="$L"});

sub metrics { metrics_samples('http') }

# a transaction holds the one allowed connection
my $c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<r@d.test>', qr/^250 /);
is(metrics()->{$PCA}, 1, 'peer connections_active 1 while held');

# kill -9 every worker (the holder among them); nginx starts new ones
my %old = %{ nginx_workers($n) };
ok(scalar(keys %old) == 2, 'two workers');
kill 'KILL', $_ for keys %old;
ok(wait_for(sub {
    my $w = nginx_workers($n);
    my @new = grep { !$old{$_} && $w->{$_} =~ /worker process$/ } keys %$w;
    @new == 2;
}, 10), 'nginx restarted the workers');
$c->close();
sleep 1;

my $m;
ok(wait_for(sub { $m = metrics(); defined $m->{$PCA} }, 5), 'scrape');
is($m->{$CA}, 0, 'listen connections_active back to 0 after kill -9');
is($m->{$PCA}, 0, 'peer connections_active back to 0 after kill -9');

# the peer is free again: a new transaction gets its connection
$c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<r@d.test>', qr/^\d{3} /);
like($c->last_reply, qr/^250 /,
    'max_conns=1 peer takes a transaction after the holder was killed')
    or diag('got: ' . $c->last_reply);
$c->cmd('QUIT', qr/^221 /);

done_testing();
