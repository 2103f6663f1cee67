#!/usr/bin/perl

# Verified TLS towards the backends (SPEC §8): smtp_ext_upstream_tls_verify,
# _trusted_certificate, _name, _server_name, _certificate(_key),
# _session_reuse, with a test CA made here.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin(), 'openssl');

my $d = testdir();

sub openssl {
    my @args = @_;
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>>', "$d/openssl.log";
        open STDERR, '>>', "$d/openssl.log";
        exec('openssl', @args) or POSIX::_exit(127);
    }
    waitpid($pid, 0);
    die "openssl @args failed:\n" . (read_file("$d/openssl.log") // '')
        if $?;
}

my @ec = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes');

# a CA, and certificates it signs: NAME, subject CN, extensions
openssl('req', '-x509', @ec, '-keyout', "$d/ca.key", '-out', "$d/ca.crt",
    '-subj', '/CN=smtp-ext test CA', '-days', '2', '-batch');

sub signed {
    my ($name, $cn, $ext) = @_;
    write_file("$d/$name.ext", "$ext\n");
    openssl('req', '-new', @ec, '-keyout', "$d/$name.key",
        '-out', "$d/$name.csr", '-subj', "/CN=$cn", '-batch');
    openssl('x509', '-req', '-in', "$d/$name.csr", '-CA', "$d/ca.crt",
        '-CAkey', "$d/ca.key", '-CAcreateserial', '-days', '2',
        '-out', "$d/$name.crt", '-extfile', "$d/$name.ext");
    return "$d/$name.crt,$d/$name.key";
}

# for 127.0.0.1 by IP SAN only (its CN is a DNS name: no CN fallback)
my $ip = signed('ip', 'ip.backend.test', 'subjectAltName=IP:127.0.0.1');
# a DNS name only; its CN is the address, which must not count as one
my $dns = signed('dns', '127.0.0.1', 'subjectAltName=DNS:mx1.backend.test');
my $client = signed('client', 'nginx-client',
    "extendedKeyUsage=clientAuth");

# self-signed, for 127.0.0.1: only the chain is wrong
openssl('req', '-x509', @ec, '-keyout', "$d/self.key",
    '-out', "$d/self.crt", '-subj', '/CN=self.backend.test', '-days', '2',
    '-addext', 'subjectAltName=IP:127.0.0.1', '-batch');
my $self = "$d/self.crt,$d/self.key";

my $caps = 'PIPELINING,ENHANCEDSTATUSCODES';

my %b;
$b{ip} = start_backend(name => 'ip',
    args => ['--caps', $caps, '--tls', $ip, '--tls-info']);
$b{dns} = start_backend(name => 'dns',
    args => ['--caps', $caps, '--tls', $dns, '--tls-info']);
$b{self} = start_backend(name => 'self',
    args => ['--caps', $caps, '--tls', $self]);
$b{mtls} = start_backend(name => 'mtls',
    args => ['--caps', $caps, '--tls', $ip, '--tls-client-ca',
        "$d/ca.crt", '--tls-info']);
$b{noreuse} = start_backend(name => 'noreuse',
    args => ['--caps', $caps, '--tls', $ip, '--tls-info']);

# verification set on the mail level, inherited by every server
my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;

    smtp_ext_upstream_tls_verify on;
    smtp_ext_upstream_tls_trusted_certificate $d/ca.crt;

    smtp_ext_upstream next {
        server 127.0.0.1:%%PORT_self%%;
        server 127.0.0.1:%%PORT_ip%% backup;
    }

    server {
        listen 127.0.0.1:%%PORT_s_ok%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_ip%%;
        smtp_ext_upstream_tls required;
        smtp_ext_upstream_tls_server_name on;
    }
    server {
        listen 127.0.0.1:%%PORT_s_self%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_self%%;
        smtp_ext_upstream_tls required;
    }
    server {
        listen 127.0.0.1:%%PORT_s_opp_self%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_self%%;
        smtp_ext_upstream_tls on;
    }
    server {
        listen 127.0.0.1:%%PORT_s_next%%;
        protocol smtp_ext;
        smtp_ext_pass next;
        smtp_ext_upstream_tls required;
    }
    server {
        listen 127.0.0.1:%%PORT_s_wrong%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_ip%%;
        smtp_ext_upstream_tls required;
        smtp_ext_upstream_tls_name wrong.backend.test;
    }
    server {
        listen 127.0.0.1:%%PORT_s_dns_ip%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_dns%%;
        smtp_ext_upstream_tls required;
    }
    server {
        listen 127.0.0.1:%%PORT_s_sni%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_dns%%;
        smtp_ext_upstream_tls required;
        smtp_ext_upstream_tls_name mx1.backend.test;
        smtp_ext_upstream_tls_server_name on;
    }
    server {
        listen 127.0.0.1:%%PORT_s_nosni%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_dns%%;
        smtp_ext_upstream_tls required;
        smtp_ext_upstream_tls_name mx1.backend.test;
    }
    server {
        listen 127.0.0.1:%%PORT_s_mtls%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_mtls%%;
        smtp_ext_upstream_tls required;
        smtp_ext_upstream_tls_certificate $d/client.crt;
        smtp_ext_upstream_tls_certificate_key $d/client.key;
    }
    server {
        listen 127.0.0.1:%%PORT_s_nocert%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_mtls%%;
        smtp_ext_upstream_tls required;
    }
    server {
        listen 127.0.0.1:%%PORT_s_noreuse%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_noreuse%%;
        smtp_ext_upstream_tls required;
        smtp_ext_upstream_tls_session_reuse off;
    }
}
EOF

