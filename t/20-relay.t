#!/usr/bin/perl

# A full relay: what the client sees and, byte for byte, what the backend
# receives (docs/protocol.md "Backend side").

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $caps = 'PIPELINING,SIZE 10485760,8BITMIME,SMTPUTF8,ENHANCEDSTATUSCODES';

my $b1 = start_backend(name => 'b1', args => ['--caps', $caps,
    '--rcpt-reply', '250 2.1.5 backend likes it',
    '--rcpt', 'unknown@=550 5.1.1 <unknown@d.test>: no such user',
    '--rcpt', 'plain@=550 No such user here',
    '--rcpt', 'multi@=550-5.7.1 first line\n550 5.7.1 second line',
    '--rcpt', 'later@=450 4.2.0 try later']);

# no SIZE, no PIPELINING, no XCLIENT
my $b2 = start_backend(name => 'b2', args => ['--caps', '8BITMIME',
    '--dot-reply', '554 5.7.1 Message content rejected']);

my $b3 = start_backend(name => 'b3', args => ['--caps', $caps,
    '--mail-reply', '553 5.7.1 Sender address rejected']);

my $b4 = start_backend(name => 'b4', args => ['--caps', $caps,
    '--dot-reply', '250 queued without enhanced code',
    '--data-reply', '354 go ahead']);

my $b5 = start_backend(name => 'b5',
    args => ['--ehlo-reply', '502 5.5.2 Error: command not recognized']);

my $conf = <<'EOF';
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_upstream_timeout 3s;
        timeout 5s;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp2%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b2%%;
        timeout 5s;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp3%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b3%%;
        timeout 5s;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp4%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b4%%;
        timeout 5s;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp5%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b5%%;
        timeout 5s;
    }
}
EOF

my $n = start_nginx($conf);

my $body = "Subject: test\r\n\r\nHello\r\n..leading dot\r\n\r\nbye\r\n";

sub session {
    my ($port) = @_;
    my $c = smtp_client($port // 'smtp');
    $c->expect(qr/^220 mx\.test ESMTP\r\n\z/, 'greeting');
    $c->cmd('EHLO client.test', qr/^250 HELP\r\n\z/m);
    return $c;
}

# one transaction, two recipients

my $c = session();
$c->cmd('MAIL FROM:<a@b.test> SIZE=' . length($body),
    qr/^250 2\.1\.0 Ok\r\n\z/);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 backend likes it\r\n\z/,
    'RCPT: the backend reply');
$c->cmd('RCPT TO:<e@d.test>', qr/^250 2\.1\.5 backend likes it\r\n\z/);
$c->cmd('DATA', qr/^354 End data with <CR><LF>\.<CR><LF>\r\n\z/);
$c->send($body . ".\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued as 1-1\r\n\z/,
    'end of data: the backend reply');
$c->cmd('QUIT', qr/^221 2\.0\.0 /);
ok($c->closed(), 'client closed');
ok($b1->wait_closed(1), 'backend connection closed');

is($b1->raw(1), "EHLO mx.test\r\n"
    . "MAIL FROM:<a\@b.test> SIZE=" . length($body) . "\r\n"
    . "RCPT TO:<c\@d.test>\r\nRCPT TO:<e\@d.test>\r\nDATA\r\n"
    . $body . ".\r\nQUIT\r\n", 'backend bytes');
is_deeply([$b1->messages], [$body], 'message exactly as sent');
is($b1->connections, 1, 'one backend connection');

# two transactions on one session reuse the backend connection;
# RSET in a transaction the backend saw becomes RSET before the next MAIL

