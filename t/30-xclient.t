#!/usr/bin/perl

# XCLIENT and PROXY protocol towards the backend (SPEC §3).

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $full = start_backend(name => 'full');
my $some = start_backend(name => 'some',
    args => ['--caps', 'PIPELINING,ENHANCEDSTATUSCODES,XCLIENT ADDR HELO']);
my $none = start_backend(name => 'none',
    args => ['--caps', 'PIPELINING,ENHANCEDSTATUSCODES']);
my $off = start_backend(name => 'off');
my $proxy = start_backend(name => 'proxy');

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_s_full%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_full%%;
    }
    server {
        listen 127.0.0.1:%%PORT_s_some%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_some%%;
    }
    server {
        listen 127.0.0.1:%%PORT_s_none%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_none%%;
    }
    server {
        listen 127.0.0.1:%%PORT_s_off%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_off%%;
        smtp_ext_xclient off;
    }
    server {
        listen 127.0.0.1:%%PORT_s_proxy%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_proxy%%;
        smtp_ext_xclient off;
        smtp_ext_proxy_protocol on;
    }
}
EOF

# one transaction; returns the client's own port
sub transaction {
    my ($port, $helo_cmd) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /);
    $c->cmd($helo_cmd, qr/^250[ -]/);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 Ok\r\n\z/);
    $c->cmd('DATA', qr/^354 /);
    $c->send("hi\r\n.\r\n");
    $c->expect(qr/^250 2\.0\.0 Ok: queued/);
    $c->cmd('QUIT', qr/^221 /);
    return $c->sock->sockport();
}

my $tail = "MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\nDATA\r\n"
    . "hi\r\n.\r\nQUIT\r\n";

# all attributes, xtext

my $cport = transaction('s_full', 'EHLO a+b=c');
ok($full->wait_closed(1), 'closed');
is($full->raw(1), "EHLO mx.test\r\n"
    . "XCLIENT ADDR=127.0.0.1 PORT=$cport HELO=a+2Bb+3Dc"
    . " NAME=[UNAVAILABLE] PROTO=ESMTP\r\n"
    . "EHLO a+b=c\r\n" . $tail, 'XCLIENT, xtext HELO, then EHLO helo');

$cport = transaction('s_full', 'HELO x y=z');
ok($full->wait_closed(2), 'closed');
is($full->raw(2), "EHLO mx.test\r\n"
    . "XCLIENT ADDR=127.0.0.1 PORT=$cport HELO=x+20y+3Dz"
    . " NAME=[UNAVAILABLE] PROTO=SMTP\r\n"
    . "EHLO x y=z\r\n" . $tail, 'HELO client: PROTO=SMTP, space encoded');

like($full->log(2), qr/^> EHLO x y=z\n< 250-backend\n/m,
    'backend accepted the session restart');

# only the listed attributes

transaction('s_some', 'EHLO client.test');
ok($some->wait_closed(1), 'closed');
is($some->raw(1), "EHLO mx.test\r\n"
    . "XCLIENT ADDR=127.0.0.1 HELO=client.test\r\n"
    . "EHLO client.test\r\n" . $tail, 'only ADDR and HELO');

# not advertised, switched off

transaction('s_none', 'EHLO client.test');
ok($none->wait_closed(1), 'closed');
is($none->raw(1), "EHLO mx.test\r\n" . $tail, 'not advertised: no XCLIENT');

transaction('s_off', 'EHLO client.test');
ok($off->wait_closed(1), 'closed');
is($off->raw(1), "EHLO mx.test\r\n" . $tail, 'xclient off: no XCLIENT');

# PROXY protocol v1

my $sport = SmtpExt::Test::port('s_proxy');
$cport = transaction('s_proxy', 'EHLO client.test');
ok($proxy->wait_closed(1), 'closed');
is($proxy->raw(1), "PROXY TCP4 127.0.0.1 127.0.0.1 $cport $sport\r\n"
    . "EHLO mx.test\r\n" . $tail, 'PROXY header first');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
