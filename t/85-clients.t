#!/usr/bin/perl

# Real clients end to end: swaks, curl, Net::SMTP, and smtp-source through
# nginx to smtp-sink.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;
use Net::SMTP;

require_programs(nginx_bin(), 'swaks', 'curl', 'openssl',
    '/usr/sbin/smtp-sink', '/usr/sbin/smtp-source');

my ($crt, $key) = gen_cert('mx.test');
my $b = start_backend(name => 'b1');
my $sink = start_smtp_sink(name => 'sink');

my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;
    ssl_certificate $crt;
    ssl_certificate_key $key;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        starttls on;
    }
    server {
        listen 127.0.0.1:%%PORT_s_sink%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_sink%%;
    }
}
EOF

my $port = SmtpExt::Test::port('smtp');
my $dir = testdir();

sub run {
    my (@cmd) = @_;
    my $pid = open(my $fh, '-|');
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDERR, '>&', \*STDOUT;
        exec(@cmd) or POSIX::_exit(127);
    }
    local $/;
    my $out = <$fh>;
    close $fh;
    return ($? >> 8, $out);
}

my $count = 0;

# swaks, plain and with STARTTLS

my ($rc, $out) = run('swaks', '--server', "127.0.0.1:$port",
    '--from', 'a@b.test', '--to', 'c@d.test', '--helo', 'swaks.test',
    '--header', 'Subject: swaks test', '--body', 'swaks body',
    '--timeout', '10');
is($rc, 0, 'swaks exit code') or diag($out);
like($out, qr/<[-~]  250 2\.0\.0 Ok: queued as/, 'swaks: queued');
$count++;

($rc, $out) = run('swaks', '--server', "127.0.0.1:$port", '--tls',
    '--from', 'a@b.test', '--to', 'c@d.test,e@d.test',
    '--helo', 'swaks.test', '--body', 'swaks tls body', '--timeout', '10');
is($rc, 0, 'swaks --tls exit code') or diag($out);
$count++;

($rc, $out) = run('swaks', '--server', "127.0.0.1:$port", '--pipeline',
    '--from', 'a@b.test', '--to', 'c@d.test', '--helo', 'swaks.test',
    '--body', 'swaks pipeline body', '--timeout', '10');
is($rc, 0, 'swaks --pipeline exit code') or diag($out);
$count++;

# curl

my $file = "$dir/curl.eml";
write_file($file, "From: a\@b.test\r\nTo: c\@d.test\r\nSubject: curl\r\n"
    . "\r\ncurl body\r\n.leading dot\r\n");
($rc, $out) = run('curl', '-sS', '--max-time', '10',
    "smtp://127.0.0.1:$port/curl.test", '--mail-from', 'a@b.test',
    '--mail-rcpt', 'c@d.test', '--upload-file', $file);
is($rc, 0, 'curl exit code') or diag($out);
$count++;

($rc, $out) = run('curl', '-sS', '--max-time', '10', '--ssl-reqd', '-k',
    "smtp://127.0.0.1:$port/curl.test", '--mail-from', 'a@b.test',
    '--mail-rcpt', 'c@d.test', '--upload-file', $file);
is($rc, 0, 'curl STARTTLS exit code') or diag($out);
$count++;

# Net::SMTP

my $smtp = Net::SMTP->new('127.0.0.1', Port => $port, Hello => 'net.test',
    Timeout => 10);
ok($smtp, 'Net::SMTP connected');
SKIP: {
    skip 'Net::SMTP could not connect', 6 unless $smtp;
    ok($smtp->mail('a@b.test'), 'Net::SMTP mail');
    ok($smtp->to('c@d.test'), 'Net::SMTP to');
    ok($smtp->data(), 'Net::SMTP data');
    $smtp->datasend("Subject: Net::SMTP\n\n.dot line\nbody\n");
    ok($smtp->dataend(), 'Net::SMTP dataend');
    like($smtp->message(), qr/Ok: queued as/, 'Net::SMTP queued');
    ok($smtp->quit(), 'Net::SMTP quit');
}
$count++;

ok(wait_for(sub { scalar($b->messages) == $count }), "$count messages");
my @m = $b->messages;
like($m[0], qr/^Subject: swaks test\r$/m, 'swaks message');
like($m[3], qr/\r\n\.\.leading dot\r\n\z/, 'curl message dot-stuffed');
like($m[5], qr/\r\n\.\.dot line\r\nbody\r\n\z/, 'Net::SMTP message');

# smtp-source -> nginx -> smtp-sink

my $sport = SmtpExt::Test::port('s_sink');
($rc, $out) = run('/usr/sbin/smtp-source', '-s', '4', '-m', '20',
    '-f', 'a@b.test', '-t', 'c@d.test', "127.0.0.1:$sport");
is($rc, 0, 'smtp-source exit code') or diag($out);
ok(wait_for(sub { $sink->messages_count == 20 }), 'smtp-sink got 20 messages')
    or diag('got ' . $sink->messages_count);

($rc, $out) = run('/usr/sbin/smtp-source', '-s', '2', '-m', '6', '-d',
    '-f', 'a@b.test', '-t', 'c@d.test', "127.0.0.1:$sport");
is($rc, 0, 'smtp-source -d exit code') or diag($out);
ok(wait_for(sub { $sink->messages_count == 26 }), 'smtp-sink got 26 messages')
    or diag('got ' . $sink->messages_count);

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
