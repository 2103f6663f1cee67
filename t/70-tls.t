#!/usr/bin/perl

# STARTTLS and implicit TLS on the client side.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin(), 'openssl');

my ($crt, $key) = gen_cert('mx.test');
my $b = start_backend(name => 'b1');

my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;
    ssl_certificate $crt;
    ssl_certificate_key $key;

    server {
        listen 127.0.0.1:%%PORT_on%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        starttls on;
    }
    server {
        listen 127.0.0.1:%%PORT_only%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        starttls only;
    }
    server {
        listen 127.0.0.1:%%PORT_implicit%% ssl;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
    server {
        listen 127.0.0.1:%%PORT_plain%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
}
EOF

my $ehlo_tls = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n"
    . "250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n"
    . "250-CHUNKING\r\n250-STARTTLS\r\n250 HELP\r\n";
(my $ehlo_plain = $ehlo_tls) =~ s/250-STARTTLS\r\n//;

sub deliver {
    my ($c, $name) = @_;
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /, "$name: MAIL");
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /, "$name: RCPT");
    $c->cmd('DATA', qr/^354 /, "$name: DATA");
    $c->send("$name\r\n.\r\n");
    $c->expect(qr/^250 2\.0\.0 Ok: queued/, "$name: delivered");
}

# STARTTLS; plaintext pipelined after it is discarded

my $c = smtp_client('on');
$c->expect(qr/^220 mx\.test ESMTP\r\n\z/);
is($c->ehlo(), $ehlo_tls, 'EHLO offers STARTTLS');
$c->send("STARTTLS\r\nVRFY injected\r\nHELP\r\n");
$c->expect(qr/^220 2\.0\.0 Ready to start TLS\r\n\z/, 'STARTTLS 220');
ok($c->start_ssl(), 'TLS handshake');
$c->cmd('NOOP', qr/^250 2\.0\.0 Ok\r\n\z/,
    'first reply after TLS is for the first command sent over TLS');
is($c->pending_input(0.3), '', 'nothing else arrives');
is($c->ehlo(), $ehlo_plain, 'EHLO after TLS: no STARTTLS');
$c->cmd('STARTTLS', qr/^503 5\.5\.1 Already in TLS\r\n\z/);
deliver($c, 'starttls');
$c->cmd('QUIT', qr/^221 /);

# MAIL before EHLO again is a bad sequence after TLS (state reset)
$c = smtp_client('on');
$c->reply();
$c->ehlo();
ok($c->starttls(), 'STARTTLS');
$c->cmd('MAIL FROM:<a@b.test>', qr/^503 5\.5\.1 /,
    'EHLO needed again after STARTTLS');
$c->cmd('QUIT', qr/^221 /);

# starttls only

$c = smtp_client('only');
$c->reply();
like($c->ehlo(), qr/^250-STARTTLS\r$/m, 'only: STARTTLS offered');
$c->cmd('MAIL FROM:<a@b.test>',
    qr/^530 5\.7\.0 Must issue a STARTTLS command first\r\n\z/,
    'only: MAIL before TLS');
ok($c->starttls(), 'only: STARTTLS');
is($c->ehlo(), $ehlo_plain, 'only: EHLO after TLS');
deliver($c, 'only');
$c->cmd('QUIT', qr/^221 /);

# implicit TLS

$c = smtp_client('implicit', ssl => 1);
$c->expect(qr/^220 mx\.test ESMTP\r\n\z/, 'implicit TLS greeting');
is($c->ehlo(), $ehlo_plain, 'implicit TLS: no STARTTLS');
deliver($c, 'implicit');
$c->cmd('QUIT', qr/^221 /);

# no TLS configured

$c = smtp_client('plain');
$c->reply();
$c->ehlo();
$c->cmd('STARTTLS', qr/^502 5\.5\.1 Command not supported\r\n\z/,
    'STARTTLS without TLS');
$c->cmd('QUIT', qr/^221 /);

is_deeply([$b->messages], ["starttls\r\n", "only\r\n", "implicit\r\n"],
    'three messages reached the backend');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
