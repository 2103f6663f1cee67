#!/usr/bin/perl

# SPEC §9 log: status= and reply= for transactions that end without DATA
# (RSET after recipients, every recipient refused, disconnect), a refused
# backend named "refused", and with error_log debug every command and
# reply logged with the AUTH secrets as "***".

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use MIME::Base64;
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}Sekr1t-pw');

my $b = start_backend(name => 'b1',
    args => ['--rcpt', 'bad@=550 5.1.1 No such user']);

my $n = start_nginx(<<'EOF');
error_log %%DIR%%/debug.log debug;
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_auth plain login;
    }
    server {
        listen 127.0.0.1:%%PORT_refused%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_nobody%%;
        smtp_ext_auth plain;
    }
}
EOF

my $plain = encode_base64("\0alice\0Sekr1t-pw", '');

my $c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd("AUTH PLAIN $plain", qr/^235 /);
# RSET after an accepted recipient: aborted
$c->cmd('MAIL FROM:<s@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<a1@d.test>', qr/^250 /);
$c->cmd('RSET', qr/^250 /);
# every recipient refused, then RSET: rejected, the last reply
$c->cmd('MAIL FROM:<s@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<bad@d.test>', qr/^550 /);
$c->cmd('RSET', qr/^250 /);
# 12 accepted recipients: 10 named, then +2; disconnect: aborted
$c->cmd('MAIL FROM:<s@b.test>', qr/^250 /);
$c->cmd("RCPT TO:<m$_\@d.test>", qr/^250 /) for 1 .. 12;
$c->close();

# a second session: AUTH LOGIN, the user name is a secret too
$c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd('AUTH LOGIN', qr/^334 /);
$c->cmd(encode_base64('alice', ''), qr/^334 /);
$c->cmd(encode_base64('Sekr1t-pw', ''), qr/^235 /);
$c->cmd('QUIT', qr/^221 /);

# a backend that refuses the connection
$c = smtp_client('refused');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd("AUTH PLAIN $plain", qr/^235 /);
$c->cmd('MAIL FROM:<s@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<x@d.test>', qr/^451 /);
$c->cmd('QUIT', qr/^221 /);

my $log;
ok(wait_for(sub {
    $log = SmtpExt::Test::read_file($n->dir . '/debug.log') // '';
    () = $log =~ /\bstatus=/g;
}), 'log lines');
my @tx = grep { /\bstatus=/ } split /\n/, $log;

ok((grep { /rcpts=1 to=<a1\@d\.test> .*status=aborted reply=250/ } @tx),
    'RSET after a recipient: aborted') or diag(join "\n", @tx);
ok((grep { /rcpts=0 to= .*status=rejected reply=550/ } @tx),
    'all refused: rejected, reply=550');
my $ten = join ',', map { "<m$_\@d.test>" } 1 .. 10;
ok((grep { /rcpts=12 to=\Q$ten\E,\+2 .*status=aborted/ } @tx),
    'at most 10 recipients named, then +N; disconnect: aborted');
ok((grep { /rcpts=0 .*status=deferred reply=451/ } @tx),
    'refused backend: deferred');

my $nobody = SmtpExt::Test::port('nobody');
like($log, qr/backend 127\.0\.0\.1:$nobody refused the connection/,
    'a refused connection says refused');
unlike($log, qr/backend 127\.0\.0\.1:$nobody closed/, 'never "closed"');

# the debug trace: only from an nginx built --with-debug (Debian's is)
SKIP: {
    skip('nginx built without --with-debug', 6)
        unless `@{[nginx_bin()]} -V 2>&1` =~ /--with-debug/;

    like($log, qr/smtp_ext: client: MAIL FROM:<s\@b\.test>/,
        'client command');
    like($log, qr/smtp_ext: reply: 250 /, 'our reply');
    # pipelined commands go out (and are logged) together
    like($log, qr/smtp_ext: to backend 127\.0\.0\.1:\d+: MAIL FROM:<s\@b\.test>\r?
(?:\S.*\n)?RCPT TO:<a1\@d\.test>/,
        'commands to the backend');
    like($log, qr/smtp_ext: from backend 127\.0\.0\.1:\d+: 250/,
        'backend reply');
    like($log, qr/smtp_ext: client: AUTH PLAIN \*\*\*/, 'AUTH PLAIN masked');
    like($log, qr/smtp_ext: client: \*\*\*/, 'AUTH continuation masked');
}

for my $secret ($plain, encode_base64('alice', ''),
                encode_base64('Sekr1t-pw', ''), 'Sekr1t-pw')
{
    unlike($log, qr/\Q$secret\E/, "secret $secret absent");
}

done_testing();
