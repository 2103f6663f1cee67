#!/usr/bin/perl

# SPEC §7: one key=value line at info level per transaction.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $b = start_backend(name => 'b1',
    args => ['--dot-reply', '554 5.7.1 Rejected on the second',
             '--rcpt', 'first@=250 2.1.5 Ok']);
my $ok = start_backend(name => 'ok');

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    smtp_ext_upstream pool1 {
        server 127.0.0.1:%%PORT_ok%%;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass pool1;
    }
    server {
        listen 127.0.0.1:%%PORT_rej%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
}
EOF

sub tx_lines {
    return grep { /\[info\]/ && /\bfrom=/ && /\brcpts=/ }
        split /\n/, error_log($n);
}

my $msg = "Subject: log\r\n\r\nhello\r\n";

my $c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO log.client.test', qr/^250 /m);
$c->cmd('MAIL FROM:<sender@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<r1@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('RCPT TO:<r2@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send($msg . ".\r\n");
$c->expect(qr/^250 2\.0\.0 /);

ok(wait_for(sub { tx_lines() == 1 }), 'one log line after one transaction')
    or diag(error_log($n));
my ($l) = tx_lines();
$l //= '';
my $bport = SmtpExt::Test::port('ok');

for my $k (qw(client helo from rcpts route backend size reply
              duration))
{
    like($l, qr/\b$k=/, "log has $k=");
}
# values may be quoted
like($l, qr/\bclient="?127\.0\.0\.1\b/, 'client address');
like($l, qr/\bhelo="?log\.client\.test\b/, 'helo');
like($l, qr/\bfrom="?<?sender\@b\.test>?/, 'sender');
like($l, qr/\brcpts="?2\b/, 'recipients count');
like($l, qr/\broute="?pool1\b/, 'route is the pool name');
like($l, qr/\bbackend="?127\.0\.0\.1:$bport\b/, 'backend address');
like($l, qr/\bsize="?(\d+)/, 'size');
is(($l =~ /\bsize="?(\d+)/)[0], length($msg), 'size is the message size');
like($l, qr/\breply="?250\b/, 'reply code');

# a second transaction on the same session: a second line

$c->cmd('MAIL FROM:<>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<r3@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send(".\r\n");
$c->expect(qr/^250 2\.0\.0 /);
ok(wait_for(sub { tx_lines() == 2 }), 'a second line');
like((tx_lines())[1] // '', qr/\brcpts="?1\b/, 'second: one recipient');

# no line for a session without a transaction
$c->cmd('QUIT', qr/^221 /);
$c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO x.test', qr/^250 /m);
$c->cmd('QUIT', qr/^221 /);

# a rejected message logs the backend's code

$c = smtp_client('rej');
$c->expect(qr/^220 /);
$c->cmd('EHLO log.client.test', qr/^250 /m);
$c->cmd('MAIL FROM:<sender@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<first@d.test>', qr/^250 2\.1\.5 /);
$c->cmd('DATA', qr/^354 /);
$c->send($msg . ".\r\n");
$c->expect(qr/^554 5\.7\.1 /);
$c->cmd('QUIT', qr/^221 /);

ok(wait_for(sub { tx_lines() == 3 }), 'a third line, no line for the'
    . ' session without a transaction') or diag(join "\n", tx_lines());
like((tx_lines())[2] // '', qr/\breply="?554\b/, 'rejected: reply=554');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
