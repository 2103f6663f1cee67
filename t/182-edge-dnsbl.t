#!/usr/bin/perl

# smtp_ext_dnsbl and smtp_ext_dnsbl_threshold (SPEC §10): listings through
# the mail resolver (t/bin/dns-server.pl), answer filters, weights, the
# zone named in the reply, timeouts and failures as "not listed", lookups
# in parallel with each other and with the greeting delay, the server's
# list replacing the mail-level one, exempt clients, nginx -t.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);
use SmtpExt::Test;

require_programs(nginx_bin());

my @dns;

sub start_dns {
    my (@args) = @_;
    my $dir = testdir() . "/dns";
    mkdir $dir or die "$dir: $!";
    my $pidfile = "$dir/pid";
    my $p = port('dns');
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', "$dir/stdout.log";
        open STDERR, '>', "$dir/stderr.log";
        exec($^X, 't/bin/dns-server.pl', '--port', $p,
            '--pidfile', $pidfile, '--log', "$dir/queries.log", @args)
            or POSIX::_exit(127);
    }
    push @dns, $pid;
    my $ok = wait_for(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        return -e $pidfile ? 1 : 0;
    }, 10);
    die "dns server did not start\n" unless $ok == 1;
    return $dir;
}

END {
    local $?;
    for my $pid (@dns) {
        kill 'TERM', $pid;
        waitpid($pid, 0);
    }
}

my $dns = start_dns(
    # 127.0.0.2: bl1 (late) and bl2
    '--a', '2.0.0.127.bl1.test=127.0.0.2',
    '--delay', '2.0.0.127.bl1.test=300',
    '--a', '2.0.0.127.bl2.test=127.0.0.4',
    # 127.0.0.3: answers that do not count
    '--a', '3.0.0.127.bl1.test=10.0.0.1',
    '--a', '3.0.0.127.bl2.test=127.0.0.10',
    # weights
    '--a', '5.0.0.127.w1.test=127.0.0.2',
    '--a', '6.0.0.127.w1.test=127.0.0.2',
    '--a', '6.0.0.127.w2.test=127.0.0.2',
    '--a', '7.0.0.127.w2.test=127.0.0.2',
    '--a', '7.0.0.127.w3.test=127.0.0.2',
    # failures and timing
    '--drop', '2.0.0.127.slow.test',
    '--servfail', '3.0.0.127.slow.test',
    '--delay', '5.0.0.127.slow.test=800',
    '--a', '6.0.0.127.slow.test=127.0.0.2',
    '--delay', '6.0.0.127.slow.test=500',
);

my $b1 = start_backend(name => 'b1');

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    resolver 127.0.0.1:%%PORT_dns%% ipv6=off;
    resolver_timeout 1s;
    smtp_ext_dnsbl bl1.test bl2.test=127.0.0.4,127.0.0.5;
    smtp_ext_limit_exempt 127.0.0.4;

    server {
        listen 127.0.0.1:%%PORT_a%%;
        protocol smtp_ext;
    }
    server {
        listen 127.0.0.1:%%PORT_w%%;
        protocol smtp_ext;
        smtp_ext_dnsbl w1.test*2 w2.test w3.test;
        smtp_ext_dnsbl_threshold 3;
    }
    server {
        listen 127.0.0.1:%%PORT_slow%%;
        protocol smtp_ext;
        smtp_ext_dnsbl slow.test;
        smtp_ext_greeting_delay 1s;
    }
    server {
        listen 127.0.0.1:%%PORT_d%%;
        protocol smtp_ext;
        smtp_ext_dnsbl bl2.test=127.0.0.99;
    }
}
EOF

my $greeting = qr/^220 mx\.test ESMTP\r\n\z/;

sub blocked {
    my ($addr, $zone) = @_;
    return "554 5.7.1 Service unavailable; client [$addr] blocked using "
        . "$zone\r\n";
}

sub try {
    my ($port, $local) = @_;
    my $c = smtp_client($port, local => $local);
    my $t0 = time;
    my $r = $c->reply(5);
    return ($r, time - $t0, $c);
}

# listed in both; bl2 answers first, the reply names bl1 (directive order)
my ($r, $t, $c) = try('a', '127.0.0.2');
is($r, blocked('127.0.0.2', 'bl1.test'), 'listed: the first zone named');
ok(!defined $c->reply(2), 'then closed');

($r, $t) = try('a', '127.0.0.3');
like($r, $greeting, 'answers outside the filter or 127/8 do not count');

($r, $t) = try('a', '127.0.0.4');
like($r, $greeting, 'exempt client greeted');

# weights: w1*2 alone (2) < 3; w1 + w2 = 3; w2 + w3 = 2
($r) = try('w', '127.0.0.5');
like($r, $greeting, 'weight 2 under threshold 3');
($r) = try('w', '127.0.0.6');
is($r, blocked('127.0.0.6', 'w1.test'), 'weights 2 + 1 reach 3');
($r) = try('w', '127.0.0.7');
like($r, $greeting, 'weights 1 + 1 under 3');

# the server's own list replaces the mail-level one
($r) = try('d', '127.0.0.2');
like($r, $greeting, 'server-level list: bl1 not used, bl2 filtered');

# a timeout and SERVFAIL are "not listed"; the delay runs alongside
($r, $t) = try('slow', '127.0.0.2');
like($r, $greeting, 'no answer: not listed');
ok($t >= 0.9 && $t < 1.8, "resolver_timeout 1s alongside the 1s delay ($t)");

($r, $t) = try('slow', '127.0.0.3');
like($r, $greeting, 'SERVFAIL: not listed');

($r, $t) = try('slow', '127.0.0.5');
like($r, $greeting, 'a late answer (0.8s)');
ok($t >= 0.9 && $t < 1.6, "lookup within the delay, not after it ($t)");

($r, $t) = try('slow', '127.0.0.6');
is($r, blocked('127.0.0.6', 'slow.test'), 'listed, answer after 0.5s');
ok($t < 0.9, "refused before the delay is over ($t)");

my $q = read_file("$dns/queries.log") // '';
like($q, qr/^A 2\.0\.0\.127\.bl2\.test -> 1 records$/m,
    'reversed octets + zone, A records');
unlike($q, qr/4\.0\.0\.127\.bl/, 'exempt client not looked up');

like($n->error_log, qr/client 127\.0\.0\.2 refused: DNSBL/,
    'the refusal logged');
like($n->error_log, qr/client 127\.0\.0\.2 listed in DNSBL bl1\.test/,
    'with the zone');
ok(error_log_clean($n), 'no alerts');

# --- nginx -t -----------------------------------------------------------

my ($rc, $out) = nginx_t(<<'EOF');
mail {
    server {
        listen 127.0.0.1:%%PORT_t%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_dnsbl bl.test;
    }
}
EOF
isnt($rc, 0, 'nginx -t fails: dnsbl without resolver');
like($out, qr/"smtp_ext_dnsbl" needs a "resolver"/, 'and says so');

for my $bad ('bl.test=127.0.0', 'bl.test*0', '=127.0.0.2', 'bl.test=') {
    ($rc, $out) = nginx_t(<<"EOF");
mail {
    resolver 127.0.0.1:%%PORT_dns%%;
    server {
        listen 127.0.0.1:%%PORT_t%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_dnsbl $bad;
    }
}
EOF
    isnt($rc, 0, "nginx -t fails: $bad");
    like($out, qr/invalid DNSBL "\Q$bad\E"/, "nginx -t says why: $bad");
}

done_testing();
