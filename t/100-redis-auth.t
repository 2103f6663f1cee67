#!/usr/bin/perl

# SMTP AUTH against Redis (SPEC §3, §4, §5): PLAIN, LOGIN, CRAM-MD5, the
# password schemes, disabled users, starttls only, smtp_ext_require_auth,
# and LOGIN= in the backend's XCLIENT.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;
use SmtpExt::Redis;
use MIME::Base64 ();

require_programs(nginx_bin(), redis_bin(), 'openssl');

my $r = start_redis();
my $b1 = start_backend(name => 'b1');
my $b2 = start_backend(name => 'b2');
my ($crt, $key) = gen_cert('mx.test');

my $sha = `openssl passwd -6 -- pw-sha`;
chomp $sha;
like($sha, qr/^\$6\$/, 'openssl passwd -6');

my %users = (
    alice => '{PLAIN}secret',
    sha => $sha,
    yes => hash_yescrypt('pw-yes'),
    bcr => hash_bcrypt('pw-bcr'),
    ssha => hash_ssha('pw-ssha'),
    'joe+tag=1@ex.test' => '{PLAIN}pw-joe',
);
for my $u (sort keys %users) {
    $r->cmd('HSET', "user:$u", 'password', $users{$u});
}
$r->cmd('HSET', 'user:dis', 'password', '{PLAIN}pw-dis', 'disabled', '1');

my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;

    smtp_ext_upstream pool1 {
        server 127.0.0.1:%%PORT_b1%%;
    }

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass pool1;
        smtp_ext_auth plain login cram-md5;
        smtp_ext_auth_fail_limit 1000;
    }

    server {
        listen 127.0.0.1:%%PORT_noauth%%;
        protocol smtp_ext;
        smtp_ext_pass pool1;
    }

    server {
        listen 127.0.0.1:%%PORT_tlsonly%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b2%%;
        smtp_ext_auth plain login;
        smtp_ext_auth_fail_limit 1000;
        starttls only;
        ssl_certificate $crt;
        ssl_certificate_key $key;
    }

    server {
        listen 127.0.0.1:%%PORT_submit%%;
        protocol smtp_ext;
        smtp_ext_pass pool1;
        smtp_ext_auth plain;
        smtp_ext_require_auth on;
        smtp_ext_auth_fail_limit 1000;
    }
}
EOF

