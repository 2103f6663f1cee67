#!/usr/bin/perl

# The module loads, a smtp_ext server needs no auth_http, stock smtp
# servers in the same mail {} still do.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

ok(-f module_path(), 'module built: ' . module_path());

my ($rc, $out) = nginx_t(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
}
EOF
is($rc, 0, 'nginx -t: smtp_ext server without auth_http') or diag($out);
like($out, qr/syntax is ok/, 'syntax is ok');

($rc, $out) = nginx_t(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
    server {
        listen 127.0.0.1:%%PORT_stock%%;
        protocol smtp;
    }
}
EOF
isnt($rc, 0, 'nginx -t: stock smtp server still needs auth_http');
like($out, qr/no "auth_http" is defined/, 'auth_http error message');

($rc, $out) = nginx_t(<<'EOF');
mail {
    server_name mx.test;
    auth_http 127.0.0.1:%%PORT_http%%/auth;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
    server {
        listen 127.0.0.1:%%PORT_stock%%;
        protocol smtp;
        smtp_auth none;
    }
}
EOF
is($rc, 0, 'nginx -t: stock smtp with auth_http next to smtp_ext')
    or diag($out);

($rc, $out) = nginx_t(<<'EOF');
mail {
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass pool_that_does_not_exist;
    }
}
EOF
isnt($rc, 0, 'nginx -t: unknown pool is an error');

($rc, $out) = nginx_t(<<'EOF');
mail {
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_bare_lf sometimes;
    }
}
EOF
isnt($rc, 0, 'nginx -t: bad smtp_ext_bare_lf value is an error');

($rc, $out) = nginx_t(<<'EOF');
mail {
    smtp_ext_upstream pool1 {
        server 127.0.0.1:%%PORT_b1%% weight=2 max_fails=1 fail_timeout=10s;
        server 127.0.0.1:%%PORT_b2%% backup;
        server 127.0.0.1:%%PORT_b3%% down;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass pool1;
        smtp_ext_xclient off;
        smtp_ext_proxy_protocol on;
        smtp_ext_connect_timeout 1s;
        smtp_ext_upstream_timeout 3s;
        smtp_ext_max_message_size 20m;
        smtp_ext_max_recipients 10;
        smtp_ext_bare_lf reject;
    }
}
EOF
is($rc, 0, 'nginx -t: all foundation directives') or diag($out);

# the server really starts and greets
my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
}
EOF

my $c = smtp_client('smtp');
is($c->reply(), "220 mx.test ESMTP\r\n", 'greeting');
$c->cmd('QUIT', qr/^221 2\.0\.0 /);
ok($c->closed(), 'closed after QUIT');

$n->stop();
ok(error_log_clean($n), 'no alerts in error.log');

done_testing();
