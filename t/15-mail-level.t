#!/usr/bin/perl

# SPEC 3: every smtp_ext_* directive of a server is valid in mail {} too
# and inherited by the servers, which may override it.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $b1 = start_backend(name => 'b1');

my $conf = <<'EOF';
mail {
    server_name mx.test;

    smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    smtp_ext_max_recipients 2;
    smtp_ext_max_message_size 1000;
    smtp_ext_xclient off;
    smtp_ext_min_data_rate 100;
    smtp_ext_upstream_timeout 5s;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        timeout 5s;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp2%%;
        protocol smtp_ext;
        smtp_ext_max_recipients 3;
        smtp_ext_max_message_size 2000;
        timeout 5s;
    }
}
EOF

my $n = start_nginx($conf);

sub session {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 mx\.test ESMTP\r\n\z/, 'greeting');
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

# inherited: pass, max_recipients 2, size 1000, no XCLIENT

my $c = session('smtp');
like($c->last_reply, qr/^250-SIZE 1000\r\n/m, 'SIZE from mail {}');
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c1@d.test>', qr/^250 /, 'route from mail {}');
$c->cmd('RCPT TO:<c2@d.test>', qr/^250 /);
$c->cmd('RCPT TO:<c3@d.test>', qr/^452 4\.5\.3 /, 'max_recipients 2');
$c->cmd('DATA', qr/^354 /);
$c->send("hello\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /);
$c->cmd('QUIT', qr/^221 /);
ok($b1->wait_closed(1), 'backend closed');
unlike($b1->raw(1), qr/XCLIENT/, 'smtp_ext_xclient off from mail {}');

# overridden in the server

$c = session('smtp2');
like($c->last_reply, qr/^250-SIZE 2000\r\n/m, 'SIZE of the server');
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c1@d.test>', qr/^250 /);
$c->cmd('RCPT TO:<c2@d.test>', qr/^250 /);
$c->cmd('RCPT TO:<c3@d.test>', qr/^250 /, 'max_recipients 3 of the server');
$c->cmd('RCPT TO:<c4@d.test>', qr/^452 4\.5\.3 /);
$c->cmd('QUIT', qr/^221 /);

# smtp_ext_auth off in a server turns off what mail {} offers

my ($rc, $out) = nginx_t(<<'EOF');
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:1;
    smtp_ext_auth plain login;
    smtp_ext_require_auth on;
    server {
        listen 127.0.0.1:%%PORT_x%%;
        protocol smtp_ext;
        smtp_ext_auth off;
        smtp_ext_require_auth off;
    }
    server {
        listen 127.0.0.1:%%PORT_y%%;
        protocol smtp_ext;
    }
}
EOF
is($rc, 0, 'nginx -t: smtp_ext_* in mail {} and a server override')
    or diag($out);

($rc, $out) = nginx_t(<<'EOF');
mail {
    server_name mx.test;
    smtp_ext_auth plain;
    smtp_ext_auth login;
    server {
        listen 127.0.0.1:%%PORT_x%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:1;
    }
}
EOF
isnt($rc, 0, 'nginx -t: a duplicate smtp_ext_auth');
like($out, qr/"smtp_ext_auth" directive is duplicate/, 'says so');

$n->stop();
done_testing();
