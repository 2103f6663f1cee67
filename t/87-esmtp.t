#!/usr/bin/perl

# SPEC 12: DSN parameters (smtp_ext_dsn), SMTPUTF8 and 8BITMIME towards
# backends that do not list them, BDAT while CHUNKING is not offered.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $all = 'PIPELINING,SIZE 10485760,8BITMIME,SMTPUTF8,ENHANCEDSTATUSCODES';

my %b;
$b{dsn} = start_backend(name => 'b_dsn', args => ['--caps', "$all,DSN"]);
$b{nodsn} = start_backend(name => 'b_nodsn', args => ['--caps', $all]);
$b{ascii} = start_backend(name => 'b_ascii',
    args => ['--caps', 'PIPELINING,8BITMIME,ENHANCEDSTATUSCODES']);
$b{sevenbit} = start_backend(name => 'b_sevenbit',
    args => ['--caps', 'PIPELINING,SMTPUTF8,ENHANCEDSTATUSCODES']);
$b{plain} = start_backend(name => 'b_plain', args => ['--caps', $all]);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    timeout 5s;

    server {
        listen 127.0.0.1:%%PORT_dsn%%;
        protocol smtp_ext;
        smtp_ext_dsn on;
        smtp_ext_pass 127.0.0.1:%%PORT_b_dsn%%;
    }
    server {
        listen 127.0.0.1:%%PORT_nodsn%%;
        protocol smtp_ext;
        smtp_ext_dsn on;
        smtp_ext_pass 127.0.0.1:%%PORT_b_nodsn%%;
    }
    server {
        listen 127.0.0.1:%%PORT_off%%;
        protocol smtp_ext;
        smtp_ext_chunking off;
        smtp_ext_pass 127.0.0.1:%%PORT_b_plain%%;
    }
    server {
        listen 127.0.0.1:%%PORT_ascii%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_ascii%%;
    }
    server {
        listen 127.0.0.1:%%PORT_sevenbit%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_sevenbit%%;
    }
}
EOF

sub session {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /, "$port: greeting");
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

# DSN on, a backend that lists DSN: verbatim

my $c = session('dsn');
like($c->last_reply, qr/^250-DSN\r\n/m, 'EHLO lists DSN with smtp_ext_dsn on');
$c->cmd('MAIL FROM:<a@b.test> RET=HDRS ENVID=QQ+2B1', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d.test',
    qr/^250 /);
$c->cmd('RCPT TO:<e@d.test> NOTIFY=NEVER', qr/^250 /);
$c->cmd('RCPT TO:<f@d.test> NOTIFY=NEVER,DELAY', qr/^501 5\.5\.4 /,
    'NOTIFY=NEVER with another value: 501');
$c->cmd('RCPT TO:<f@d.test> ORCPT=rfc822', qr/^501 5\.5\.4 /,
    'ORCPT without xtext: 501');
$c->cmd('DATA', qr/^354 /);
$c->send("hi\r\n.\r\n");
$c->expect(qr/^250 /);
$c->cmd('QUIT', qr/^221 /);
ok($b{dsn}->wait_closed(1), 'dsn: backend closed');
like($b{dsn}->raw(1),
    qr/\r\nMAIL FROM:<a\@b\.test> RET=HDRS ENVID=QQ\+2B1\r\nRCPT TO:<c\@d\.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c\@d\.test\r\nRCPT TO:<e\@d\.test> NOTIFY=NEVER\r\nDATA\r\n/,
    'DSN parameters passed verbatim to a backend that lists DSN');

# DSN on, a backend without DSN: dropped, logged once

$c = session('nodsn');
$c->cmd('MAIL FROM:<a@b.test> RET=FULL', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test> NOTIFY=DELAY', qr/^250 /);
$c->cmd('RCPT TO:<e@d.test> NOTIFY=DELAY', qr/^250 /);
$c->cmd('QUIT', qr/^221 /);
ok($b{nodsn}->wait_closed(1), 'nodsn: backend closed');
like($b{nodsn}->raw(1),
    qr/\r\nMAIL FROM:<a\@b\.test>\r\nRCPT TO:<c\@d\.test>\r\nRCPT TO:<e\@d\.test>\r\n/,
    'DSN parameters dropped for a backend without DSN');
my @warn = grep { /does not list DSN/ } split /\n/, $n->error_log;
is(scalar @warn, 1, 'dropping is logged once per backend connection');
like($warn[0] // '', qr/\[warn\]/, 'at warn');

# DSN off (the default): 555, not listed

$c = session('off');
unlike($c->last_reply, qr/DSN/, 'EHLO does not list DSN by default');
$c->cmd('MAIL FROM:<a@b.test> RET=HDRS', qr/^555 5\.5\.4 /, 'RET: 555');
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<c@d.test> NOTIFY=NEVER', qr/^555 5\.5\.4 /, 'NOTIFY: 555');
$c->cmd('RSET', qr/^250 /);
$c->cmd('MAIL FROM:<a@b.test> BODY=BINARYMIME', qr/^555 5\.5\.4 /,
    'BODY=BINARYMIME: 555');
$c->cmd('QUIT', qr/^221 /);

# BDAT while CHUNKING is not offered: 502, its octets are data, dropped

$c = session('off');
unlike($c->last_reply, qr/CHUNKING/, 'EHLO does not list CHUNKING');
$c->send("BDAT 15 LAST\r\nQUIT\r\nNOOP\r\nX\r\nNOOP\r\n");
$c->expect(qr/^502 5\.5\.1 /, 'BDAT: 502');
$c->expect(qr/^250 2\.0\.0 /, 'the 15 octets were dropped, not executed');
$c->cmd('BDAT 1x', qr/^421 4\.5\.4 /, 'BDAT with a bad size: 421, its end is unknown');
ok($c->closed(3), 'and the session is closed');

# SMTPUTF8: never relayed with UTF-8 addresses to a backend without it

$c = session('ascii');
$c->cmd("MAIL FROM:<\xc3\xa9\@b.test> SMTPUTF8", qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^553 5\.6\.7 Recipient's server does not support SMTPUTF8/,
    'UTF-8 sender, backend without SMTPUTF8: 553 5.6.7');
$c->cmd('RSET', qr/^250 /);
$c->cmd('MAIL FROM:<a@b.test> SMTPUTF8', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 /, 'all-ASCII: fine');
$c->cmd("RCPT TO:<\xc3\xa9\@d.test>", qr/^553 5\.6\.7 /,
    'a UTF-8 recipient: 553 5.6.7');
$c->cmd('DATA', qr/^354 /);
$c->send("hi\r\n.\r\n");
$c->expect(qr/^250 /);
$c->cmd('QUIT', qr/^221 /);
ok($b{ascii}->wait_closed(1), 'ascii: backend closed');
unlike($b{ascii}->raw(1), qr/[\x80-\xff]|SMTPUTF8/,
    'the backend never saw UTF-8 or the SMTPUTF8 parameter');

# 8BITMIME: refused for a backend that does not list it (RFC 6152)

$c = session('sevenbit');
$c->cmd('MAIL FROM:<a@b.test> BODY=8BITMIME', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^554 5\.6\.9 /,
    'BODY=8BITMIME, backend without 8BITMIME: 554 5.6.9');
$c->cmd('RSET', qr/^250 /);
$c->cmd('MAIL FROM:<a@b.test> BODY=7BIT', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 /, 'BODY=7BIT: fine');
$c->cmd('QUIT', qr/^221 /);

ok(error_log_clean($n), 'no alerts in the error log');

$n->stop();
done_testing();
