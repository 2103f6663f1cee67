#!/usr/bin/perl

# Break: nginx -s reload with a changed pool (same number of servers, one
# weight changed) while an old worker still holds a backend connection.
# The zone's peer state is freed and allocated again by the master
# (upstream.c zone_init), but the old worker keeps its pointers into the
# freed state: when its session ends it releases its connection into the
# new generation's state.  The new generation's count for a connection
# it holds must stay 1, and max_conns=1 must still hold.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use IO::Socket::INET;
use SmtpExt::Test;

require_programs(nginx_bin());

start_backend(name => $_) for qw(ba bb);

my $tmpl = <<'EOF2';
mail {
    server_name mx.test;
    smtp_ext_upstream limited {
        zone limited 64k;
        server 127.0.0.1:%%PORT_ba%% max_conns=1 weight=WA;
        server 127.0.0.1:%%PORT_bb%% down;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass limited;
        timeout 20s;
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

(my $conf1 = $tmpl) =~ s/WA/1/;
(my $conf2 = $tmpl) =~ s/WA/2/;

my $n = start_nginx($conf1, workers => 2);
my $peer = '127.0.0.1:' . SmtpExt::Test::port('ba');
my $PCA = qq(smtp_ext_upstream_peer_connections_active)
    . qq({upstream="limited",peer="$peer"});

sub metrics { metrics_samples('http') }

sub open_tx {
    my $c = smtp_client('smtp');
    $c->expect(qr/^220 /);
    $c->cmd('EHLO c.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    $c->cmd('RCPT TO:<r@d.test>', qr/^\d{3} /);
    return $c;
}

# an old-generation transaction holds the peer's one connection
my $c1 = open_tx();
like($c1->last_reply, qr/^250 /, 'old generation holds the connection');

$n->reload($conf2, workers => 2);
ok(wait_for(sub { error_log($n) =~ /gracefully shutting down/ }, 10),
    'reloaded');
sleep 1;

# a new-generation transaction; the new pool state starts afresh
my $c2 = open_tx();
like($c2->last_reply, qr/^250 /, 'new generation gets a connection');
is(metrics()->{$PCA}, 1, 'new generation counts its connection');

# the old session ends; it must not touch the new generation's count
$c1->cmd('QUIT', qr/^221 /);
$c1->close();
sleep 1;

is(metrics()->{$PCA}, 1,
    'peer connections_active still 1 while the new session holds it');
my $c3 = open_tx();
like($c3->last_reply, qr/^451 4\.4\.5 /,
    'max_conns=1 still enforced: a second connection is refused')
    or diag('got: ' . $c3->last_reply);
$c3->close();

$c2->cmd('QUIT', qr/^221 /);
$c2->close();
ok(wait_for(sub { (metrics()->{$PCA} // -1) == 0 }, 5),
    'peer connections_active 0 at the end');
ok(error_log_clean($n), 'no alert/crash');

done_testing();
