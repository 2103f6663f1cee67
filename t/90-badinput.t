#!/usr/bin/perl

# Hostile and broken input never takes the worker down.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $b = start_backend(name => 'b1');

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        timeout 5s;
        max_errors 1000;
    }
    server {
        listen 127.0.0.1:%%PORT_strict%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        timeout 5s;
    }
}
EOF

my $worker = worker_pid($n);
ok($worker, "worker $worker");

sub client {
    my ($port) = @_;
    my $c = smtp_client($port // 'smtp');
    $c->expect(qr/^220 /);
    return $c;
}

# read replies until one matches $re (or nothing more comes)
sub until_reply {
    my ($c, $re, $max) = @_;
    my @r;
    for (1 .. $max // 1000) {
        my $r = $c->reply(3);
        last unless defined $r;
        push @r, $r;
        return @r if $r =~ $re;
    }
    return @r;
}

# NUL in a command

my $c = client();
$c->cmd("NOOP a\0b", qr/^501 5\.5\.4 /, 'NUL in NOOP: 501');
$c->cmd("MAIL FROM:<a\0\@b.test>", qr/^50[01] 5\.5\.[24] /,
    'NUL in MAIL: error');
$c->cmd("\0\0\0\0", qr/^50[01] 5\.5\.[24] /, 'only NULs');
$c->cmd('NOOP', qr/^250 2\.0\.0 /, 'session goes on');

# 64 KiB without LF, then a command

$c = client();
$c->send('A' x 65536);
$c->send("\r\nNOOP\r\n");
my @r = until_reply($c, qr/^250 2\.0\.0 Ok/);
like($r[0] // '', qr/^500 5\.5\.6 Line too long/, '64 KiB: line too long');
like($r[-1] // '', qr/^250 2\.0\.0 Ok/, '64 KiB: NOOP answered after it');
ok(!(grep { !/^(500 5\.5\.6 |250 2\.0\.0 )/ } @r), 'only those replies')
    or diag(join '', @r);

# binary junk with line ends

$c = client();
my $junk = join '', map { chr(($_ * 131 + 7) % 256) } 1 .. 20000;
$c->send($junk . "\r\nNOOP\r\n");
@r = until_reply($c, qr/^250 2\.0\.0 Ok\r\n\z/);
like($r[-1] // '', qr/^250 2\.0\.0 Ok\r\n\z/, 'binary junk: NOOP answered');
ok(!(grep { !/^(50\d 5\.\d\.\d+ |55\d 5\.\d\.\d+ |250 )/ } @r),
    'binary junk: only error replies') or diag(join '', @r);

# a flood of commands

$c = client();
$c->send("NOOP\r\n" x 5000 . "QUIT\r\n");
my $ok = 0;
for (1 .. 5000) {
    my $r = $c->reply() // last;
    $ok++ if $r eq "250 2.0.0 Ok\r\n";
}
is($ok, 5000, '5000 pipelined NOOPs answered');
like($c->reply() // '', qr/^221 /, 'QUIT after the flood');

# a flood of errors with the default max_errors: 421 and close

$c = client('strict');
$c->send("BAD\r\n" x 2000);
@r = until_reply($c, qr/^421 /);
like($r[-1] // '', qr/^421 4\.7\.0 mx\.test Too many errors\r\n\z/,
    'error flood: 421');
ok($c->closed(), 'error flood: closed');
ok(@r <= 6, 'error flood: at most max_errors replies before 421');

# bare LF commands

$c = client();
$c->send("EHLO lf.test\nMAIL FROM:<a\@b.test>\nRCPT TO:<c\@d.test>\n"
    . "DATA\n");
like($c->reply(), qr/^250-mx\.test/, 'bare LF EHLO');
like($c->reply(), qr/^250 2\.1\.0 /, 'bare LF MAIL');
like($c->reply(), qr/^250 2\.1\.5 /, 'bare LF RCPT');
like($c->reply(), qr/^354 /, 'bare LF DATA');
$c->send("body\r\n.\r\nQUIT\n");
like($c->reply(), qr/^250 2\.0\.0 /, 'delivered');
like($c->reply(), qr/^221 /, 'bare LF QUIT');
my $conn = $b->connections;
ok($b->wait_closed($conn), 'backend closed');
like($b->raw($conn), qr/\r\nDATA\r\nbody\r\n\.\r\nQUIT\r\n\z/,
    'the backend got CRLF commands');

# client gone in the middle of DATA

$c = client();
$c->cmd('EHLO client.test', qr/^250 /m);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send("Subject: cut\r\n\r\nsome text\r\n");
$conn = $b->connections;
ok(wait_for(sub { ($b->raw($conn) // '') =~ /some text\r\n\z/ }),
    'backend got the start of the data');
$c->close();
ok($b->wait_closed($conn), 'backend connection closed');
unlike($b->raw($conn), qr/\r\n\.\r\n/, 'no final dot at the backend');
ok(!-e $b->dir . "/msg-$conn-1.eml", 'no message at the backend');

# client gone while the backend connection is being set up, and right
# after the greeting

for (1 .. 20) {
    $c = smtp_client('smtp');
    $c->send("EHLO x\r\nMAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\n");
    $c->close();
    $c = smtp_client('smtp');
    $c->close();
}

# a normal session still works, same worker, clean log

$c = client();
$c->cmd('EHLO client.test', qr/^250 /m);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send("still fine\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued/, 'normal session after abuse');
$c->cmd('QUIT', qr/^221 /);

is(worker_pid($n), $worker, 'same worker process');
ok(error_log_clean($n), 'no alert, no crash in error.log');

$n->stop();

done_testing();
