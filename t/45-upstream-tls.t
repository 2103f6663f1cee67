#!/usr/bin/perl

# STARTTLS towards the backend (smtp_ext_upstream_tls) and least_conn.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin(), 'openssl');

my ($crt, $key) = SmtpExt::Test::gen_cert('backend.test');

my $caps = 'PIPELINING,ENHANCEDSTATUSCODES';

my $tls = start_backend(name => 'tls',
    args => ['--caps', $caps, '--tls', "$crt,$key"]);
my $opp = start_backend(name => 'opp', args => ['--caps', $caps]);
my $plain = start_backend(name => 'plain', args => ['--caps', $caps]);
my $lc1 = start_backend(name => 'lc1', args => ['--caps', $caps]);
my $lc2 = start_backend(name => 'lc2', args => ['--caps', $caps]);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;

    smtp_ext_upstream lc {
        server 127.0.0.1:%%PORT_lc1%%;
        server 127.0.0.1:%%PORT_lc2%%;
        least_conn;
    }

    server {
        listen 127.0.0.1:%%PORT_s_tls%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_tls%%;
        smtp_ext_upstream_tls required;
    }
    server {
        listen 127.0.0.1:%%PORT_s_opp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_opp%%;
        smtp_ext_upstream_tls on;
    }
    server {
        listen 127.0.0.1:%%PORT_s_plain%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_plain%%;
        smtp_ext_upstream_tls required;
        smtp_ext_connect_timeout 2s;
    }
    server {
        listen 127.0.0.1:%%PORT_s_lc%%;
        protocol smtp_ext;
        smtp_ext_pass lc;
    }
}
EOF

sub client {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    return $c;
}

my $tail = "MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\nDATA\r\n"
    . "hi\r\n.\r\nQUIT\r\n";

# required, offered: STARTTLS, then EHLO again inside TLS

my $c = client('s_tls');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /, 'RCPT through TLS');
$c->cmd('DATA', qr/^354 /);
$c->send("hi\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued/, 'message through TLS');
$c->cmd('QUIT', qr/^221 /);

ok($tls->wait_closed(1), 'closed');
is($tls->raw(1), "EHLO mx.test\r\nSTARTTLS\r\nEHLO mx.test\r\n" . $tail,
    'backend saw STARTTLS and the transaction after it');
like($tls->log(1), qr/^\* tls handshake/m, 'handshake happened');
is(scalar($tls->messages), 1, 'one message');

# a big message through TLS: body sent from the input buffer (writev
# through TLS), then the final dot

my $big = join '', map { sprintf("%05d %s\r\n", $_, 'x' x 70) } 1 .. 1500;
$c = client('s_tls');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send($big . ".\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued/, 'big message through TLS');
$c->cmd('QUIT', qr/^221 /);
ok($tls->wait_closed(2), 'closed');
is(($tls->messages)[1], $big, 'big message intact through TLS');

# on, not offered: plaintext

$c = client('s_opp');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /, 'opportunistic: plaintext');
$c->cmd('DATA', qr/^354 /);
$c->send("hi\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /);
$c->cmd('QUIT', qr/^221 /);
ok($opp->wait_closed(1), 'closed');
is($opp->raw(1), "EHLO mx.test\r\n" . $tail, 'no STARTTLS attempted');

# required, not offered: the backend is not used, the client never sees 250

$c = client('s_plain');
$c->cmd('RCPT TO:<c@d.test>', qr/^451 4\.4\.1 /, 'required without TLS: 451');
$c->cmd('QUIT', qr/^221 /);
ok($plain->wait_closed(1), 'closed');
unlike($plain->raw(1), qr/MAIL FROM/, 'no envelope sent in plaintext');

# least_conn: with one session holding lc1, the next goes to lc2

my $hold = client('s_lc');
$hold->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);

my $first = $lc1->connections + $lc2->connections;
is($first, 1, 'one backend connection held');

for (1 .. 3) {
    $c = client('s_lc');
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
    $c->cmd('QUIT', qr/^221 /);
    SmtpExt::Test::wait_for(sub {
        ($lc1->connections + $lc2->connections) == 1 + $_
    }, 5);
}

my ($busy, $idle) = $lc1->connections == 1 ? ($lc1, $lc2) : ($lc2, $lc1);
is($busy->connections, 1, 'least_conn: the busy backend got no more');
is($idle->connections, 3, 'least_conn: the idle backend got the rest');

$hold->cmd('QUIT', qr/^221 /);

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
