#!/usr/bin/perl

# SPEC §9: smtp_ext_status in the Prometheus text format, counters summed
# over 2 workers, kept across a reload; the transaction line's to=,
# status= and reply=.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use IO::Socket::INET;
use MIME::Base64;
use SmtpExt::Test;
use SmtpExt::Redis;

require_programs(nginx_bin(), redis_bin());

my $r = start_redis();
$r->cmd('HSET', 'user:alice', 'password', '{PLAIN}secret-pw');

my $ok = start_backend(name => 'ok',
    args => ['--rcpt', 'bad@=550 5.1.1 No such user',
             '--rcpt', 'later@=450 4.2.0 Try later']);
my $rej = start_backend(name => 'brej',
    args => ['--dot-reply', '554 5.7.1 Rejected']);
my $tmp = start_backend(name => 'btmp',
    args => ['--dot-reply', '451 4.3.0 Later']);
my ($crt, $key) = gen_cert('mx.test');

my $conf = <<"EOF";
mail {
    server_name mx.test;
    smtp_ext_redis 127.0.0.1:%%PORT_redis%% timeout=2s;
    ssl_certificate $crt;
    ssl_certificate_key $key;
    smtp_ext_upstream pool1 {
        zone pool1 64k;
        server 127.0.0.1:%%PORT_ok%%;
        server 127.0.0.1:%%PORT_dead%% backup;
        health_check interval=1s;
    }
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass pool1;
        smtp_ext_auth plain login;
        smtp_ext_auth_fail_limit 1000;
        starttls on;
    }
    server {
        listen 127.0.0.1:%%PORT_rej%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_brej%%;
        smtp_ext_auth plain;
    }
    server {
        listen 127.0.0.1:%%PORT_tmp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_btmp%%;
        smtp_ext_auth plain;
    }
    server {
        listen 127.0.0.1:%%PORT_smtps%% ssl;
        protocol smtp_ext;
        smtp_ext_pass pool1;
    }
}
http {
    access_log off;
    server {
        listen 127.0.0.1:%%PORT_http%%;
        location = /metrics { smtp_ext_status; }
    }
}
EOF

my $n = start_nginx($conf, workers => 2);
my $P = sub { SmtpExt::Test::port($_[0]) };
my $L = '127.0.0.1:' . $P->('smtp');

sub scrape { http_get('http', '/metrics') }

# a strict parser: every sample's family has HELP and TYPE before it