my $tail = "MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\nDATA\r\n"
    . "hi\r\n.\r\nQUIT\r\n";

# a whole transaction: true when the message was acknowledged
sub deliver {
    my ($port, $name) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /, "$name: RCPT");
    $c->cmd('DATA', qr/^354 /);
    $c->send("hi\r\n.\r\n");
    $c->expect(qr/^250 2\.0\.0 Ok: queued/, "$name: message relayed");
    $c->cmd('QUIT', qr/^221 /);
}

# the backend must not be used: 451 4.4.1 at RCPT
sub refused {
    my ($port, $name) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^451 4\.4\.1 /, "$name: 451 4.4.1");
    $c->cmd('QUIT', qr/^221 /);
}

# the notes of connection N of a backend
sub notes {
    my ($b, $k) = @_;
    my %n;
    for (split /\n/, $b->log($k) // '') {
        $n{$1} = $2 if /^\* tls (sni|client|reused) (.*)$/;
    }
    return \%n;
}

my %seen = map { $_ => 0 } keys %b;

sub conn {
    my ($name) = @_;
    my $k = ++$seen{$name};
    ok($b{$name}->wait_closed($k), "$name: connection $k over");
    return $k;
}

my $port_of = sub { $b{ $_[0] }->port };

# verify OK: chain to our CA, 127.0.0.1 matched by IP SAN; an address is
# never sent as SNI, even with server_name on

deliver('s_ok', 'IP SAN');
my $k = conn('ip');
is($b{ip}->raw($k), "EHLO mx.test\r\nSTARTTLS\r\nEHLO mx.test\r\n" . $tail,
    'IP SAN: transaction inside TLS');
is(notes($b{ip}, $k)->{sni}, '-', 'IP SAN: no SNI for an address');
is(notes($b{ip}, $k)->{reused}, '0', 'first session: full handshake');

# session reuse (default on): the next connection resumes

deliver('s_ok', 'again');
$k = conn('ip');
is(notes($b{ip}, $k)->{reused}, '1', 'session_reuse on: session resumed');

# untrusted chain, one peer: 451, logged with OpenSSL's reason, never
# plaintext with it

refused('s_self', 'self-signed');
$k = conn('self');
is($b{self}->raw($k), "EHLO mx.test\r\nSTARTTLS\r\n",
    'self-signed: nothing after STARTTLS');
my $p = $port_of->('self');
my $why = qr/TLS certificate verify error: \(18:self.signed certificate\)/;
like($n->error_log(), qr/\[error\] .*smtp_ext: backend 127\.0\.0\.1:$p $why/,
    'self-signed: error log names the verification error');

# "on" (opportunistic) does not mean "unverified": the same failure

refused('s_opp_self', 'opportunistic, self-signed');
$k = conn('self');
is($b{self}->raw($k), "EHLO mx.test\r\nSTARTTLS\r\n",
    'opportunistic: no plaintext fall-back after a failed verification');

# untrusted chain in a pool: the next peer (here the backup) takes it

deliver('s_next', 'next peer');
$k = conn('self');
is($b{self}->raw($k), "EHLO mx.test\r\nSTARTTLS\r\n",
    'next peer: the failing one got no envelope');
$k = conn('ip');
is($b{ip}->raw($k), "EHLO mx.test\r\nSTARTTLS\r\nEHLO mx.test\r\n" . $tail,
    'next peer: the message went to the verified backend');

# a name that is not in the certificate

