#!/usr/bin/perl

# Client-side commands answered by the module itself (SPEC §5,
# docs/protocol.md): greeting, EHLO keywords, HELO, NOOP, RSET, VRFY,
# HELP, QUIT, errors, line length, max_errors, idle timeout.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $b = start_backend(name => 'b1');

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        timeout 5s;
    }
    server {
        listen 127.0.0.1:%%PORT_errs%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        max_errors 3;
    }
    server {
        listen 127.0.0.1:%%PORT_idle%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        timeout 2s;
    }
}
EOF

my $ehlo = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n"
    . "250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n"
    . "250-CHUNKING\r\n250 HELP\r\n";

sub session {
    my ($port) = @_;
    my $c = smtp_client($port // 'smtp');
    is($c->reply(), "220 mx.test ESMTP\r\n", 'greeting');
    return $c;
}

# greeting, EHLO, HELO and the simple commands

my $c = session();
$c->send("EHLO client.test\r\n");
is($c->reply(), $ehlo, 'EHLO keywords');
$c->send("HELO client.test\r\n");
is($c->reply(), "250 mx.test\r\n", 'HELO');
$c->send("ehlo client.test\r\n");
is($c->reply(), $ehlo, 'lower-case ehlo');
$c->cmd('NOOP', qr/^250 2\.0\.0 Ok\r\n\z/);
$c->cmd('NOOP anything at all', qr/^250 2\.0\.0 Ok\r\n\z/);
$c->cmd('RSET', qr/^250 2\.0\.0 Ok\r\n\z/);
$c->send("VRFY postmaster\r\n");
is($c->reply(), "252 2.0.0 Cannot VRFY user, but will accept message and"
    . " attempt delivery\r\n", 'VRFY');
$c->cmd('HELP', qr{^214 2\.0\.0 https://www\.rfc-editor\.org/rfc/rfc5321\r\n\z});
$c->cmd('EXPN list', qr/^502 5\.5\.1 Command not supported\r\n\z/);
$c->cmd('QUIT', qr/^221 2\.0\.0 Bye\r\n\z/);
ok($c->closed(), 'closed after QUIT');

# errors, max 4 per session (default max_errors 5)

$c = session();
$c->cmd('FOO bar', qr/^500 5\.5\.2 Error: command not recognized\r\n\z/);
$c->cmd('HELO', qr/^501 5\.5\.4 /, 'HELO without argument');
$c->cmd('MAIL FROM:<a@b.test>', qr/^503 5\.5\.1 Send HELO\/EHLO first\r\n\z/);
$c->cmd('EHLO client.test', qr/^250 HELP\r\n\z/m);
$c->cmd('RCPT TO:<c@d.test>', qr/^503 5\.5\.1 Need MAIL before RCPT\r\n\z/);
ok(!$c->closed(0.2), 'still open after 4 errors');

$c = session();
$c->cmd('EHLO client.test', qr/^250 HELP/m);
$c->cmd('DATA', qr/^503 5\.5\.1 Need MAIL before DATA\r\n\z/);
$c->cmd('MAIL FROM:garbage', qr/^501 5\.5\.4 Syntax error/);
$c->cmd('MAIL FROM:<a@b.test> FOO=bar', qr/^555 5\.5\.4 Unsupported option/);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 Ok\r\n\z/);
$c->cmd('MAIL FROM:<a@b.test>', qr/^503 5\.5\.1 Nested MAIL command\r\n\z/);

$c = session();
$c->cmd('EHLO client.test', qr/^250 HELP/m);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test> NOTIFY=NEVER', qr/^555 5\.5\.4 /,
    'RCPT parameter');
$c->cmd('DATA', qr/^554 5\.5\.1 No valid recipients\r\n\z/);
$c->cmd('RSET', qr/^250 2\.0\.0 Ok/);
$c->cmd('DATA extra', qr/^501 5\.5\.4 /, 'DATA with argument');
ok(!$c->closed(0.2), 'still open');

# line length: 512 octets with CRLF are fine, 513 are not

$c = session();
my $line = 'NOOP ' . ('x' x 505);
is(length("$line\r\n"), 512, '512-octet line');
$c->cmd($line, qr/^250 2\.0\.0 Ok\r\n\z/, '512 octets accepted');
$c->cmd($line . 'x', qr/^500 5\.5\.6 Line too long\r\n\z/,
    '513 octets rejected');
$c->cmd('NOOP', qr/^250 2\.0\.0 Ok\r\n\z/, 'session goes on');
$c->cmd('MAIL FROM:<' . ('a' x 600) . '@b.test>', qr/^500 5\.5\.6 /,
    'long MAIL line');
$c->cmd('NOOP', qr/^250 2\.0\.0 Ok\r\n\z/, 'session goes on');

# max_errors 3: three error replies, then 421 4.7.0 and close

$c = session('errs');
$c->cmd('BOGUS1', qr/^500 5\.5\.2 /);
$c->cmd('BOGUS2', qr/^500 5\.5\.2 /);
$c->send("BOGUS3\r\n");
my $r = $c->reply();
if ($r =~ /^500/) {
    pass('third error answered');
    $r = $c->reply(0.5);
    if (!defined $r) {
        $c->send("BOGUS4\r\n");
        $r = $c->reply();
    }
}
is($r, "421 4.7.0 mx.test Too many errors\r\n", 'max_errors: 421 4.7.0');
ok($c->closed(), 'max_errors: closed');

# idle timeout

$c = session('idle');
$c->cmd('EHLO client.test', qr/^250 HELP/m);
$r = $c->reply(5);
is($r, "421 4.4.2 mx.test Timeout exceeded\r\n", 'idle timeout: 421');
ok($c->closed(), 'idle timeout: closed');

# the timeout is re-armed by every read
$c = session('idle');
for (1 .. 3) {
    select(undef, undef, undef, 1.2);
    $c->cmd('NOOP', qr/^250 2\.0\.0 Ok/, "NOOP after 1.2 s, round $_");
}

is($b->connections, 0, 'no backend connection for local commands');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
