#!/usr/bin/perl

# Break attempts on SPEC 9 metrics: relay_duration observed once per end
# of data with a final backend reply (two messages in a session, BDAT in
# chunks, a backend that closes at end of data), a "listen ... ssl" with
# a good handshake, gauges back to 0, strict format under concurrent
# scrapes during traffic.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use IO::Socket::INET;
use IO::Select;
use POSIX ();
use SmtpExt::Test;

require_programs(nginx_bin());

start_backend(name => 'ok');
start_backend(name => 'dies', args => ['--close-at', 'dot']);
my ($crt, $key) = gen_cert('mx.test');

my $conf = <<"EOF2";
mail {
    server_name mx.test;
    ssl_certificate $crt;
    ssl_certificate_key $key;
    smtp_ext_upstream "p\\"q\\\\r" {
        zone pq 64k;
        server 127.0.0.1:%%PORT_ok%%;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass "p\\"q\\\\r";
    }
    server {
        listen 127.0.0.1:%%PORT_die%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_dies%%;
    }
    server {
        listen 127.0.0.1:%%PORT_smtps%% ssl;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_ok%%;
    }
}
http {
    access_log off;
    server {
        listen 127.0.0.1:%%PORT_http%%;
        location = /metrics { smtp_ext_status; }
    }
}
EOF2

my $n = start_nginx($conf, workers => 2);
my $P = sub { SmtpExt::Test::port($_[0]) };
my ($L, $LD, $LS) = map { '127.0.0.1:' . $P->($_) } qw(smtp die smtps);

my $NAME = qr/[a-zA-Z_:][a-zA-Z0-9_:]*/;
my $LV = qr/"(?:[^"\\\n]|\\[\\"n])*"/;
my $LABELS = qr/\{[a-zA-Z_][a-zA-Z0-9_]*=$LV(?:,[a-zA-Z_][a-zA-Z0-9_]*=$LV)*\}/;

sub parse {
    my ($res) = @_;
    my (%v, @err, %help, %type);
    my ($head, $text) = split /\r\n\r\n/, $res // '', 2;
    push @err, 'no 200' unless ($head // '') =~ m{^HTTP/1\.[01] 200 };
    $text //= '';
    push @err, 'no final newline' unless $text =~ /\n\z/;
    for my $line (split /\n/, $text) {
        if ($line =~ /^# HELP ($NAME) \S/) { $help{$1}++; next }
        if ($line =~ /^# TYPE ($NAME) (counter|gauge|histogram)$/) {
            push @err, "TYPE before HELP $1" unless $help{$1};
            $type{$1} = $2; next;
        }
        if ($line =~ /^($NAME)($LABELS)? ([0-9]+(?:\.[0-9]+)?)$/) {
            push @err, "dup $1$2" if exists $v{$1 . ($2 // '')};
            $v{$1 . ($2 // '')} = $3; next;
        }
        push @err, "bad line: $line";
    }
    return (\%v, \@err);
}

sub scrape { http_get('http', '/metrics') }

my ($m0, $e0) = parse(scrape());
is_deeply($e0, [], 'strict format with an escaped pool name');
my $UP = 'p\\"q\\\\r';
my $peer = '127.0.0.1:' . $P->('ok');
ok(exists $m0->{qq(smtp_ext_upstream_peer_up{upstream="$UP",peer="$peer"})},
    'pool name escaped in the label') or diag(join "\n",
    grep { /peer_up/ } keys %$m0);

# two messages in one session, then BDAT in three chunks
my $c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
for my $i (1, 2) {
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    $c->cmd("RCPT TO:<r$i\@d.test>", qr/^250 /);
    $c->cmd('DATA', qr/^354 /);
    $c->send("m$i\r\n.\r\n");
    $c->expect(qr/^250 /);
}
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<r3@d.test>', qr/^250 /);
$c->send("BDAT 4\r\nab\r\n");
$c->expect(qr/^250 /);
$c->send("BDAT 4\r\ncd\r\n");
$c->expect(qr/^250 /);
$c->send("BDAT 4 LAST\r\nef\r\n");
$c->expect(qr/^250 /);
$c->cmd('QUIT', qr/^221 /);

# a backend that closes instead of answering the end of data
$c = smtp_client('die');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<r@d.test>', qr/^250 /);
$c->cmd('DATA', qr/^354 /);
$c->send("x\r\n.\r\n");
$c->expect(qr/^4\d\d /);
$c->close();

# listen ... ssl: a good handshake and a message
$c = smtp_client('smtps');
ok($c->start_ssl(), 'TLS on the ssl listen');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<r@d.test>', qr/^250 /);
$c->cmd('DATA', qr/^354 /);
$c->send("s\r\n.\r\n");
$c->expect(qr/^250 /);
$c->cmd('QUIT', qr/^221 /);
$c->close();

# concurrent scrapes while sessions run
my @bad;
my $pid = fork();
if ($pid == 0) {
    for (1 .. 20) {
        my $cc = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $P->('smtp'), Timeout => 5) or next;
        my $g = <$cc>;
        print $cc "QUIT\r\n";
        my $q = <$cc>;
        close $cc;
    }
    POSIX::_exit(0);
}
for (1 .. 10) {
    my @s = map {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $P->('http'), Timeout => 5);
        print $s "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n" if $s;
        $s } 1 .. 8;
    for my $s (grep { $_ } @s) {
        local $/;
        my (undef, $e) = parse(<$s> // '');
        push @bad, @$e;
    }
}
waitpid($pid, 0);
is_deeply([@bad[0 .. ($#bad < 4 ? $#bad : 4)]], [],
    'concurrent scrapes: strict format');

my $m;
ok(wait_for(sub {
    ($m) = parse(scrape());
    !grep { ($m->{qq(smtp_ext_connections_active{listen="$_"})} // 1) != 0 }
        ($L, $LD, $LS);
}, 5), 'connections_active back to 0 on every listen')
    or diag(join "\n", map { "$_ $m->{$_}" }
        grep { /connections_active/ } sort keys %$m);

my %want = (
    qq(smtp_ext_relay_duration_seconds_count{listen="$L"}) => 3,
    qq(smtp_ext_messages_total{listen="$L",result="accepted"}) => 3,
    qq(smtp_ext_message_bytes_total{listen="$L"}) => 4 + 4 + 12,
    qq(smtp_ext_relay_duration_seconds_count{listen="$LD"}) => 0,
    qq(smtp_ext_tls_handshakes_total{listen="$LS",result="ok"}) => 1,
    qq(smtp_ext_tls_handshakes_total{listen="$LS",result="failed"}) => 0,
    qq(smtp_ext_connections_total{listen="$LS"}) => 1,
    qq(smtp_ext_messages_total{listen="$LS",result="accepted"}) => 1,
    qq(smtp_ext_relay_duration_seconds_count{listen="$LS"}) => 1,
    qq(smtp_ext_connections_total{listen="$L"}) => 21,
    qq(smtp_ext_upstream_peer_connections_active)
        . qq({upstream="$UP",peer="$peer"}) => 0,
);
for my $k (sort keys %want) {
    is(defined $m->{$k} ? $m->{$k} - ($m0->{$k} // 0) : 'missing',
        $want{$k}, $k);
}
ok(error_log_clean($n), 'no alert/crash');

done_testing();
