#!/usr/bin/perl

# The adversarial integration test: backends that misbehave at a random
# step of each connection (smtp-backend.pl --chaos) and clients that
# pipeline, abort in DATA, stall, flood NOOPs, send garbage and disconnect
# at random, all at once.  After the run: a client got 250 at the end of
# data only for a message a backend recorded; a backend recorded only
# messages whose client sent the final dot; every session ended (a reply
# or a close) within the configured timeouts plus slack; the worker holds
# no socket but its listeners once the clients left; its RSS stayed
# bounded; the error log has no alert, crit or crash.
#
# SMTP_EXT_SEED (default 20240611) makes a run reproducible (the choices of
# clients and backends, not the timing); SMTP_EXT_ADVERSARIAL_SESSIONS
# (default 300) and SMTP_EXT_ADVERSARIAL_CLIENTS (default 12, parallel)
# size it.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;
use POSIX qw(:sys_wait_h);
use Socket qw(SOL_SOCKET SO_LINGER);
use Time::HiRes qw(time sleep);

require_programs(nginx_bin(), 'openssl');

my $seed = $ENV{SMTP_EXT_SEED} // 20240611;
my $sessions = $ENV{SMTP_EXT_ADVERSARIAL_SESSIONS} // 300;
my $parallel = $ENV{SMTP_EXT_ADVERSARIAL_CLIENTS} // 12;
my $asan = is_asan();
my $slack = $asan ? 15 : 5;

diag("SMTP_EXT_SEED=$seed sessions=$sessions clients=$parallel");

# the configured timeouts (seconds)
my ($connect_t, $upstream_t, $idle_t) = (2, 2, 5);

# the longest a reply may take: every peer of a pool refusing slowly,
# then a backend step timing out
my $reply_t = 2 * $connect_t + 2 * $upstream_t + $slack;

my ($crt, $key) = gen_cert('backend.test');

my %b = (
    chaos => start_backend(name => 'chaos', args => ['--chaos', $seed]),
    chaostls => start_backend(name => 'chaostls',
        args => ['--chaos', $seed + 1, '--tls', "$crt,$key",
            '--caps', 'PIPELINING,8BITMIME,ENHANCEDSTATUSCODES']),
    good => start_backend(name => 'good'),
);

my $n = start_nginx(<<"EOF");
mail {
    server_name mx.test;

    smtp_ext_upstream mix {
        server 127.0.0.1:%%PORT_chaos%% max_fails=0;
        server 127.0.0.1:%%PORT_good%% max_fails=0;
    }

    server {
        listen 127.0.0.1:%%PORT_s_mix%%;
        protocol smtp_ext;
        smtp_ext_connect_timeout ${connect_t}s;
        smtp_ext_upstream_timeout ${upstream_t}s;
        smtp_ext_max_message_size 4m;
        timeout ${idle_t}s;
        smtp_ext_pass mix;
    }
    server {
        listen 127.0.0.1:%%PORT_s_chaos%%;
        protocol smtp_ext;
        smtp_ext_connect_timeout ${connect_t}s;
        smtp_ext_upstream_timeout ${upstream_t}s;
        smtp_ext_max_message_size 4m;
        timeout ${idle_t}s;
        smtp_ext_pass 127.0.0.1:%%PORT_chaos%%;
    }
    server {
        listen 127.0.0.1:%%PORT_s_tls%%;
        protocol smtp_ext;
        smtp_ext_connect_timeout ${connect_t}s;
        smtp_ext_upstream_timeout ${upstream_t}s;
        smtp_ext_max_message_size 4m;
        timeout ${idle_t}s;
        smtp_ext_pass 127.0.0.1:%%PORT_chaostls%%;
        smtp_ext_upstream_tls on;
    }
}
EOF

my @servers = map { port($_) } qw(s_mix s_mix s_chaos s_tls);

my @base = worker_sockets($n);
my $rss0 = worker_rss($n);
my $resdir = testdir() . '/results';
mkdir $resdir;


# one client session; everything it learns goes to $out as lines
#   TX token dot=0|1 code
#   END session kind how seconds

my ($out, $sess, $kind, @tx_log);

sub rec { print $out "@_\n"; }

