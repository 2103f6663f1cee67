#!/usr/bin/perl

# Backend faults in the middle of a transaction: the client gets 451 4.4.x,
# never 250; backend 4xx/5xx replies are passed on.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my %b = (
    cut => start_backend(name => 'cut', args => ['--close-in-data-after', 100]),
    dot => start_backend(name => 'dot', args => ['--stall', 'dot']),
    rcpt => start_backend(name => 'rcpt', args => ['--stall', 'rcpt']),
    mail => start_backend(name => 'mail', args => ['--stall', 'mail']),
    data => start_backend(name => 'data', args => ['--stall', 'data']),
    ehlo => start_backend(name => 'ehlo', args => ['--stall', 'ehlo']),
    closeg => start_backend(name => 'closeg', args => ['--close-after-greeting']),
    d452 => start_backend(name => 'd452',
        args => ['--data-reply', '452 4.3.1 Insufficient system storage']),
    d554 => start_backend(name => 'd554',
        args => ['--data-reply', '554 5.5.0 No DATA today']),
    dot451 => start_backend(name => 'dot451',
        args => ['--dot-reply', '451 4.7.1 Greylisted, come back later']),
    dot552 => start_backend(name => 'dot552',
        args => ['--dot-reply', '552 5.2.2 Mailbox full']),
);

my $conf = "mail {\n    server_name mx.test;\n";
for my $k (sort keys %b) {
    $conf .= <<"EOF";
    server {
        listen 127.0.0.1:%%PORT_s_$k%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_$k%%;
        smtp_ext_connect_timeout 1s;
        smtp_ext_upstream_timeout 2s;
        timeout 10s;
    }
EOF
}
$conf .= "}\n";

my $n = start_nginx($conf);

my $msg = join '', map { "line $_ " . ('x' x 60) . "\r\n" } 1 .. 30;

sub client {
    my ($k) = @_;
    my $c = smtp_client("s_$k", timeout => 6);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    return $c;
}

sub no_dot {
    my ($k, $conn, $raw_too) = @_;
    my $b = $b{$k};
    ok($b->wait_closed($conn // 1, 5), "$k: backend connection closed");
    is(scalar($b->messages), 0, "$k: backend got no message");
    return unless $raw_too;
    unlike($b->raw($conn // 1) // '', qr/\r\n\.\r\n\z/,
        "$k: no final dot at the backend");
}

# backend closes in the middle of the data

my $c = client('cut');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send($msg . ".\r\n");
$c->expect(qr/^451 4\.4\.2 Backend connection lost, try again later\r\n\z/,
    'close in DATA: 451 4.4.2');
$c->cmd('NOOP', qr/^250 2\.0\.0 /, 'session goes on');
# the module may well have sent the dot before it saw the close
no_dot('cut');

# the next transaction on the same session gets a new backend connection
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /, 'new backend connection');
$c->cmd('QUIT', qr/^221 /);
ok($b{cut}->wait_closed(2), 'second connection closed');

# backend never answers the final dot

$c = client('dot');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send($msg . ".\r\n");
my $t = time;
$c->expect(qr/^451 4\.4\.2 /, 'stall at dot: 451 4.4.2');
ok(time - $t <= 4, 'within the upstream timeout');
$c->cmd('QUIT', qr/^221 /);

# stalls at RCPT, MAIL, DATA, EHLO

$c = client('rcpt');
$c->cmd('RCPT TO:<c@d.test>', qr/^451 4\.4\.2 /, 'stall at RCPT: 451');
$c->cmd('QUIT', qr/^221 /);

$c = client('mail');
$c->cmd('RCPT TO:<c@d.test>', qr/^451 4\.4\.2 /, 'stall at MAIL: 451 at RCPT');
$c->cmd('QUIT', qr/^221 /);

$c = client('data');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^451 4\.4\.2 /, 'stall at DATA: 451');
$c->cmd('QUIT', qr/^221 /);
no_dot('data', 1, 1);

$c = client('ehlo');
$c->cmd('RCPT TO:<c@d.test>', qr/^451 4\.4\.[12] /, 'stall at EHLO: 451');
$c->cmd('QUIT', qr/^221 /);

$c = client('closeg');
$c->cmd('RCPT TO:<c@d.test>', qr/^451 4\.4\.[12] /,
    'close after greeting: 451');
$c->cmd('QUIT', qr/^221 /);

# backend replies to DATA and to the dot are passed on

$c = client('d452');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^452 4\.3\.1 Insufficient system storage\r\n\z/,
    'DATA 452 forwarded');
$c->cmd('RSET', qr/^250 2\.0\.0 /);
$c->cmd('QUIT', qr/^221 /);

$c = client('d554');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^554 5\.5\.0 No DATA today\r\n\z/, 'DATA 554 forwarded');
$c->cmd('QUIT', qr/^221 /);

$c = client('dot451');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send($msg . ".\r\n");
$c->expect(qr/^451 4\.7\.1 Greylisted, come back later\r\n\z/,
    'dot 451 forwarded');
$c->cmd('QUIT', qr/^221 /);

$c = client('dot552');
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send($msg . ".\r\n");
$c->expect(qr/^552 5\.2\.2 Mailbox full\r\n\z/, 'dot 552 forwarded');
$c->cmd('QUIT', qr/^221 /);

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
