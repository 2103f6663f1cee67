#!/usr/bin/perl

# Reload and shutdown (SPEC §5): on `nginx -s reload` and `nginx -s quit`
# a session with no open transaction and no pending reply gets
# "421 4.3.2 Service shutting down" and is closed within a second; a
# session inside a transaction (from an accepted MAIL to the final reply to
# its end of data, or RSET) finishes it and then gets the same 421 (at once
# or as the reply to its next command; QUIT still gets 221).  The old
# worker sends QUIT to its backends and exits when its last session ended.
# A reload never cuts off a message or loses an acknowledged one.

use strict;
use warnings;

use lib 't/lib';
use POSIX ();
use Test::More;
use Time::HiRes qw(time sleep);
use SmtpExt::Test;

require_programs(nginx_bin());

my $SHUTDOWN = qr/^421 4\.3\.2 Service shutting down/;
my $LOAD_SECONDS = 12;
my $LOAD_CLIENTS = 4;

my $b1 = start_backend(name => 'b1',
    args => ['--caps', 'PIPELINING,ENHANCEDSTATUSCODES']);

my $conf = <<'EOF';
mail {
    server_name mx.test;

    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        timeout 30s;
    }
}
EOF

my $n = start_nginx($conf);


# the current worker (not shutting down)
sub current_worker {
    my $w = nginx_workers($n);
    my @p = grep { $w->{$_} =~ /worker process$/ } keys %$w;
    return @p == 1 ? $p[0] : undef;
}

# SIGHUP and wait for the new worker; returns (time of the signal, old pid)
sub reload {
    my $old = current_worker() or die "no worker\n";
    my $t = time;
    kill 'HUP', $n->pid;
    wait_for(sub { my $p = current_worker(); $p && $p != $old }, 10)
        or die "no new worker after reload\n";
    return ($t, $old);
}

sub session {
    my $c = smtp_client('smtp', timeout => 5);
    $c->expect(qr/^220 /, 'greeting');
    like($c->ehlo(), qr/^250[ -]/, 'EHLO');
    return $c;
}

sub message {
    my ($token, $lines) = @_;
    return "Subject: reload test\r\nX-Token: $token\r\n\r\n"
        . join('', map { "line $_ of message $token\r\n" } 1 .. $lines);
}

# the tokens of the messages at the backend: { token => count }
sub backend_tokens {
    my %t;
    for my $m ($b1->messages()) {
        $t{$1}++ if $m =~ /^X-Token: (\S+)\r$/m;
    }
    return \%t;
}

# wait up to $timeout for a reply; returns it and its delay from $from
sub wait_421 {
    my ($c, $from, $timeout) = @_;
    my $r = $c->reply($timeout) // '<no reply>';
    return ($r, time - $from);
}


###########################################################################
# (a) idle sessions and a reload