sub session {
    my ($port) = @_;
    my $c = smtp_client($port // 'smtp', timeout => 5);
    $c->expect(qr/^220 mx\.test ESMTP\r\n\z/);
    $c->cmd('EHLO client.test', qr/^250 HELP\r\n\z/m);
    return $c;
}

sub plain {
    my ($u, $p) = @_;
    return b64("\0$u\0$p");
}

my $ok = "235 2.7.0 Authentication successful\r\n";
my $bad = "535 5.7.8 Authentication credentials invalid\r\n";

# EHLO lists the mechanisms

my $c = smtp_client('smtp');
$c->expect(qr/^220 /);
my $ehlo = $c->ehlo();
like($ehlo, qr/^250-AUTH PLAIN LOGIN CRAM-MD5\r\n/m, 'EHLO lists AUTH');

# PLAIN with an initial response

$c->send('AUTH PLAIN ' . plain('alice', 'secret') . "\r\n");
is($c->reply(), $ok, 'PLAIN initial response: 235 2.7.0');
$c->cmd('AUTH PLAIN ' . plain('alice', 'secret'),
    qr/^503 5\.5\.1 Already authenticated\r\n\z/, 'AUTH twice: 503');
$c->cmd('QUIT', qr/^221 /);

# PLAIN with a 334 continuation; authzid is ignored

$c = session();
$c->send("AUTH PLAIN\r\n");
is($c->reply(), "334 \r\n", 'PLAIN: empty 334 challenge');
$c->send(b64("someone\0alice\0secret") . "\r\n");
is($c->reply(), $ok, 'PLAIN continuation: 235');
$c->cmd('QUIT', qr/^221 /);

# LOGIN without and with the initial username

$c = session();
$c->send("AUTH LOGIN\r\n");
is($c->reply(), "334 VXNlcm5hbWU6\r\n", 'LOGIN: Username:');
$c->send(b64('alice') . "\r\n");
is($c->reply(), "334 UGFzc3dvcmQ6\r\n", 'LOGIN: Password:');
$c->send(b64('secret') . "\r\n");
is($c->reply(), $ok, 'LOGIN: 235');
$c->cmd('QUIT', qr/^221 /);

$c = session();
$c->send('AUTH LOGIN ' . b64('alice') . "\r\n");
is($c->reply(), "334 UGFzc3dvcmQ6\r\n", 'LOGIN initial user: Password:');
$c->send(b64('secret') . "\r\n");
is($c->reply(), $ok, 'LOGIN initial user: 235');
$c->cmd('QUIT', qr/^221 /);

$c = session();
$c->send("AUTH LOGIN\r\n");
$c->reply();
$c->send(b64('alice') . "\r\n");
$c->reply();
$c->send(b64('wrong') . "\r\n");
is($c->reply(), $bad, 'LOGIN wrong password: 535 5.7.8');
$c->cmd('QUIT', qr/^221 /);

# CRAM-MD5: {PLAIN} works, a $6$ user cannot

$c = session();
$c->send("AUTH CRAM-MD5\r\n");
my $chal = $c->reply() // '';
like($chal, qr/^334 [A-Za-z0-9+\/]+=*\r\n\z/, 'CRAM-MD5 challenge');
like(MIME::Base64::decode_base64(($chal =~ /^334 (\S+)/)[0] // ''),
    qr/^<[^>]+\@[^>]+>\z/, 'challenge is a msg-id');
$c->send(cram_md5_response('alice', 'secret', $chal) . "\r\n");
is($c->reply(), $ok, 'CRAM-MD5 {PLAIN}: 235');
$c->cmd('QUIT', qr/^221 /);

$c = session();
$c->send("AUTH CRAM-MD5\r\n");
$chal = $c->reply() // '';
$c->send(cram_md5_response('alice', 'nope', $chal) . "\r\n");
is($c->reply(), $bad, 'CRAM-MD5 wrong secret: 535');
$c->cmd('QUIT', qr/^221 /);

$c = session();
$c->send("AUTH CRAM-MD5\r\n");
$chal = $c->reply() // '';
$c->send(cram_md5_response('sha', 'pw-sha', $chal) . "\r\n");
is($c->reply(), $bad, 'CRAM-MD5 for a $6$ user: 535 5.7.8');
$c->cmd('QUIT', qr/^221 /);

# password schemes

for my $t (['sha', 'pw-sha', '$6$ (openssl passwd -6)'],
    ['yes', 'pw-yes', '$y$ yescrypt'],
    ['bcr', 'pw-bcr', '$2b$ bcrypt'],
    ['ssha', 'pw-ssha', '{SSHA}'])
{
    my ($u, $p, $what) = @$t;
    $c = session();
    $c->send('AUTH PLAIN ' . plain($u, "$p-wrong") . "\r\n");
    is($c->reply(), $bad, "$what: wrong password 535");
    $c->send('AUTH PLAIN ' . plain($u, $p) . "\r\n");
    is($c->reply(), $ok, "$what: 235");
    $c->cmd('QUIT', qr/^221 /);
}

# unknown and disabled users, empty password

$c = session();
$c->send('AUTH PLAIN ' . plain('nobody', 'x') . "\r\n");
is($c->reply(), $bad, 'unknown user: 535 5.7.8');
$c->send('AUTH PLAIN ' . plain('dis', 'pw-dis') . "\r\n");
is($c->reply(), $bad, 'disabled=1 with the right password: 535 5.7.8');
$c->send('AUTH PLAIN ' . plain('alice', '') . "\r\n");
is($c->reply(), $bad, 'empty password: 535');
$c->cmd('NOOP', qr/^250 2\.0\.0 /, 'session goes on');
$c->cmd('QUIT', qr/^221 /);

# "*" cancels; bad base64; unknown mechanism; AUTH in a transaction

$c = session();
$c->send("AUTH PLAIN\r\n");
$c->reply();
$c->send("*\r\n");
is($c->reply(), "501 5.7.0 Authentication aborted\r\n", 'PLAIN "*": 501');
$c->send("AUTH LOGIN\r\n");
$c->reply();
$c->send(b64('alice') . "\r\n");
$c->reply();
$c->send("*\r\n");
is($c->reply(), "501 5.7.0 Authentication aborted\r\n",
    'LOGIN "*" at Password: 501');
$c->cmd('AUTH PLAIN !!!notbase64', qr/^501 5\.5\.2 /, 'bad base64: 501');
$c->cmd('AUTH GSSAPI', qr/^504 5\.5\.4 /, 'unknown mechanism: 504');
$c->cmd('QUIT', qr/^221 /);

# (a new session: max_errors 5 would end the one above)

$c = session();
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
$c->cmd('AUTH PLAIN ' . plain('alice', 'secret'),
    qr/^503 5\.5\.1 AUTH not permitted during a mail transaction\r\n\z/,
    'AUTH in a transaction: 503');
$c->cmd('RSET', qr/^250 /);
$c->cmd('AUTH PLAIN ' . plain('alice', 'secret'), qr/^235 2\.7\.0 /,
    'AUTH after abort and RSET works');
$c->cmd('QUIT', qr/^221 /);

# AUTH before EHLO

$c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('AUTH PLAIN ' . plain('alice', 'secret'), qr/^503 5\.5\.1 /,
    'AUTH before EHLO: 503');
$c->cmd('QUIT', qr/^221 /);

# AUTH on a server without smtp_ext_auth

$c = session('noauth');
unlike($c->last_reply // '', qr/AUTH/, 'no smtp_ext_auth: no AUTH in EHLO');
$c->cmd('AUTH PLAIN ' . plain('alice', 'secret'),
    qr/^503 5\.5\.1 Error: authentication not enabled\r\n\z/,
    'AUTH not configured: 503');
$c->cmd('QUIT', qr/^221 /);

# after AUTH the backend's XCLIENT carries LOGIN=, xtext-encoded, and an
# unrouted recipient goes to smtp_ext_pass

$c = session();
$c->cmd('AUTH PLAIN ' . plain('joe+tag=1@ex.test', 'pw-joe'),
    qr/^235 2\.7\.0 /, 'login with + and =');
$c->cmd('MAIL FROM:<joe@ex.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<x@nowhere.test>', qr/^250 2\.1\.5 /,
    'authenticated, no route: smtp_ext_pass');
$c->cmd('DATA', qr/^354 /);
$c->send("hi\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued/);
$c->cmd('QUIT', qr/^221 /);
my $cport = $c->sock->sockport();
my $conn = $b1->connections();
ok($b1->wait_closed($conn), 'backend closed');
is($b1->raw($conn), "EHLO mx.test\r\n"
    . "XCLIENT ADDR=127.0.0.1 PORT=$cport HELO=client.test"
    . " NAME=[UNAVAILABLE] PROTO=ESMTP LOGIN=joe+2Btag+3D1\@ex.test\r\n"
    . "EHLO client.test\r\n"
    . "MAIL FROM:<joe\@ex.test>\r\nRCPT TO:<x\@nowhere.test>\r\nDATA\r\n"
    . "hi\r\n.\r\nQUIT\r\n", 'XCLIENT LOGIN= xtext');

# starttls only: no AUTH before TLS, AUTH after

$c = smtp_client('tlsonly');
$c->expect(qr/^220 /);
$ehlo = $c->ehlo() // '';
like($ehlo, qr/^250-STARTTLS\r\n/m, 'STARTTLS offered');
unlike($ehlo, qr/AUTH/, 'starttls only: no AUTH before TLS');
$c->cmd('AUTH PLAIN ' . plain('alice', 'secret'),
    qr/^530 5\.7\.0 Must issue a STARTTLS command first\r\n\z/,
    'AUTH before TLS: 530 5.7.0');
ok($c->starttls(), 'STARTTLS');
$ehlo = $c->ehlo() // '';
like($ehlo, qr/^250-AUTH PLAIN LOGIN\r\n/m, 'AUTH offered after TLS');
unlike($ehlo, qr/STARTTLS/, 'no STARTTLS in TLS');
$c->cmd('AUTH PLAIN ' . plain('alice', 'secret'), qr/^235 2\.7\.0 /,
    'AUTH after TLS: 235');
$c->cmd('MAIL FROM:<alice@ex.test>', qr/^250 2\.1\.0 /);
$c->cmd('RCPT TO:<x@nowhere.test>', qr/^250 2\.1\.5 /);
$c->cmd('QUIT', qr/^221 /);

# smtp_ext_require_auth on

$c = session('submit');
$c->cmd('MAIL FROM:<a@b.test>',
    qr/^530 5\.7\.0 Authentication required\r\n\z/, 'MAIL before AUTH: 530');
$c->cmd('AUTH PLAIN ' . plain('alice', 'secret'), qr/^235 2\.7\.0 /);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /, 'MAIL after AUTH: 250');
$c->cmd('RCPT TO:<x@nowhere.test>', qr/^250 2\.1\.5 /);
$c->cmd('QUIT', qr/^221 /);

# AUTH pipelined with the commands after it

$c = session();
$c->send('AUTH PLAIN ' . plain('alice', 'secret')
    . "\r\nMAIL FROM:<a\@b.test>\r\nRCPT TO:<x\@nowhere.test>\r\n");
is($c->reply(), $ok, 'pipelined AUTH: 235');
like($c->reply(), qr/^250 2\.1\.0 /, 'pipelined MAIL');
like($c->reply(), qr/^250 2\.1\.5 /, 'pipelined RCPT routed as authenticated');
$c->cmd('QUIT', qr/^221 /);

# nothing was logged in clear text

my $log = error_log($n);
unlike($log, qr/secret|pw-sha|pw-yes/, 'no password in the error log');
like($log, qr/authenticated as "alice"/, 'success logged');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
