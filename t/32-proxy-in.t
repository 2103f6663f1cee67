#!/usr/bin/perl

# listen ... proxy_protocol with set_real_ip_from: the client address from
# the PROXY header is what the backend learns through XCLIENT and PROXY.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $xc = start_backend(name => 'xc');
my $pp = start_backend(name => 'pp');

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;

    server {
        listen 127.0.0.1:%%PORT_s_xc%% proxy_protocol;
        protocol smtp_ext;
        set_real_ip_from 127.0.0.1;
        smtp_ext_pass 127.0.0.1:%%PORT_xc%%;
    }
    server {
        listen 127.0.0.1:%%PORT_s_pp%% proxy_protocol;
        protocol smtp_ext;
        set_real_ip_from 127.0.0.1;
        smtp_ext_pass 127.0.0.1:%%PORT_pp%%;
        smtp_ext_xclient off;
        smtp_ext_proxy_protocol on;
    }
}
EOF

# the address in the header is data only: nothing connects to it
sub session {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->send("PROXY TCP4 192.0.2.10 127.0.0.1 5555 25\r\n");
    $c->expect(qr/^220 /, 'greeting after the PROXY header');
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
    $c->cmd('QUIT', qr/^221 /);
}

session('s_xc');
ok($xc->wait_closed(1), 'closed');
like($xc->raw(1),
    qr/^EHLO mx\.test\r\nXCLIENT ADDR=192\.0\.2\.10 PORT=5555 /,
    'XCLIENT carries the address from the PROXY header');

session('s_pp');
ok($pp->wait_closed(1), 'closed');
like($pp->raw(1), qr/^PROXY TCP4 192\.0\.2\.10 127\.0\.0\.1 5555 \d+\r\n/,
    'the PROXY header to the backend carries it too');

my $log = $n->error_log();
like($log, qr/smtp_ext: client=192\.0\.2\.10 /, 'and the log line');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
