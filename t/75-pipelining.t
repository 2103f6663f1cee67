#!/usr/bin/perl

# PIPELINING (RFC 2920): replies in order, even while the backend is slow.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $b = start_backend(name => 'b1',
    args => ['--rcpt', 'nobody@=550 5.1.1 No such user']);
my $slow = start_backend(name => 'slow', args => ['--delay-read', 150,
    '--rcpt', 'nobody@=550 5.1.1 No such user']);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
    server {
        listen 127.0.0.1:%%PORT_s_slow%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_slow%%;
    }
}
EOF

for my $port ('smtp', 's_slow') {
    my $c = smtp_client($port);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->send("MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\n"
        . "RCPT TO:<nobody\@d.test>\r\nRCPT TO:<e\@d.test>\r\nDATA\r\n");
    is($c->reply(), "250 2.1.0 Ok\r\n", "$port: MAIL");
    is($c->reply(), "250 2.1.5 Ok\r\n", "$port: RCPT 1");
    is($c->reply(), "550 5.1.1 No such user\r\n", "$port: RCPT 2 rejected");
    is($c->reply(), "250 2.1.5 Ok\r\n", "$port: RCPT 3");
    like($c->reply(), qr/^354 /, "$port: DATA");
    $c->send("body\r\n.\r\nNOOP\r\nMAIL FROM:<x\@b.test>\r\n"
        . "RCPT TO:<y\@d.test>\r\nRSET\r\nVRFY z\r\n");
    like($c->reply(), qr/^250 2\.0\.0 Ok: queued as 1-1\r\n\z/,
        "$port: end of data");
    is($c->reply(), "250 2.0.0 Ok\r\n", "$port: NOOP");
    is($c->reply(), "250 2.1.0 Ok\r\n", "$port: MAIL 2");
    is($c->reply(), "250 2.1.5 Ok\r\n", "$port: RCPT after MAIL 2");
    is($c->reply(), "250 2.0.0 Ok\r\n", "$port: RSET");
    like($c->reply(), qr/^252 /, "$port: VRFY last");
    $c->cmd('QUIT', qr/^221 /);
}

# a whole session in one write

my $c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO client.test', qr/^250 /m);
$c->send("MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\nDATA\r\n"
    . "Subject: one write\r\n\r\nbody\r\n.\r\nQUIT\r\n");
is($c->reply(), "250 2.1.0 Ok\r\n", 'one write: MAIL');
is($c->reply(), "250 2.1.5 Ok\r\n", 'one write: RCPT');
like($c->reply(), qr/^354 /, 'one write: DATA');
like($c->reply(), qr/^250 2\.0\.0 Ok: queued as 2-1\r\n\z/,
    'one write: end of data');
like($c->reply(), qr/^221 2\.0\.0 /, 'one write: QUIT');
ok($c->closed(), 'one write: closed');
ok($b->wait_closed(2), 'backend closed');
is($b->raw(2), "EHLO mx.test\r\n"
    . "XCLIENT ADDR=127.0.0.1 PORT=" . $c->sock->sockport
    . " HELO=client.test NAME=[UNAVAILABLE] PROTO=ESMTP\r\n"
    . "EHLO client.test\r\n"
    . "MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\nDATA\r\n"
    . "Subject: one write\r\n\r\nbody\r\n.\r\nQUIT\r\n", 'backend bytes');

# 50 transactions and QUIT in one write

$c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO client.test', qr/^250 /m);
my $all = '';
$all .= "MAIL FROM:<a$_\@b.test>\r\nRCPT TO:<c\@d.test>\r\nDATA\r\n"
    . "message $_\r\n.\r\n" for 1 .. 50;
$c->send($all . "QUIT\r\n");
my $ok = 0;
for (1 .. 50) {
    my @r = map { $c->reply() // '' } 1 .. 4;
    $ok++ if $r[0] =~ /^250 2\.1\.0/ && $r[1] =~ /^250 2\.1\.5/
        && $r[2] =~ /^354/ && $r[3] =~ /^250 2\.0\.0 Ok: queued as 3-$_\r/;
}
is($ok, 50, '50 pipelined transactions answered in order');
like($c->reply(), qr/^221 /, 'QUIT');
ok($b->wait_closed(3), 'backend closed');
is_deeply([map { /message (\d+)/ ? $1 : 0 } grep { /^message/ }
    $b->messages], [1 .. 50], 'backend got 50 messages in order');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
