#!/usr/bin/perl

# A broken backend answers the end of data with two replies in one write
# ("250 queued" then "250 again"), while the client has pipelined its next
# transaction right after the dot (RFC 2920).  The extra reply must never
# be taken as the answer to the next command: the client's MAIL, RCPT and
# DATA get their own backend replies, in order, or a 4xx, and the next
# message is either really relayed or refused, never acknowledged for
# something the backend did not say about it.  Here the backend refuses
# the recipient (550) and the client is told 250.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $b = start_backend(name => 'b',
    args => ['--dot-reply', '250 2.0.0 queued as %N\n250 2.0.0 extra',
             '--mail-reply', '250 2.1.0 sender ok',
             '--rcpt', 'y\@d\.test=550 5.1.1 no such user']);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;

    smtp_ext_upstream plain {
        server 127.0.0.1:%%PORT_b%%;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass plain;
        timeout 10s;
    }
}
EOF

my $c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO client.test', qr/^250 /m);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<x@d.test>', qr/^250 /);
$c->cmd('DATA', qr/^354 /);

my $got = $c->pipeline([
    "one\r\n.", 'MAIL FROM:<a@b.test>', 'RCPT TO:<y@d.test>', 'DATA',
], timeout => 10);

is(scalar @$got, 4, 'four replies') or diag(explain $got);
like($got->[0] // '', qr/^250 2\.0\.0 queued as 1-1\r\n\z/, 'the dot');
like($got->[1] // '', qr/^250 /, 'MAIL');
# RCPT must carry the backend's reply to RCPT, not the extra dot reply
# nor the MAIL reply
like($got->[2] // '', qr/^(550 5\.1\.1 no such user|4\d\d )/,
    'RCPT: the backend refused it, the client must not hear 250')
    or diag("RCPT got: " . ($got->[2] // ''));

if (($got->[3] // '') =~ /^354/) {
    $c->send("two\r\n.\r\n");
    my $r = $c->reply() // '';
    my @msgs = $b->messages;
    ok($r !~ /^250/ || grep({ /two/ } @msgs) ,
        'a 250 for the second message only when the backend has it')
        or diag("reply $r, messages: " . scalar @msgs);
} else {
    like($got->[3] // '', qr/^[45]\d\d /, 'DATA refused');
}

$c->cmd('QUIT', qr/^221 /);
ok(error_log_clean($n), 'no alert in the error log');

done_testing();