refused('s_wrong', 'wrong name');
$k = conn('ip');
is($b{ip}->raw($k), "EHLO mx.test\r\nSTARTTLS\r\n",
    'wrong name: nothing after STARTTLS');
$p = $port_of->('ip');
$why = qr/TLS certificate does not match "wrong\.backend\.test"/;
like($n->error_log(), qr/\[error\] .*backend 127\.0\.0\.1:$p $why/,
    'wrong name: logged');

# the default name is the address: only an IP SAN matches it, not a CN

refused('s_dns_ip', 'address against a DNS-only certificate');
$k = conn('dns');
$p = $port_of->('dns');
$why = qr/TLS certificate does not match "127\.0\.0\.1"/;
like($n->error_log(), qr/\[error\] .*backend 127\.0\.0\.1:$p $why/,
    'address name: CN not taken for it');

# a DNS name from tls_name, sent as SNI with server_name on

deliver('s_sni', 'DNS SAN');
$k = conn('dns');
is(notes($b{dns}, $k)->{sni}, 'mx1.backend.test', 'SNI sent');
is($b{dns}->raw($k), "EHLO mx.test\r\nSTARTTLS\r\nEHLO mx.test\r\n" . $tail,
    'DNS SAN: transaction inside TLS');

deliver('s_nosni', 'DNS SAN, server_name off');
$k = conn('dns');
is(notes($b{dns}, $k)->{sni}, '-', 'server_name off: no SNI');

# client certificate: a backend that requires one

deliver('s_mtls', 'client certificate');
$k = conn('mtls');
is(notes($b{mtls}, $k)->{client}, '/CN=nginx-client',
    'the backend saw our client certificate');

refused('s_nocert', 'no client certificate');
$k = conn('mtls');
like($b{mtls}->log($k), qr/^\* tls failed/m,
    'without a client certificate the backend refused the handshake');
unlike($b{mtls}->raw($k), qr/MAIL/, 'and got no envelope');

# session_reuse off: every connection a full handshake

deliver('s_noreuse', 'no reuse 1');
deliver('s_noreuse', 'no reuse 2');
conn('noreuse');
$k = conn('noreuse');
is(notes($b{noreuse}, $k)->{reused}, '0', 'session_reuse off: not resumed');

$n->stop();

# With TLS 1.3 the backend refuses a missing client certificate only
# after our side of the handshake is done: nginx 1.22 logs that alert
# (116) at "crit" in SSL_read(); anything else is a real alert.
my @bad = grep { /\[(alert|emerg|crit)\]|signal 11|exited on signal/
    && !/SSL_read\(\) failed .*alert certificate required/ }
    split /\n/, $n->error_log();
is(join("\n", @bad), '', 'no alerts');

# nginx -t

my ($rc, $out) = nginx_t(<<'EOF');
mail {
    server {
        listen 127.0.0.1:%%PORT_t1%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:25;
        smtp_ext_upstream_tls required;
        smtp_ext_upstream_tls_verify on;
    }
}
EOF
isnt($rc, 0, 'nginx -t: verify without a trusted certificate fails');
like($out, qr/no "smtp_ext_upstream_tls_trusted_certificate" for "smtp_ext/,
    'and says why');

($rc, $out) = nginx_t(<<"EOF");
mail {
    smtp_ext_upstream_tls_certificate $d/client.crt;
    server {
        listen 127.0.0.1:%%PORT_t1%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:25;
        smtp_ext_upstream_tls on;
    }
}
EOF
isnt($rc, 0, 'nginx -t: certificate without a key fails');
like($out, qr/no "smtp_ext_upstream_tls_certificate_key" is defined/,
    'and says why');

($rc, $out) = nginx_t(<<"EOF");
mail {
    smtp_ext_upstream_tls_verify on;
    smtp_ext_upstream_tls_trusted_certificate $d/ca.crt;
    smtp_ext_upstream_tls_verify_depth 2;
    smtp_ext_upstream_tls_protocols TLSv1.2 TLSv1.3;
    smtp_ext_upstream_tls_ciphers HIGH:!aNULL;
    smtp_ext_upstream_tls_name mx1.backend.test;
    smtp_ext_upstream_tls_server_name on;
    smtp_ext_upstream_tls_certificate $d/client.crt;
    smtp_ext_upstream_tls_certificate_key $d/client.key;
    smtp_ext_upstream_tls_session_reuse off;
    server {
        listen 127.0.0.1:%%PORT_t1%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:25;
        smtp_ext_upstream_tls on;
    }
}
EOF
is($rc, 0, 'nginx -t: every directive on the mail level') or diag($out);

done_testing();
