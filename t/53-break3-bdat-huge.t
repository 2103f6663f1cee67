#!/usr/bin/perl

# Break: BDAT with a chunk size of 2^60 (19 digits, fits in off_t).  SPEC
# §12: exactly n octets follow the command line and are message data,
# never commands, also when BDAT is refused.  A size the parser will not
# take must not turn the following chunk octets into commands.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $b1 = start_backend(name => 'b1', args => ['--caps',
    'PIPELINING,SIZE 10485760,8BITMIME,ENHANCEDSTATUSCODES,CHUNKING']);

my $n = start_nginx(<<'EOF2');
mail {
    server_name mx.test;
    timeout 3s;
    server {
        listen 127.0.0.1:%%PORT_s%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
}
EOF2

for my $size ('1152921504606846976', '100000000000000000') {
    my $c = smtp_client('s');
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 /);
    # chunk octets that look like a whole new transaction
    $c->send("BDAT $size\r\nRSET\r\nMAIL FROM:<evil\@x.test>\r\n"
        . "RCPT TO:<victim\@d.test>\r\nBDAT 3 LAST\r\nbad");
    my @r;
    while (defined(my $x = $c->reply(1))) { push @r, $x; }
    my $all = join('', @r);
    unlike($all, qr/^250 2\.1\.0 /m,
        "BDAT $size: its octets are not run as commands (no MAIL 250)");
    unlike($all, qr/queued/, "BDAT $size: no message from chunk octets");
    close $c->sock;
}

ok($b1->wait_closed(scalar $b1->connections), 'backends closed');
ok(!grep({ /evil/ } map { $b1->raw($_) // '' } 1 .. $b1->connections),
    'the backend never saw the smuggled MAIL');

done_testing();