{
    my $idle = session();

    # a session that keeps talking: NOOP every 0.5 s
    my $noop = session();

    # a session whose transaction is over (its backend connection stays)
    my $done = session();
    $done->cmd('MAIL FROM:<a@client.test>', qr/^250 /, 'done: MAIL');
    $done->cmd('RCPT TO:<a@rcpt.test>', qr/^250 /, 'done: RCPT');
    $done->cmd('DATA', qr/^354 /, 'done: DATA');
    $done->send(message('idle-done', 3) . ".\r\n");
    $done->expect(qr/^250 2\.0\.0 /, 'done: message accepted');
    my $bconn = $b1->connections();

    my ($t, $old) = reload();
    diag(sprintf('reload: new worker after %.2f s', time - $t));

    # watch the three sessions for 3 s; one sends NOOP every 0.5 s
    my %c = (idle => $idle, noop => $noop, done => $done);
    my (%got, $noops);
    my $next_noop = time;
    while (time - $t < 3 && keys %got < 3) {
        if (!$got{noop} && time >= $next_noop) {
            $noop->send("NOOP\r\n");
            $noops++;
            $next_noop += 0.5;
        }
        for my $name (sort keys %c) {
            next if $got{$name};
            my $c = $c{$name};
            $c->fill(time + 0.03) unless index($c->{buf}, "\n") >= 0;
            next unless index($c->{buf}, "\n") >= 0 || $c->{eof};
            my $r = $c->reply(1) // '<closed>';
            next if $name eq 'noop' && $r =~ /^250 2\.0\.0/;
            $got{$name} = [$r, time - $t];
        }
    }

    my %what = (idle => 'idle session',
        done => 'session after a transaction',
        noop => 'session sending NOOP every 0.5 s');
    my $waited = time - $t;
    for my $name (qw(idle done noop)) {
        my ($r, $after) = @{ $got{$name} // ['<no reply>', $waited] };
        like($r, $SHUTDOWN, "$what{$name}: 421 4.3.2 after reload");
        cmp_ok($after, '<=', 1.5, sprintf("$what{$name}: within a second"
            . ' (%.2f s after the reload signal)', $after));
        ok($c{$name}->closed(1), "$what{$name}: closed");
    }
    diag("the NOOP session sent $noops NOOPs after the reload");

    ok(wait_for(sub { process_gone($old) }, 3),
        'the old worker exited once its sessions were closed');

    ok($b1->wait_closed($bconn, 3), 'backend connection of the old worker'
        . ' closed');
    is(scalar(grep { $_ eq 'QUIT' } $b1->commands($bconn)), 1,
        'the old worker sent QUIT to its backend');

    $_->close() for $idle, $noop, $done;
}


###########################################################################
# (b) sessions inside a transaction when the reload comes

{
    # in DATA, part of the message sent
    my $data = session();
    $data->cmd('MAIL FROM:<b@client.test>', qr/^250 /, 'in DATA: MAIL');
    $data->cmd('RCPT TO:<b@rcpt.test>', qr/^250 /, 'in DATA: RCPT');
    $data->cmd('DATA', qr/^354 /, 'in DATA: DATA');
    my $body = message('in-data', 200);
    my $half = int(length($body) / 2);
    $data->send(substr($body, 0, $half));

    # recipients accepted, no DATA yet
    my $rcpt = session();
    $rcpt->cmd('MAIL FROM:<b@client.test>', qr/^250 /, 'after RCPT: MAIL');
    $rcpt->cmd('RCPT TO:<b@rcpt.test>', qr/^250 /, 'after RCPT: RCPT');

    # only MAIL accepted
    my $mail = session();
    $mail->cmd('MAIL FROM:<b@client.test>', qr/^250 /, 'after MAIL: MAIL');

    my ($t, $old) = reload();

    sleep(1.5);
    for my $c ([$data, 'in DATA'], [$rcpt, 'after RCPT'],
        [$mail, 'after MAIL'])
    {
        is($c->[0]->pending_input(0.1), '', "$c->[1]: nothing said to a"
            . ' session inside a transaction');
        ok(!$c->[0]{eof}, "$c->[1]: still connected");
    }
    ok(!process_gone($old), 'the old worker waits for the transactions');

    # the message goes on and ends normally, then the session ends
    $data->send(substr($body, $half) . ".\r\n");
    $data->expect(qr/^250 2\.0\.0 /, 'in DATA: the message is accepted');
    $data->cmd('NOOP', $SHUTDOWN, 'in DATA: then 421 4.3.2');
    ok($data->closed(1), 'in DATA: closed');

    $rcpt->cmd('DATA', qr/^354 /, 'after RCPT: DATA');
    $rcpt->send(message('after-rcpt', 5) . ".\r\n");
    $rcpt->expect(qr/^250 2\.0\.0 /, 'after RCPT: the message is accepted');
    $rcpt->cmd('QUIT', qr/^(?:221 |421 4\.3\.2 )/,
        'after RCPT: QUIT gets 221 (or the 421 came at once)');
    ok($rcpt->closed(1), 'after RCPT: closed');

    $mail->cmd('RCPT TO:<b@rcpt.test>', qr/^250 /,
        'after MAIL: RCPT still accepted');
    $mail->cmd('DATA', qr/^354 /, 'after MAIL: DATA');
    $mail->send(message('after-mail', 5) . ".\r\n");
    $mail->expect(qr/^250 2\.0\.0 /, 'after MAIL: the message is accepted');
    $mail->cmd('MAIL FROM:<b@client.test>', $SHUTDOWN,
        'after MAIL: no new transaction, 421 4.3.2');
    ok($mail->closed(1), 'after MAIL: closed');

    ok(wait_for(sub { process_gone($old) }, 3),
        'the old worker exited after its last transaction');

    my $tok = backend_tokens();
    is($tok->{$_}, 1, "message $_ at the backend once")
        for qw(in-data after-rcpt after-mail);
    my @m = grep { /X-Token: in-data\r/ } $b1->messages();
    is($m[0], $body, 'in DATA: the whole message at the backend');

    $_->close() for $data, $rcpt, $mail;
}


###########################################################################
# (d) load: clients send uniquely numbered messages while nginx reloads
# every second

{
    my $dir = testdir() . '/load';
    mkdir $dir;
    my $end = time + $LOAD_SECONDS;
    my @kids;

    for my $k (1 .. $LOAD_CLIENTS) {
        my $pid = fork();
        die "fork: $!" unless defined $pid;
        if ($pid == 0) {
            $SIG{$_} = 'DEFAULT' for qw(INT TERM HUP);
            eval { load_client($k, $dir, $end) };
            if ($@) {
                if (open my $fh, '>>', "$dir/client-$k.log") {
                    print $fh "error $@";
                    close $fh;
                }
            }
            POSIX::_exit(0);
        }
        push @kids, $pid;
    }

    my (%seen, $reloads, $max_age, $max_old);
    $max_age = 0;
    $max_old = 0;
    my $next = time + 1;
    while (time < $end) {
        sleep(0.1);
        my $now = time;
        my $w = nginx_workers($n);
        my @old = grep { $w->{$_} =~ /shutting down/ } keys %$w;
        $max_old = @old if @old > $max_old;
        for my $p (@old) {
            $seen{$p} //= $now;
            $max_age = $now - $seen{$p} if $now - $seen{$p} > $max_age;
        }
        if ($now >= $next && $now < $end - 1) {
            kill 'HUP', $n->pid;
            $reloads++;
            $next += 1;
        }
    }
    waitpid($_, 0) for @kids;

    # every old worker goes once the clients are done
    my $left = wait_for(sub {
        my $w = nginx_workers($n);
        return !grep { $w->{$_} =~ /shutting down/ } keys %$w;
    }, 10);

    my (%ack, %cut, %refused, @errors, %sessions_of);
    my ($msgs, $sessions) = (0, 0);
    for my $k (1 .. $LOAD_CLIENTS) {
        for my $l (split /\n/, read_file("$dir/client-$k.log") // '') {
            my ($what, $token, $rest) = split / /, $l, 3;
            if ($what eq 'ack') { $ack{$token}++ }
            elsif ($what eq 'cut') { $cut{$token} = $rest // '' }
            elsif ($what eq 'refused') { $refused{$token} = $rest // '' }
            elsif ($what eq 'session') { $sessions++; $sessions_of{$k}++ }
            elsif ($what eq 'error') { push @errors, $l }
        }
    }

    my $tok = backend_tokens();
    my @lost = grep { ($tok->{$_} // 0) != 1 } keys %ack;
    my @dup = grep { $tok->{$_} > 1 } keys %$tok;
    my @unacked = grep { /^c\d/ && !$ack{$_} } keys %$tok;

    diag(sprintf('load: %d reloads, %d sessions, %d messages acknowledged,'
        . ' %d cut, %d refused before MAIL; at most %d old workers at once,'
        . ' the oldest lived %.1f s', $reloads, $sessions, scalar keys %ack,
        scalar keys %cut, scalar keys %refused, $max_old, $max_age));

    is(scalar @errors, 0, 'load: the clients ran without errors')
        or diag(join "\n", @errors);
    cmp_ok(scalar keys %ack, '>', 100, 'load: messages were acknowledged');
    cmp_ok($reloads, '>=', $LOAD_SECONDS - 3, 'load: nginx was reloaded');
    for my $k (1, 2) {
        cmp_ok($sessions_of{$k} // 0, '>=', 3, "load: client $k, which"
            . ' never quits, was made to reconnect by the reloads');
    }
    is(scalar @lost, 0, 'load: every acknowledged message is at the'
        . ' backend exactly once') or diag("lost: @lost[0 .. 4]");
    is(scalar @dup, 0, 'load: no message at the backend twice')
        or diag("duplicated: @dup[0 .. 4]");
    is(scalar keys %cut, 0, 'load: no transaction was cut off by a reload')
        or diag(join "\n", map { "$_ $cut{$_}" } (sort keys %cut)[0 .. 4]);
    is(scalar @unacked, 0, 'load: no message at the backend that the'
        . ' client was not told about') or diag("unacked: @unacked[0 .. 4]");
    cmp_ok($max_age, '<', 5, 'load: each old worker exited within 5 s');
    ok($left, 'load: no old worker left after the clients ended');
}


###########################################################################
# (c) nginx -s quit: an idle session is told at once, a transaction ends
# first, the master exits

{
    my $idle = session();

    my $data = session();
    $data->cmd('MAIL FROM:<c@client.test>', qr/^250 /, 'quit, in DATA: MAIL');
    $data->cmd('RCPT TO:<c@rcpt.test>', qr/^250 /, 'quit, in DATA: RCPT');
    $data->cmd('DATA', qr/^354 /, 'quit, in DATA: DATA');
    my $body = message('quit-data', 50);
    $data->send(substr($body, 0, 100));

    my $master = $n->pid;
    my $t = time;
    kill 'QUIT', $master;

    my ($r, $after) = wait_421($idle, $t, 3);
    like($r, $SHUTDOWN, 'nginx -s quit: idle session gets 421 4.3.2');
    cmp_ok($after, '<=', 1.5, sprintf('nginx -s quit: within a second'
        . ' (%.2f s)', $after));
    ok($idle->closed(1), 'nginx -s quit: idle session closed');

    is($data->pending_input(0.5), '', 'nginx -s quit: nothing said to the'
        . ' session in DATA');
    $data->send(substr($body, 100) . ".\r\n");
    $data->expect(qr/^250 2\.0\.0 /,
        'nginx -s quit: the message in DATA is accepted');
    $data->cmd('NOOP', $SHUTDOWN, 'nginx -s quit: then 421 4.3.2');
    ok($data->closed(1), 'nginx -s quit: the session in DATA closed');
    is(backend_tokens()->{'quit-data'}, 1,
        'nginx -s quit: the message at the backend once');

    ok(wait_for(sub { process_gone($master) }, 3),
        'nginx -s quit: the master exited');

    $_->close() for $idle, $data;
    stop_nginx($n);
}

ok(error_log_clean($n), 'no alerts in the error log');

done_testing();


# One load client (a child process): sessions of many messages, each with
# a new token; it never sends a token twice.  Writes "session", "ack T",
# "cut T reply" (a transaction opened by an accepted MAIL that did not end
# with 250) and "refused T reply" (421 before the transaction) lines.
sub load_client {
    my ($k, $dir, $end) = @_;
    open my $log, '>>', "$dir/client-$k.log" or die "log: $!\n";
    $log->autoflush(1);
    my $seq = 0;
    # clients 1 and 2 never quit on their own: only a reload ends their
    # sessions; 3 and 4 quit after a few messages
    my $per_session = $k <= 2 ? 1e9 : 3 + $k;
    my $pause = [0, 0.01, 0, 0.05]->[($k - 1) % 4];

    while (time < $end) {
        my $c = eval { SmtpExt::Test::Client->new(
            SmtpExt::Test::port('smtp'), timeout => 10) };
        if (!$c) {
            sleep(0.05);
            next;
        }
        print $log "session\n";
        my $g = $c->reply() // '<none>';
        if ($g !~ /^220 /) {
            $g =~ s/\r?\n/ /g;
            print $log "refused greeting-$k-$seq $g\n";
            next;
        }
        my $e = $c->ehlo("load$k.test") // '<none>';
        if ($e !~ /^250/) {
            $e =~ s/\r?\n/ /g;
            print $log "refused ehlo-$k-$seq $e\n";
            next;
        }
        my $count = 0;
        while (time < $end && $count++ < $per_session) {
            my $token = "c$k-" . ++$seq;
            $c->send("MAIL FROM:<load$k\@client.test>\r\n");
            my $r = $c->reply() // '<none>';
            if ($r !~ /^250 /) {
                $r =~ s/\r?\n/ /g;
                print $log "refused $token $r\n";
                last;
            }
            $c->send("RCPT TO:<rcpt$k\@rcpt.test>\r\nDATA\r\n");
            my $r1 = $c->reply() // '<none>';
            my $r2 = $c->reply() // '<none>';
            if ($r1 !~ /^250 / || $r2 !~ /^354 /) {
                my $x = "$r1 $r2";
                $x =~ s/\r?\n/ /g;
                print $log "cut $token $x\n";
                last;
            }
            $c->send(message($token, 20));
            sleep($pause) if $pause;
            $c->send(".\r\n");
            $r = $c->reply(10) // '<none>';
            if ($r =~ /^250 /) {
                print $log "ack $token\n";
            } else {
                $r =~ s/\r?\n/ /g;
                print $log "cut $token $r\n";
                last;
            }
            sleep($pause) if $pause;
        }
        if (!$c->{eof}) {
            $c->send("QUIT\r\n");
            $c->reply(2);
        }
        $c->close();
    }
    close $log;
}