$c = session();
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send("first\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued as 2-1\r\n\z/);
$c->cmd('MAIL FROM:<>', qr/^250 2\.1\.0 /, 'null sender');
$c->cmd('RCPT TO:<f@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('RSET', qr/^250 2\.0\.0 Ok\r\n\z/);
$c->cmd('MAIL FROM:<g@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<h@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send("second\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued as 2-2\r\n\z/);
$c->cmd('QUIT', qr/^221 /);
ok($b1->wait_closed(2), 'backend connection 2 closed');
is($b1->connections, 2, 'one backend connection for two transactions');
is($b1->raw(2), "EHLO mx.test\r\n"
    . "MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\nDATA\r\nfirst\r\n.\r\n"
    . "MAIL FROM:<>\r\nRCPT TO:<f\@d.test>\r\nRSET\r\n"
    . "MAIL FROM:<g\@b.test>\r\nRCPT TO:<h\@d.test>\r\nDATA\r\nsecond\r\n.\r\n"
    . "QUIT\r\n", 'backend bytes: two transactions and RSET');

# backend RCPT rejections reach the client verbatim; enhanced code added

$c = session();
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<unknown@d.test>',
    qr/^550 5\.1\.1 <unknown\@d\.test>: no such user\r\n\z/);
$c->cmd('RCPT TO:<plain@d.test>', qr/^550 5\.0\.0 No such user here\r\n\z/,
    'enhanced code added');
$c->cmd('RCPT TO:<multi@d.test>',
    qr/^550-5\.7\.1 first line\r\n550 5\.7\.1 second line\r\n\z/,
    'multiline reply');
$c->cmd('RCPT TO:<later@d.test>', qr/^450 4\.2\.0 try later\r\n\z/);
$c->cmd('DATA', qr/^554 5\.5\.1 No valid recipients\r\n\z/);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send("x\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued as 3-1\r\n\z/);
$c->cmd('QUIT', qr/^221 /);
ok($b1->wait_closed(3), 'closed');
is_deeply([grep { /^RCPT/ } $b1->commands(3)], ['RCPT TO:<unknown@d.test>',
    'RCPT TO:<plain@d.test>', 'RCPT TO:<multi@d.test>',
    'RCPT TO:<later@d.test>', 'RCPT TO:<c@d.test>'], 'backend RCPTs');

# no SIZE at the backend: no SIZE=; end of data rejection forwarded

$c = session('smtp2');
$c->cmd('MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 Ok\r\n\z/);
$c->cmd('DATA', qr/^354 /);
$c->send("8bit \xc3\xa9\r\n.\r\n");
$c->expect(qr/^554 5\.7\.1 Message content rejected\r\n\z/,
    'end of data rejection forwarded');
$c->cmd('QUIT', qr/^221 /);
ok($b2->wait_closed(1), 'closed');
is($b2->raw(1), "EHLO mx.test\r\nMAIL FROM:<a\@b.test> BODY=8BITMIME\r\n"
    . "RCPT TO:<c\@d.test>\r\nDATA\r\n8bit \xc3\xa9\r\n.\r\nQUIT\r\n",
    'backend without SIZE gets no SIZE=');

# backend rejects MAIL: the RCPT gets the MAIL reply

$c = session('smtp3');
$c->cmd('MAIL FROM:<spammer@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^553 5\.7\.1 Sender address rejected\r\n\z/,
    'RCPT gets the backend MAIL reply');
$c->cmd('QUIT', qr/^221 /);

# backend 354 text and a 250 without enhanced code

$c = session('smtp4');
$c->cmd('MAIL FROM:<a@b.test> SMTPUTF8', qr/^250 2\.1\.0 /);
$c->cmd("RCPT TO:<\xc3\xa9\@d.test>", qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 End data with <CR><LF>\.<CR><LF>\r\n\z/,
    'our own 354');
$c->send(".\r\n");
$c->expect(qr/^250 2\.0\.0 queued without enhanced code\r\n\z/,
    'enhanced code added to the final reply');
$c->cmd('QUIT', qr/^221 /);
ok($b4->wait_closed(1), 'closed');
is($b4->raw(1), "EHLO mx.test\r\nMAIL FROM:<a\@b.test> SMTPUTF8\r\n"
    . "RCPT TO:<\xc3\xa9\@d.test>\r\nDATA\r\n.\r\nQUIT\r\n",
    'SMTPUTF8 passed on, empty message');
is_deeply([$b4->messages], [''], 'empty message');

# EHLO refused: HELO, and no ESMTP parameters

$c = session('smtp5');
$c->cmd('MAIL FROM:<a@b.test> SIZE=10', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send("x\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued as 1-1\r\n\z/);
$c->cmd('QUIT', qr/^221 /);
ok($b5->wait_closed(1), 'closed');
is($b5->raw(1), "EHLO mx.test\r\nHELO mx.test\r\nMAIL FROM:<a\@b.test>\r\n"
    . "RCPT TO:<c\@d.test>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
    'HELO after a refused EHLO');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