my $NAME = qr/[a-zA-Z_:][a-zA-Z0-9_:]*/;
my $LV = qr/"(?:[^"\\\n]|\\[\\"n])*"/;
my $LABELS = qr/\{[a-zA-Z_][a-zA-Z0-9_]*=$LV(?:,[a-zA-Z_][a-zA-Z0-9_]*=$LV)*\}/;

sub parse {
    my ($text) = @_;
    my (%help, %type, %v, @err);
    push @err, 'no final newline' unless $text =~ /\n\z/;
    for my $line (split /\n/, $text) {
        if ($line =~ /^# HELP ($NAME) \S.*$/) {
            push @err, "HELP twice: $1" if $help{$1}++;
            next;
        }
        if ($line =~ /^# TYPE ($NAME) (counter|gauge|histogram)$/) {
            push @err, "TYPE twice: $1" if $type{$1};
            push @err, "TYPE before HELP: $1" unless $help{$1};
            $type{$1} = $2;
            next;
        }
        if ($line =~ /^($NAME)($LABELS)? ([0-9]+(?:\.[0-9]+)?)$/) {
            my ($name, $labels, $val) = ($1, $2 // '', $3);
            my $fam = $name;
            if (!$type{$fam}) {
                $fam =~ s/_(bucket|sum|count)$//;
                push @err, "not a histogram: $name"
                    unless ($type{$fam} // '') eq 'histogram';
            }
            push @err, "no TYPE: $name" unless $type{$fam};
            push @err, "duplicate: $name$labels"
                if exists $v{"$name$labels"};
            push @err, "client address in a label: $line"
                if $labels =~ /\@/;
            $v{"$name$labels"} = $val;
            next;
        }
        push @err, "bad line: $line";
    }
    return (\%v, \%type, \@err);
}

sub metrics {
    my $res = scrape() // '';
    my ($head, $body) = split /\r\n\r\n/, $res, 2;
    return ($head, parse($body // ''));
}

my ($head, $m0, $type, $err) = metrics();
like($head, qr{^HTTP/1\.[01] 200 }, 'status 200');
like($head, qr{\r\nContent-Type: text/plain; version=0\.0\.4\r\n}i,
    'Content-Type');
is_deeply($err, [], 'strict format');

my %families = (
    smtp_ext_connections_total => 'counter',
    smtp_ext_connections_active => 'gauge',
    smtp_ext_connections_rejected_total => 'counter',
    smtp_ext_messages_total => 'counter',
    smtp_ext_message_bytes_total => 'counter',
    smtp_ext_recipients_total => 'counter',
    smtp_ext_auth_total => 'counter',
    smtp_ext_tls_handshakes_total => 'counter',
    smtp_ext_relay_duration_seconds => 'histogram',
    smtp_ext_upstream_peer_up => 'gauge',
    smtp_ext_upstream_peer_connections_active => 'gauge',
    smtp_ext_upstream_peer_selected_total => 'counter',
    smtp_ext_upstream_peer_failures_total => 'counter',
    smtp_ext_upstream_peer_health_checks_total => 'counter',
    smtp_ext_redis_requests_total => 'counter',
    smtp_ext_redis_cache_total => 'counter',
    smtp_ext_ratelimit_total => 'counter',
    smtp_ext_build_info => 'gauge',
);
is_deeply($type, \%families, 'every family, its type, nothing else');

is($m0->{qq(smtp_ext_connections_total{listen="$L"})}, 0,
    'listen series from the start');
# the running nginx's version, as "nginx -v" says it
my ($nv) = (`@{[nginx_bin()]} -v 2>&1` // '') =~ m{nginx/(\d+\.\d+\.\d+)};
is($m0->{qq(smtp_ext_build_info{version="0.2.0",nginx="$nv"})}, 1,
    "build_info (nginx $nv)");
for my $res (qw(accepted rejected tempfailed aborted)) {
    is($m0->{qq(smtp_ext_messages_total{listen="$L",result="$res"})}, 0,
        "messages $res at 0");
}
for my $rs (qw(limit_conn ratelimit pregreet dnsbl)) {
    is($m0->{qq(smtp_ext_connections_rejected_total{listen="$L",reason="$rs"})},
        0, "rejected $rs at 0");
}
my $peer = "127.0.0.1:" . $P->('ok');
ok(exists $m0->{qq(smtp_ext_upstream_peer_up{upstream="pool1",peer="$peer"})},
    'peer series from the start');

sub delta {
    my ($a, $b, $k) = @_;
    return 'missing' unless defined $b->{$k};
    return $b->{$k} - ($a->{$k} // 0);
}

# traffic on the main listen

my $msg = "Subject: m\r\n\r\n..dot\r\nhello\r\n";
my $c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd('AUTH PLAIN ' . encode_base64("\0alice\0secret-pw", ''), qr/^235 /);
$c->cmd('MAIL FROM:<s@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<r1@d.test>', qr/^250 /);
$c->cmd('RCPT TO:<bad@d.test>', qr/^550 /);
$c->cmd('RCPT TO:<later@d.test>', qr/^450 /);
$c->cmd('DATA', qr/^354 /);
$c->send($msg . ".\r\n");
$c->expect(qr/^250 /);
# all recipients refused, then QUIT
$c->cmd('MAIL FROM:<s@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<bad@d.test>', qr/^550 /);
$c->cmd('DATA', qr/^554 /);
$c->cmd('QUIT', qr/^221 /);

# AUTH failure and LOGIN, and a client gone in DATA
$c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd('AUTH PLAIN ' . encode_base64("\0alice\0wrong-pw", ''), qr/^535 /);
$c->cmd('AUTH LOGIN', qr/^334 /);
$c->cmd(encode_base64('alice', ''), qr/^334 /);
$c->cmd(encode_base64('secret-pw', ''), qr/^235 /);
$c->cmd('MAIL FROM:<s@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<r2@d.test>', qr/^250 /);
$c->cmd('DATA', qr/^354 /);
$c->send("partial\r\n");
$c->close();

# backend 5xx and 4xx at end of data
for my $p (qw(rej tmp)) {
    $c = smtp_client($p);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO c.test', qr/^250 /m);
    # authenticated: relaying needs no accepted domain in Redis
    $c->cmd('AUTH PLAIN ' . encode_base64("\0alice\0secret-pw", ''),
        qr/^235 /);
    $c->cmd('MAIL FROM:<s@b.test>', qr/^250 /);
    $c->cmd('RCPT TO:<x@d.test>', qr/^250 /);
    $c->cmd('DATA', qr/^354 /);
    $c->send("x\r\n.\r\n");
    $c->expect($p eq 'rej' ? qr/^554 / : qr/^451 /);
    $c->cmd('QUIT', qr/^221 /);
}

# TLS: STARTTLS ok; a failed handshake on the ssl port
$c = smtp_client('smtp');
$c->expect(qr/^220 /);
$c->cmd('EHLO c.test', qr/^250 /m);
ok($c->starttls(), 'STARTTLS');
$c->cmd('EHLO c.test', qr/^250 /m);
$c->cmd('QUIT', qr/^221 /);
my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
    PeerPort => $P->('smtps')) or die;
print $s "not a TLS hello\r\n" x 4;
sleep 1;
close $s;

ok(wait_for(sub {
    my (undef, $m) = metrics();
    ($m->{qq(smtp_ext_connections_active{listen="$L"})} // 1) == 0
}), 'connections_active back to 0');

my ($h1, $m1, $t1, $e1) = metrics();
is_deeply($e1, [], 'strict format after traffic');

my $LR = '127.0.0.1:' . $P->('rej');
my $LT = '127.0.0.1:' . $P->('tmp');
my $LS = '127.0.0.1:' . $P->('smtps');
my %want = (
    qq(smtp_ext_connections_total{listen="$L"}) => 3,
    qq(smtp_ext_messages_total{listen="$L",result="accepted"}) => 1,
    qq(smtp_ext_messages_total{listen="$L",result="aborted"}) => 1,
    qq(smtp_ext_messages_total{listen="$L",result="rejected"}) => 0,
    qq(smtp_ext_message_bytes_total{listen="$L"}) => length($msg) - 1,
    qq(smtp_ext_recipients_total{listen="$L",result="accepted"}) => 2,
    qq(smtp_ext_recipients_total{listen="$L",result="rejected"}) => 2,
    qq(smtp_ext_recipients_total{listen="$L",result="tempfailed"}) => 1,
    qq(smtp_ext_auth_total{listen="$L",mechanism="plain",result="success"})
        => 1,
    qq(smtp_ext_auth_total{listen="$L",mechanism="plain",result="failure"})
        => 1,
    qq(smtp_ext_auth_total{listen="$L",mechanism="login",result="success"})
        => 1,
    qq(smtp_ext_tls_handshakes_total{listen="$L",result="ok"}) => 1,
    qq(smtp_ext_tls_handshakes_total{listen="$L",result="failed"}) => 0,
    qq(smtp_ext_relay_duration_seconds_count{listen="$L"}) => 1,
    qq(smtp_ext_messages_total{listen="$LR",result="rejected"}) => 1,
    qq(smtp_ext_auth_total{listen="$LR",mechanism="plain",result="success"})
        => 1,
    qq(smtp_ext_messages_total{listen="$LT",result="tempfailed"}) => 1,
    qq(smtp_ext_relay_duration_seconds_count{listen="$LT"}) => 1,
    qq(smtp_ext_tls_handshakes_total{listen="$LS",result="failed"}) => 1,
    qq(smtp_ext_connections_total{listen="$LS"}) => 1,
);
for my $k (sort keys %want) {
    is(delta($m0, $m1, $k), $want{$k}, "delta $k");
}
cmp_ok(delta($m0, $m1, q(smtp_ext_redis_requests_total{result="ok"})),
    '>=', 3, 'redis requests ok');

# histogram invariants
for my $l ($L, $LT) {
    my $prev = 0;
    for my $le (qw(0.005 0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5 10 +Inf)) {
        my $v = $m1->{qq(smtp_ext_relay_duration_seconds_bucket)
                      . qq({listen="$l",le="$le"})};
        ok(defined $v && $v >= $prev, "$l bucket $le cumulative") or last;
        $prev = $v;
    }
    is($prev, $m1->{qq(smtp_ext_relay_duration_seconds_count{listen="$l"})},
        '+Inf equals _count');
    ok(exists $m1->{qq(smtp_ext_relay_duration_seconds_sum{listen="$l"})},
        '_sum');
}

# peers: the dead backup fails its health checks, the primary passes
my $d = "127.0.0.1:" . $P->('dead');
ok(wait_for(sub {
    my (undef, $m) = metrics();
    my $hc = 'smtp_ext_upstream_peer_health_checks_total';
    ($m->{qq(smtp_ext_upstream_peer_up{upstream="pool1",peer="$d"})} // 1)
        == 0
    && ($m->{qq($hc\{upstream="pool1",peer="$d",result="failed"})} // 0) >= 1
    && ($m->{qq($hc\{upstream="pool1",peer="$peer",result="ok"})} // 0) >= 1
    && ($m->{qq(smtp_ext_upstream_peer_up{upstream="pool1",peer="$peer"})}
        // 0) == 1
}, 10), 'peer up, health checks');
cmp_ok($m1->{qq(smtp_ext_upstream_peer_selected_total)
             . qq({upstream="pool1",peer="$peer"})}, '>=', 2,
    'peer selected');
is($m1->{qq(smtp_ext_upstream_peer_connections_active)
         . qq({upstream="pool1",peer="$peer"})}, 0,
    'peer connections back to 0');

# the log lines
my @tx = grep { /\bstatus=/ } split /\n/, error_log($n);
ok((grep { /to=<r1\@d\.test> .*status=sent reply=250/ } @tx),
    'sent, to= the accepted recipient') or diag(join "\n", @tx);
ok((grep { /rcpts=0 to= .*status=rejected reply=554/ } @tx),
    'all refused: rejected, reply 554');
ok((grep { /to=<r2\@d\.test> .*status=aborted/ } @tx), 'aborted in DATA');
ok((grep { /status=rejected reply=554/ && /backend=127\.0\.0\.1:\d+/ } @tx),
    'backend 5xx: rejected');
ok((grep { /status=deferred reply=451/ } @tx), 'backend 4xx: deferred');

# a reload keeps the counters
$n->reload($conf, workers => 2);
ok(wait_for(sub { error_log($n) =~ /gracefully shutting down/ }, 10),
    'reloaded');
my ($h2, $m2) = metrics();
is($m2->{qq(smtp_ext_messages_total{listen="$L",result="accepted"})},
    $m1->{qq(smtp_ext_messages_total{listen="$L",result="accepted"})},
    'counters survive a reload');
is($m2->{qq(smtp_ext_connections_total{listen="$L"})},
    $m1->{qq(smtp_ext_connections_total{listen="$L"})},
    'connections_total survives a reload');
is($m2->{qq(smtp_ext_connections_active{listen="$L"})}, 0,
    'active still 0 after reload');

done_testing();
