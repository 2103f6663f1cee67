#!/usr/bin/perl

# The test infrastructure itself, without ngx_mail_smtp_ext: the scripted
# backend (t/bin/smtp-backend.pl), the client, smtp-sink, and start_nginx
# with the stock mail proxy.  When this fails, the other tests say nothing.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin(), 'openssl');

my $envelope = "EHLO client.test\r\nMAIL FROM:<a\@b.test>\r\n"
    . "RCPT TO:<c\@d.test>\r\nDATA\r\n";

# plain backend: pipelining, exact recording, dot-stuffed message
my $b = start_backend(name => 'b1',
    args => ['--rcpt', 'nobody@=550 5.1.1 No such user']);

my $c = smtp_client('b1');
is($c->reply(), "220 backend ESMTP\r\n", 'backend greeting');
$c->send($envelope);
like($c->reply(), qr/^250-backend\r\n250-PIPELINING\r\n.*^250 XCLIENT /ms,
    'backend EHLO');
is($c->reply(), "250 2.1.0 Ok\r\n", 'backend MAIL');
is($c->reply(), "250 2.1.5 Ok\r\n", 'backend RCPT');
like($c->reply(), qr/^354 /, 'backend DATA');
$c->send("hello\r\n..dot\r\n.\r\n");
is($c->reply(), "250 2.0.0 Ok: queued as 1-1\r\n", 'backend dot');
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<nobody@d.test>', qr/^550 5\.1\.1 No such user/);
$c->cmd('QUIT', qr/^221 /);
ok($c->closed(), 'backend closes after QUIT');
ok($b->wait_closed(1), 'backend recorded close');
is($b->raw(1), $envelope . "hello\r\n..dot\r\n.\r\n"
    . "MAIL FROM:<a\@b.test>\r\nRCPT TO:<nobody\@d.test>\r\nQUIT\r\n",
    'raw bytes');
is_deeply([$b->messages], ["hello\r\n..dot\r\n"], 'message as received');
is($b->connections, 1, 'one connection');

# lenient backend sees a smuggled message
my $l = start_backend(name => 'lenient', args => ['--lenient-dot']);
$c = smtp_client('lenient');
$c->reply();
$c->send($envelope);
$c->reply() for 1 .. 4;
$c->send("a\n.\nMAIL FROM:<evil\@e.test>\r\nRCPT TO:<x\@y.test>\r\n"
    . "DATA\r\nevil\r\n.\r\nQUIT\r\n");
my @r = map { $c->reply() } 1 .. 6;
like($r[0], qr/^250 2\.0\.0 Ok: queued as 1-1/, 'lenient: first message');
like($r[4], qr/^250 2\.0\.0 Ok: queued as 1-2/, 'lenient: smuggled one');
$l->wait_closed(1);
is_deeply([$l->messages], ["a\n", "evil\r\n"], 'lenient: two messages');
ok((grep { $_ eq 'MAIL FROM:<evil@e.test>' } $l->commands(1)),
    'lenient: smuggled command executed');

# strict backend does not
my $s = start_backend(name => 'strict');
$c = smtp_client('strict');
$c->reply();
$c->send($envelope);
$c->reply() for 1 .. 4;
$c->send("a\n.\nMAIL FROM:<evil\@e.test>\r\n.\r\n");
like($c->reply(), qr/^250 2\.0\.0 Ok: queued as 1-1/, 'strict: one message');
is_deeply([$s->messages], ["a\n.\nMAIL FROM:<evil\@e.test>\r\n"],
    'strict: message');

# faults
my $f = start_backend(name => 'stall', args => ['--stall', 'rcpt']);
$c = smtp_client('stall');
$c->reply();
$c->send($envelope);
$c->reply() for 1 .. 2;
is($c->reply(0.5), undef, 'stall rcpt: no reply');

$f = start_backend(name => 'cut', args => ['--close-in-data-after', '10']);
$c = smtp_client('cut');
$c->reply();
$c->send($envelope);
$c->reply() for 1 .. 4;
$c->send(('x' x 50) . "\r\n.\r\n");
ok($c->closed(), 'close in data');
is(scalar($f->messages), 0, 'close in data: no message');

$f = start_backend(name => 'r421', args => ['--greeting', '421 4.3.2 go away']);
$c = smtp_client('r421');
is($c->reply(), "421 4.3.2 go away\r\n", '421 greeting');
ok($c->closed(), '421 greeting closes');

# TLS
my ($crt, $key) = gen_cert();
my $t = start_backend(name => 'tls', args => ['--tls', "$crt,$key"]);
$c = smtp_client('tls');
$c->reply();
like($c->ehlo(), qr/^250[- ]STARTTLS\r?$/m, 'backend offers STARTTLS');
ok($c->starttls(), 'backend STARTTLS handshake');
unlike($c->ehlo(), qr/STARTTLS/, 'no STARTTLS after TLS');
$c->cmd('QUIT', qr/^221 /);
$t->wait_closed(1);
like($t->raw(1), qr/\AEHLO client\.test\r\nSTARTTLS\r\nEHLO client\.test\r\n/,
    'raw after TLS is plaintext');

# stock nginx mail proxy (auth_http served by nginx itself)
my $n = start_nginx(<<'EOF', no_module => 1);
http {
    server {
        listen 127.0.0.1:%%PORT_http%%;
        location / {
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port %%PORT_stockb%%;
            return 204;
        }
    }
}
mail {
    server_name mx.test;
    auth_http 127.0.0.1:%%PORT_http%%/;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp;
        smtp_auth none;
        xclient off;
    }
}
EOF
my $sb = start_backend(name => 'stockb');
$c = smtp_client('smtp');
is($c->reply(), "220 mx.test ESMTP ready\r\n", 'stock nginx greeting');
$c->cmd('EHLO client.test', qr/^250/);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 Ok/);
$c->cmd('QUIT', qr/^221 /);
ok($sb->wait_closed(1), 'stock proxy backend closed');
is($sb->raw(1), "EHLO mx.test\r\nMAIL FROM:<a\@b.test>\r\n"
    . "RCPT TO:<c\@d.test>\r\nQUIT\r\n", 'stock proxy backend bytes');
ok(worker_rss($n) > 0, 'worker RSS: ' . worker_rss($n) . ' kB');
$n->stop();
ok(error_log_clean($n), 'stock nginx log clean');

# smtp-sink and smtp-source
SKIP: {
    skip 'no smtp-sink', 1 unless -x '/usr/sbin/smtp-sink';
    my $sink = start_smtp_sink();
    system('/usr/sbin/smtp-source', '-s', '2', '-m', '4',
        '-f', 'a@b.test', '-t', 'c@d.test', '127.0.0.1:' . $sink->port);
    ok(wait_for(sub { $sink->messages_count == 4 }), 'smtp-sink got 4');
}

done_testing();
