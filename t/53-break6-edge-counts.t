#!/usr/bin/perl

# SPEC 10, limit_conn counts after refusals that give their slot back at
# the refusal (pregreet, limit_conn itself) and then linger, open, until
# the client closes: two workers, PROXY protocol sources.  The counts
# come back to exactly 0: afterwards N sessions are greeted and N+1 is
# refused, every time.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(sleep);
use SmtpExt::Test;

require_programs(nginx_bin());

my $b1 = start_backend(name => 'b1');

my $n = start_nginx(<<'EOF2', workers => 2);
mail {
    server_name mx.test;
    smtp_ext_pass 127.0.0.1:%%PORT_b1%%;

    server {
        listen 127.0.0.1:%%PORT_pp%% proxy_protocol;
        protocol smtp_ext;
        set_real_ip_from 127.0.0.1;
        smtp_ext_limit_conn 2;
        smtp_ext_greeting_delay 300ms;
        timeout 10s;
    }
}
EOF2

my $greeting = qr/^220 mx\.test ESMTP\r\n\z/;
my $too_many = "421 4.7.0 Too many connections from your address\r\n";
my $pregreet = "554 5.5.1 Protocol error: talking before the greeting\r\n";

sub pp {
    my ($src) = @_;
    my $c = smtp_client('pp');
    $c->send("PROXY TCP4 $src 127.0.0.1 5555 25\r\n");
    return $c;
}

# exactly 2 sessions from $src, then a refusal; all closed after
sub exactly_two {
    my ($src, $what) = @_;
    my @g = map { pp($src) } 1 .. 2;
    like($_->reply(3), $greeting, "$what: greeted") for @g;
    my $x = pp($src);
    is($x->reply(3), $too_many, "$what: the third refused");
    $_->sock->close for @g, $x;
    sleep 0.5;
}

my $src = '192.0.2.20';
my @linger;

for my $k (1 .. 3) {
    my $c = pp($src);
    $c->send("EHLO early.test\r\n");
    is($c->reply(3), $pregreet, "pregreet $k refused");
    push @linger, $c;
}

exactly_two($src, 'three pregreet refusals still open');

# limit_conn refusals that stay open while their greeted ones go
my @g = map { pp($src) } 1 .. 2;
like($_->reply(3), $greeting, 'greeted') for @g;
for my $k (1 .. 3) {
    my $x = pp($src);
    is($x->reply(3), $too_many, "limit_conn refusal $k");
    push @linger, $x;
}
$_->sock->close for @g;
sleep 0.5;

exactly_two($src, 'limit_conn refusals still open');

$_->sock->close for @linger;
sleep 0.5;

exactly_two($src, 'every refused connection closed');
exactly_two($src, 'once more');

ok(error_log_clean($n), 'no alerts');

$n->stop();

done_testing();
