#!/usr/bin/perl

# smtp_ext_max_message_size and smtp_ext_max_recipients.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $b = start_backend(name => 'b1',
    args => ['--caps', 'PIPELINING,SIZE 10485760,ENHANCEDSTATUSCODES']);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_max_message_size 1000;
        smtp_ext_max_recipients 3;
    }
}
EOF

sub client {
    my $c = smtp_client('smtp');
    $c->expect(qr/^220 /);
    $c->send("EHLO client.test\r\n");
    return ($c, $c->reply());
}

# a message of exactly $len octets (with its last CRLF), no leading dots
sub message {
    my ($len) = @_;
    my $m = '';
    my $i = 0;
    while (length($m) < $len) {
        my $l = sprintf("line %04d %s\r\n", $i++, 'x' x 60);
        my $left = $len - length $m;
        $l = ('y' x ($left - 2)) . "\r\n" if length($l) > $left;
        $m .= $l;
    }
    die unless length($m) == $len;
    return $m;
}

my ($c, $ehlo) = client();
like($ehlo, qr/^250-SIZE 1000\r$/m, 'EHLO advertises SIZE 1000');

$c->cmd('MAIL FROM:<a@b.test> SIZE=1001',
    qr/^552 5\.3\.4 Message size exceeds fixed maximum message size\r\n\z/,
    'SIZE= over the limit');
$c->cmd('MAIL FROM:<a@b.test> SIZE=1000', qr/^250 2\.1\.0 /,
    'SIZE= at the limit');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
my $m1000 = message(1000);
$c->send($m1000 . ".\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued as 1-1\r\n\z/,
    '1000 octets pass');

# over the limit while streaming
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send(message(1001) . ".\r\n");
$c->expect(qr/^552 5\.3\.4 Message size exceeds fixed maximum message size\r\n\z/,
    '1001 octets: 552 5.3.4 after the end of data');
ok($b->wait_closed(1), 'backend connection closed without the dot');
is_deeply([$b->messages], [$m1000], 'the backend got the first only');
unlike($b->raw(1), qr/\r\n\.\r\n(?:QUIT\r\n)?\z/, 'no final dot at the end');

# much bigger, in several writes
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
my $big = message(100000);
$c->send(substr($big, $_ * 10000, 10000)) for 0 .. 9;
$c->send(".\r\n");
$c->expect(qr/^552 5\.3\.4 /, '100000 octets: 552 5.3.4');
$c->cmd('NOOP', qr/^250 2\.0\.0 /, 'session goes on');
ok($b->wait_closed(2), 'second backend connection closed');
is(scalar($b->messages), 1, 'still one message at the backend');
$c->cmd('QUIT', qr/^221 /);

# max_recipients 3

($c) = client();
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd("RCPT TO:<r$_\@d.test>", qr/^250 2\.1\.5 /) for 1 .. 3;
$c->cmd('RCPT TO:<r4@d.test>', qr/^452 4\.5\.3 Too many recipients\r\n\z/,
    '4th recipient: 452 4.5.3');
$c->cmd('DATA', qr/^354 /);
$c->send("x\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /, 'delivered to 3');
$c->cmd('QUIT', qr/^221 /);
my $k = $b->connections;
ok($b->wait_closed($k), 'closed');
is_deeply([grep { /^RCPT/ } $b->commands($k)],
    [map { "RCPT TO:<r$_\@d.test>" } 1 .. 3], 'backend got 3 RCPTs');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
