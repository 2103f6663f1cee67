#!/usr/bin/perl

# SMTP smuggling (SPEC §6): a backend that also ends data at LF.LF, CR.CR
# and friends must still see exactly one message, because the module only
# ends data at CRLF.CRLF and normalizes (or rejects) bare CR and LF.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $norm = start_backend(name => 'norm', args => ['--lenient-dot']);
my $rej = start_backend(name => 'rej', args => ['--lenient-dot']);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_s_norm%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_norm%%;
        smtp_ext_upstream_timeout 3s;
    }
    server {
        listen 127.0.0.1:%%PORT_s_rej%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_rej%%;
        smtp_ext_upstream_timeout 3s;
        smtp_ext_bare_lf reject;
    }
}
EOF

my %variants = (
    'LF.LF' => "\n.\n",
    'CRLF.LF' => "\r\n.\n",
    'LF.CRLF' => "\n.\r\n",
    'CR.CRLF' => "\r.\r\n",
    'CRLF.CR' => "\r\n.\r",
    'CR.CR' => "\r.\r",
    'CR.LF' => "\r.\n",
    'LF.CR' => "\n.\r",
    'CRLF.CRCRLF' => "\r\n.\r\r\n",
    'CRLF.LFCRLF' => "\r\n.\n\r\n",
);

my $smuggled = "MAIL FROM:<smuggled\@evil.test>\r\n"
    . "RCPT TO:<victim\@d.test>\r\nDATA\r\n"
    . "From: ceo\@d.test\r\nSubject: smuggled\r\n\r\nsend money\r\n";

sub open_tx {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
    $c->cmd('DATA', qr/^354 /);
    return $c;
}

sub smuggling_free {
    my ($b, $conn, $name) = @_;
    my @cmds = $b->commands($conn);
    ok(!(grep { /smuggled|victim/ } @cmds),
        "$name: smuggled commands never executed")
        or diag(join "\n", @cmds);
}

# normalize: one message, no bare CR/LF, no lone dot line

my $conn = 0;
for my $v (sort keys %variants) {
    my $c = open_tx('s_norm');
    $c->send("Subject: hi\r\n\r\nhello" . $variants{$v} . $smuggled
        . ".\r\n");
    $c->expect(qr/^250 2\.0\.0 Ok: queued as \d+-1\r\n\z/,
        "$v: one end of data");
    is($c->pending_input(0.2), '', "$v: nothing else answered");
    $c->cmd('QUIT', qr/^221 /);
    $conn++;
    ok($norm->wait_closed($conn), "$v: backend closed");
    my @m = grep { defined } map {
        SmtpExt::Test::read_file($norm->dir . "/msg-$conn-$_.eml")
    } 1 .. 3;
    is(scalar @m, 1, "$v: backend saw exactly one message");
    my $m = $m[0] // '';
    ok($m !~ /\r(?!\n)/ && $m !~ /(?<!\r)\n/, "$v: no bare CR or LF");
    ok($m !~ /\r\n\.\r\n/, "$v: no lone dot line inside");
    like($m, qr/send money\r\n\z/, "$v: the whole message is there");
    smuggling_free($norm, $conn, $v);
}

# exact normalization of simple bare line ends

my $c = open_tx('s_norm');
$c->send("a\nb\rc\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /, 'bare LF and CR accepted');
$c->cmd('QUIT', qr/^221 /);
$conn++;
$norm->wait_closed($conn);
is(SmtpExt::Test::read_file($norm->dir . "/msg-$conn-1.eml"),
    "a\r\nb\r\nc\r\n", 'bare LF and bare CR become CRLF');

# reject: 550 5.6.11, the backend never gets a final dot

my $rconn = 0;
for my $v ('LF.LF', 'CR.CR', 'CRLF.LF') {
    $c = open_tx('s_rej');
    $c->send("Subject: hi\r\n\r\nhello" . $variants{$v} . $smuggled
        . ".\r\n");
    $c->expect(qr/^550 5\.6\.11 Bare CR or LF not allowed in message data\r\n\z/,
        "reject $v: 550 5.6.11");
    $c->cmd('QUIT', qr/^221 /);
    $rconn++;
    ok($rej->wait_closed($rconn), "reject $v: backend closed");
    is(scalar(grep { -e $rej->dir . "/msg-$rconn-$_.eml" } 1 .. 3), 0,
        "reject $v: backend got no message");
    smuggling_free($rej, $rconn, "reject $v");
}

# reject mode still takes clean mail
$c = open_tx('s_rej');
$c->send("clean\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /, 'reject mode: clean message accepted');
$c->cmd('QUIT', qr/^221 /);

# a bare LF in a later transaction does not hurt the session
$c = open_tx('s_rej');
$c->send("bad\nline\r\n.\r\n");
$c->expect(qr/^550 5\.6\.11 /, 'bare LF rejected');
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /, 'session goes on');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send("good\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /, 'next transaction accepted');
$c->cmd('QUIT', qr/^221 /);

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