# what a reply to each command may be; a reply to another command (a
# shifted or injected one) or a malformed one is noted as BAD
my %want = (
    greeting => qr/^220 /,
    ehlo => qr/^250[ -]/,
    mail => qr/^(250 2\.1\.0|[45]\d\d)[ -]/,
    rcpt => qr/^(25[01] 2\.1\.5|25[01][ -]2\.0\.0 line|[45]\d\d)[ -]/,
    data => qr/^(354|[45]\d\d)[ -]/,
    dot => qr/^(250[ -]2\.0\.0 (Ok: queued|line)|[45]\d\d)[ -]/,
    noop => qr/^250 2\.0\.0 /,
    rset => qr/^250 2\.0\.0 /,
    quit => qr/^221 /,
    garbage => qr/^[45]\d\d /,
);

# a reply, or die "closed" / "hang"
sub rd {
    my ($c, $what, $t) = @_;
    my $r = $c->reply($t // $reply_t);
    if (!defined $r || !defined $c->code) {
        die $c->{eof} ? "closed\n" : "hang\n";
    }
    my @l = split /\r\n/, $r, -1;
    my $bad = '';
    $bad = 'no CRLF' if pop(@l) ne '';
    for my $i (0 .. $#l) {
        my $sep = $i == $#l ? ' ' : '-';
        next if $l[$i] =~ /^\Q${\ $c->code}$sep\E/
            || ($i == $#l && $l[$i] eq $c->code);
        $bad = 'line ' . ($i + 1) . ' of ' . scalar(@l);
        last;
    }
    $bad ||= 'not a reply to ' . uc $what
        if $what && $r !~ $want{$what} && $r !~ /^421 /;
    $bad ||= 'injected' if $r =~ /injected/;
    $bad ||= 'early reply' if $r =~ /early reply/ && ($what // '') ne 'dot';
    if ($bad) {
        my $first = substr($l[0] // '', 0, 60);
        $first =~ s/\s/_/g;
        rec('BAD', $sess, $kind, $what // '-', $bad =~ s/\s/_/gr, $first);
    }
    return $r;
}

sub message {
    my ($token, $size) = @_;
    my $m = "From: <a\@client.test>\r\nTo: <c\@d.test>\r\n"
        . "Message-ID: <$token\@client.test>\r\nSubject: $token\r\n\r\n";
    my $i = 0;
    while (length $m < $size) {
        my $l = $i % 13 == 5 ? "..dot-stuffed $token $i" : "$token line $i";
        $m .= $l . (' ' . ('abcdefgh' x (1 + int rand 8))) . "\r\n";
        $i++;
    }
    return $m;
}

sub hard_close {
    my ($c) = @_;
    setsockopt($c->sock, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0))
        if rand() < 0.5;
    $c->close();
}

# one transaction; %o: pipeline, abort, size, cut (a write counter: the
# session is dropped when it reaches 0)
sub tx {
    my ($c, $k, %o) = @_;
    my $token = "TOK-$seed-$sess-$k";
    my $size = $o{size} // (200 + int rand 4000);
    my $nrcpt = 1 + int rand 3;
    my $cut = $o{cut};
    my $drop = sub {
        return unless defined $$cut && --$$cut <= 0;
        hard_close($c);
        die "dropped\n";
    };

    my @cmds = ("MAIL FROM:<a\@client.test>\r\n",
        (map { "RCPT TO:<r$_\@d.test>\r\n" } 1 .. $nrcpt), "DATA\r\n");
    my @r;
    if ($o{pipeline}) {
        $c->send(join '', @cmds);
        $drop->() if $cut;
        push @r, rd($c, /^(\w+)/ ? lc $1 : '') for @cmds;
    } else {
        for my $cmd (@cmds) {
            $c->send($cmd);
            $drop->() if $cut;
            push @r, rd($c, $cmd =~ /^(\w+)/ ? lc $1 : '');
            last if $r[-1] !~ /^[23]/ && $cmd =~ /^MAIL/;
        }
    }
    return unless ($r[-1] // '') =~ /^354/;

    my $msg = message($token, $size);
    if ($o{abort}) {
        my $part = substr($msg, 0, int rand length $msg);
        rec('TX', $token, 0, 'abort');
        $c->send_within($part, $reply_t);
        hard_close($c);
        die "aborted\n";
    }
    if ($cut && $$cut == 1) {
        my $part = substr($msg, 0, int rand length $msg);
        rec('TX', $token, 0, 'cut');
        $c->send_within($part, $reply_t);
        hard_close($c);
        die "dropped\n";
    }
    my $all = $msg . ".\r\n";
    my $w = $c->send_within($all, 30 + $slack);
    if ($w != length $all) {
        rec('TX', $token, 0, 'blocked');
        die $c->closed(0) ? "closed\n" : "hang in DATA\n";
    }
    my $r = eval { rd($c, 'dot') };
    my $code = defined $r ? substr($r, 0, 3) : 'none';
    rec('TX', $token, 1, $code);
    die $@ if $@;
    $drop->() if $cut;
    return $code;
}

sub session {
    my ($i) = @_;
    $sess = $i;
    srand($seed * 1000003 + $i);
    my $p = rand();
    $kind = $p < 0.25 ? 'normal' : $p < 0.40 ? 'pipeline'
        : $p < 0.48 ? 'abort' : $p < 0.53 ? 'stall' : $p < 0.61 ? 'noops'
        : $p < 0.70 ? 'garbage' : $p < 0.85 ? 'drop' : 'big';
    my $port = $servers[int rand @servers];
    my $t0 = time;

    my $c = eval { smtp_client($port, timeout => $reply_t) };
    if (!$c) {
        rec('END', $i, $kind, 'noconnect', 0);
        return;
    }

    my $how = eval {
        rd($c, 'greeting');

        if ($kind eq 'stall') {
            my $what = int rand 3;
            my $wait = $idle_t + $slack;
            if ($what == 1) {
                $c->send("EHLO client.test\r\n");
                rd($c, 'ehlo');
                $c->send('MAIL FROM:<a@client');
            } elsif ($what == 2) {
                $c->send("EHLO client.test\r\n");
                rd($c, 'ehlo');
                $c->send("MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\n"
                    . "DATA\r\n");
                rd($c, $_) for qw(mail rcpt data);
                if ($c->code == 354) {
                    my $part = message("TOK-$seed-$i-1", 1000);
                    $c->send($part);
                    rec('TX', "TOK-$seed-$i-1", 0, 'stall');
                    $wait += length($part) / 500 + $reply_t;
                }
            }
            my $t = time;
            die "hang: not closed after a stall\n"
                unless $c->closed($wait);
            return 'closed';
        }

        $c->send("EHLO client.test\r\n");
        rd($c, 'ehlo');

        if ($kind eq 'garbage') {
            for (1 .. 3 + int rand 10) {
                my $len = int rand 700;
                my $g = join '', map { chr(int rand 256) } 1 .. $len;
                $g =~ s/\n/ /g;
                $c->send("$g\r\n");
                rd($c, 'garbage');
            }
        }

        if ($kind eq 'noops') {
            my $k = 50 + int rand 300;
            $c->send("NOOP\r\n" x $k);
            rd($c, 'noop') for 1 .. $k;
        }

        my $cut = $kind eq 'drop' ? 1 + int rand 8 : undef;
        my $ntx = 1 + int rand 3;
        for my $k (1 .. $ntx) {
            my %o = (pipeline => $kind eq 'pipeline' || rand() < 0.2);
            $o{abort} = 1 if $kind eq 'abort' && $k == $ntx;
            $o{size} = 100_000 + int rand 1_500_000 if $kind eq 'big';
            $o{cut} = \$cut if defined $cut;
            tx($c, $k, %o);
            if (rand() < 0.3) {
                $c->send("RSET\r\nNOOP\r\n");
                rd($c, $_) for qw(rset noop);
            }
        }

        $c->send("QUIT\r\n");
        rd($c, 'quit');
        $c->close();
        return 'quit';
    };

    if (!defined $how) {
        $how = $@;
        chomp $how;
        $how =~ s/\s+/_/g;
    }
    rec('END', $i, $kind, $how, sprintf('%.1f', time - $t0));
}

my $t_start = time;
my %kids;
for my $w (0 .. $parallel - 1) {
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        $SIG{PIPE} = 'IGNORE';
        open $out, '>', "$resdir/client-$w.txt" or die;
        $out->autoflush(1);
        for (my $i = $w; $i < $sessions; $i += $parallel) {
            session($i);
        }
        close $out;
        POSIX::_exit(0);
    }
    $kids{$pid} = 1;
}

# a hung client is a failure, not a hung test
my $limit = 60 + $sessions * 0.6 * ($asan ? 3 : 1);
wait_for(sub {
    while ((my $p = waitpid(-1, WNOHANG)) > 0) {
        delete $kids{$p};
    }
    return !%kids;
}, $limit);
ok(!%kids, sprintf('all client processes done (%.0f s)', time - $t_start))
    or do { kill 'KILL', keys %kids; waitpid($_, 0) for keys %kids; };

my (%tx, %ends, @hangs, @bad_replies, $n_end);
for my $f (glob "$resdir/client-*.txt") {
    open my $fh, '<', $f or next;
    while (my $l = <$fh>) {
        chomp $l;
        my @f = split / /, $l;
        if ($f[0] eq 'TX') {
            $tx{ $f[1] } = { dot => $f[2], code => $f[3] };
        } elsif ($f[0] eq 'BAD') {
            push @bad_replies, $l;
        } elsif ($f[0] eq 'END') {
            $n_end++;
            $ends{"$f[2] $f[3]"}++;
            push @hangs, $l if $f[3] =~ /hang/;
        }
    }
}
is($n_end, $sessions, "every session reported ($sessions)");
diag(join ', ', map { "$_: $ends{$_}" } sort keys %ends);
ok(!@hangs, 'every session ended within the timeouts plus slack')
    or diag(join "\n", @hangs[0 .. ($#hangs < 19 ? $#hangs : 19)]);

ok(!@bad_replies, 'every reply well-formed and a reply to its command')
    or diag(join "\n", @bad_replies[0 .. ($#bad_replies < 19
        ? $#bad_replies : 19)]);

# the backends: wait until each connection is over, then their messages
my @conns;
wait_for(sub {
    @conns = ();
    for my $b (values %b) {
        for my $k (1 .. $b->connections) {
            push @conns, "$b->{name} $k" unless $b->closed($k);
        }
    }
    return !@conns;
}, 20 + $slack);
diag("backend connections still open: @conns") if @conns;

my %recorded;
for my $b (values %b) {
    for my $f ($b->message_files) {
        my $m = read_file($f) // '';
        $recorded{$1} = $f while $m =~ /Message-ID: <(TOK-\d+-\d+-\d+)\@/g;
    }
}

my @lost = grep { $tx{$_}{dot} && $tx{$_}{code} =~ /^2/ && !$recorded{$_} }
    sort keys %tx;
ok(!@lost, 'a 250 at end of data only for messages a backend recorded ('
    . scalar(grep { $tx{$_}{code} =~ /^2/ } keys %tx) . ' accepted, '
    . scalar(keys %recorded) . ' recorded)')
    or diag("acknowledged, not recorded: @lost[0 .. ($#lost < 9 ? $#lost : 9)]");

my @smuggled = grep { !$tx{$_} || !$tx{$_}{dot} } sort keys %recorded;
ok(!@smuggled, 'a backend recorded only messages whose client sent the dot')
    or diag(join "\n", map { "$_ in $recorded{$_}" }
        @smuggled[0 .. ($#smuggled < 9 ? $#smuggled : 9)]);

my $aborted = grep { !$tx{$_}{dot} } keys %tx;
diag("transactions: " . scalar(keys %tx) . ", without a dot: $aborted");

my @busy;
my $clean = wait_for(sub {
    @busy = worker_busy_sockets($n);
    return !@busy && scalar(worker_sockets($n)) == scalar(@base);
}, 10 + $slack);
ok($clean, 'the worker holds no socket but its listeners')
    or diag(join "\n", @busy, 'sockets: ' . scalar(worker_sockets($n))
        . ', at start: ' . scalar(@base));

my $rss = worker_rss($n) // 0;
# ASan keeps freed memory in its quarantine (256 MB by default)
my $max = $asan ? 512 * 1024 : 32 * 1024;
ok($rss - $rss0 < $max, "worker RSS $rss0 kB -> $rss kB (growth under "
    . ($max / 1024) . ' MB)');

$n->stop();
my @bad = grep { /\[(alert|crit|emerg)\]|exited on signal|signal (6|7|8|11)\b/ }
    split /\n/, error_log($n);
ok(!@bad, 'no alert, crit or crash signal in the error log')
    or diag(join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)]);

done_testing();
