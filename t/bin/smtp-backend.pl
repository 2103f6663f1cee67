#!/usr/bin/perl

# smtp-backend.pl - a scriptable SMTP server for the ngx_mail_smtp_ext tests.
#
# Usage:
#   smtp-backend.pl --port PORT --dir DIR [options]
#
# Listens on 127.0.0.1:PORT and forks one process per connection.
# Connections are numbered from 1 in accept order.  For connection N it
# writes, as the bytes arrive:
#   DIR/conn-N.raw      every byte received, exactly (decrypted after
#                       STARTTLS), appended and flushed on every read
#   DIR/conn-N.log      "> command line" and "< reply line" in order,
#                       "* note" for events (TLS, data end, close)
#   DIR/conn-N.closed   created when the connection is over
#   DIR/msg-N-K.eml     the K-th message of connection N: the data between
#                       the 354 and the terminating dot, still dot-stuffed,
#                       exactly as received (the CRLF before ".CRLF" is part
#                       of the message); for BDAT the chunks' octets, joined
#
# Options:
#   --port N              port on 127.0.0.1 (required)
#   --dir DIR             where to record (required)
#   --pidfile FILE        written once the socket listens
#   --greeting TEXT       default "220 backend ESMTP"; a 4xx greeting
#                         closes the connection after it is sent, a 5xx
#                         one answers 503 to everything but QUIT
#   --caps LIST           comma separated EHLO keywords, default
#                         "PIPELINING,SIZE 10485760,8BITMIME,SMTPUTF8,
#                          ENHANCEDSTATUSCODES,XCLIENT NAME ADDR PORT PROTO
#                          HELO LOGIN"; "" for none; STARTTLS is added
#                         when --tls is given
#   --ehlo-reply TEXT     reply to EHLO instead of the keyword list (a
#                         5xx makes EHLO fail, to test the HELO fallback)
#   --mail-reply TEXT     default "250 2.1.0 Ok"
#   --rcpt-reply TEXT     default "250 2.1.5 Ok"
#   --rcpt 'REGEX=REPLY'  reply for recipients whose RCPT line matches
#                         REGEX (repeatable, first match wins)
#   --data-reply TEXT     default "354 End data with <CR><LF>.<CR><LF>"
#   --dot-reply TEXT      default "250 2.0.0 Ok: queued as %N" where %N is
#                         replaced by "CONN-K"
#   --xclient-reply TEXT  default "220 backend ESMTP"
#   --rset-reply TEXT     default "250 2.0.0 Ok"; "rset" is also a STEP
#                         for --stall, --close-at, --rst-at, --reply-lines
#   --close-after-greeting
#   --close-in-data-after BYTES   close after BYTES octets of message data
#   --stall STEP          greeting|ehlo|mail|rcpt|data|dot|xclient: never
#                         answer at that step nor after it (keep reading
#                         and recording)
#   --delay-read MS       sleep MS milliseconds before every read
#   --read-size BYTES     bytes per read (default 16384)
#   --lenient-dot         also end data at LF.LF, CR.CR, LF.CRLF, CRLF.LF,
#                         CR.CRLF, ... (an smuggling-vulnerable server);
#                         what follows is taken as commands
#   --tls CERT,KEY        offer STARTTLS
#   --tls-client-ca FILE  with --tls: require a client certificate that
#                         FILE's CA signed (a handshake without one fails)
#   --tls-info            with --tls: after the handshake note
#                         "* tls sni NAME" ("-" without SNI) and
#                         "* tls client SUBJECT" ("-" without a client
#                         certificate) and "* tls reused 0|1" (a resumed
#                         session: the TLS context, and so its session
#                         ticket key, is then made once for all
#                         connections)
#   --greeting-from 'N=TEXT'  connections N and later greet with TEXT
#                         instead (e.g. "2=421 4.3.2 down": the first
#                         connection works, the later ones fail)
#   --rcvbuf BYTES        SO_RCVBUF on the listening socket (inherited by
#                         every accepted one, so the window is small from
#                         the SYN on)
#   --pause-after-354 MS  stop reading for MS milliseconds after a 354
#   --early-reply 'MS=TEXT'  MS milliseconds after a 354, while the data
#                         still flows, send TEXT; reading goes on as
#                         before (after --pause-after-354); a final dot
#                         that still arrives is recorded as usual and
#                         noted "dot after early reply"
#   --starttls-extra TEXT bytes sent after the STARTTLS 220 in the same
#                         write (a plaintext injection, RFC 3207 4.2)
#   --reply-lines 'STEP=N,LEN[,CODE]'  at STEP answer an N-line reply,
#                         each line LEN octets before its CRLF, with CODE
#                         (default: the code of that step's usual reply);
#                         the text is what lines_reply() in
#                         t/lib/SmtpExt/Test.pm builds (repeatable)
#   --close-at STEP       close the connection instead of answering STEP
#   --rst-at STEP         reset it (SO_LINGER 0) instead of answering STEP
#   --byte-by-byte[=MS]   write every reply one octet at a time, MS (1)
#                         milliseconds apart, TCP_NODELAY
#   --chaos SEED          each connection misbehaves at one step chosen
#                         at random from SEED and its number (or behaves,
#                         one in four); the choice is noted in conn-N.log
#                         as "* chaos STEP ACTION ..."; see chaos_plan()
#
# STEP is greeting|ehlo|xclient|starttls|mail|rcpt|data|body|dot, where
# "body" is the message data: the action happens once the first octets
# after the 354 arrived.  "greeting" closes or resets before the greeting.
#
# BDAT n [LAST] (RFC 3030; list CHUNKING in --caps to offer it): the n
# octets after the line are data; each chunk gets "250 2.0.0 n octets
# received", LAST the --dot-reply; without MAIL or recipients the chunk is
# refused (503, 554) and its octets dropped.  --close-in-data-after counts
# chunk octets too.
#
# A reply TEXT may contain "\n" (backslash n) to make a multiline reply:
# "250-first\n250 last".  A "PROXY ..." line is accepted silently as the
# first line of a connection.  XCLIENT answers --xclient-reply and restarts
# the session (HELO/EHLO needed again).  MAIL before HELO/EHLO gets 503.
# SIGTERM stops the server and its connection processes.

use strict;
use warnings;

use Getopt::Long;
use IO::Socket::INET;
use POSIX qw(:sys_wait_h);
use Socket qw(SOL_SOCKET SO_RCVBUF SO_LINGER IPPROTO_TCP TCP_NODELAY);
use Time::HiRes qw(sleep time);

my %o = (
    greeting => '220 backend ESMTP',
    caps => 'PIPELINING,SIZE 10485760,8BITMIME,SMTPUTF8,ENHANCEDSTATUSCODES,'
        . 'XCLIENT NAME ADDR PORT PROTO HELO LOGIN',
    'mail-reply' => '250 2.1.0 Ok',
    'rcpt-reply' => '250 2.1.5 Ok',
    'data-reply' => '354 End data with <CR><LF>.<CR><LF>',
    'dot-reply' => '250 2.0.0 Ok: queued as %N',
    'xclient-reply' => '220 backend ESMTP',
    'rset-reply' => '250 2.0.0 Ok',
    'read-size' => 16384,
    stall => '',
    rcpt => [],
    'reply-lines' => [],
);

GetOptions(\%o, 'port=i', 'dir=s', 'pidfile=s', 'greeting=s', 'caps=s',
    'ehlo-reply=s', 'mail-reply=s', 'rcpt-reply=s', 'rcpt=s@',
    'data-reply=s', 'dot-reply=s', 'xclient-reply=s', 'rset-reply=s',
    'close-after-greeting', 'close-in-data-after=i', 'stall=s',
    'delay-read=i', 'read-size=i', 'lenient-dot', 'tls=s',
    'greeting-from=s', 'rcvbuf=i', 'pause-after-354=i', 'early-reply=s',
    'starttls-extra=s', 'reply-lines=s@', 'close-at=s', 'rst-at=s',
    'byte-by-byte:i', 'chaos=i', 'tls-client-ca=s', 'tls-info',
    'bdat-chunk-reply=s')
    or die "bad options\n";

my @steps = qw(greeting ehlo xclient starttls mail rcpt data body dot);
# rset: not a --chaos step (the seeded plans stay as they were)
my %step_ok = map { $_ => 1 } @steps, "rset";

# the actions given on the command line, per step
my %cli_act;
for my $r (@{ $o{'reply-lines'} }) {
    my ($st, $n, $len, $code) = $r =~ /^(\w+)=(\d+),(\d+)(?:,(\d{3}))?$/
        or die "bad --reply-lines '$r'\n";
    die "bad step '$st'\n" unless $step_ok{$st};
    $cli_act{$st} = { action => 'lines', n => $n, len => $len,
        code => $code };
}
for my $k ('close-at', 'rst-at') {
    next unless defined $o{$k};
    die "bad step '$o{$k}'\n" unless $step_ok{$o{$k}};
    $cli_act{ $o{$k} } = { action => $k eq 'close-at' ? 'close' : 'rst' };
}

my ($greeting_from, $greeting_later);
if (defined $o{'greeting-from'}) {
    ($greeting_from, $greeting_later) = $o{'greeting-from'} =~ /^(\d+)=(.*)$/
        or die "bad --greeting-from\n";
}

my ($early_ms, $early_text);
if (defined $o{'early-reply'}) {
    ($early_ms, $early_text) = $o{'early-reply'} =~ /^(\d+)=(.*)$/
        or die "bad --early-reply\n";
}

die "--port and --dir are required\n" unless $o{port} && $o{dir};

my @rcpt_rules;
for my $r (@{ $o{rcpt} }) {
    my ($re, $reply) = $r =~ /^(.*)=(\d{3}.*)$/
        or die "bad --rcpt '$r'\n";
    push @rcpt_rules, [qr/$re/i, $reply];
}

my ($cert, $key, @tls_ctx);
if ($o{tls}) {
    ($cert, $key) = split /,/, $o{tls};
    require IO::Socket::SSL;
}
if ($o{tls} && $o{'tls-info'}) {
    # one context before the forks: its ticket key is every child's
    my $ctx = IO::Socket::SSL::SSL_Context->new(SSL_server => 1,
        SSL_cert_file => $cert, SSL_key_file => $key,
        ($o{'tls-client-ca'} ? (
            SSL_ca_file => $o{'tls-client-ca'},
            SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_PEER()
                | IO::Socket::SSL::SSL_VERIFY_FAIL_IF_NO_PEER_CERT(),
        ) : ()))
        or die "TLS context: " . IO::Socket::SSL::errstr() . "\n";
    @tls_ctx = (SSL_reuse_ctx => $ctx);
}

my $listen = IO::Socket::INET->new(
    LocalAddr => '127.0.0.1',
    LocalPort => $o{port},
    Listen => 128,
    ReuseAddr => 1,
    Proto => 'tcp',
) or die "listen 127.0.0.1:$o{port}: $!\n";

# accepted sockets inherit it, and so the window they announce
setsockopt($listen, SOL_SOCKET, SO_RCVBUF, $o{rcvbuf})
    or die "SO_RCVBUF: $!\n" if $o{rcvbuf};

if ($o{pidfile}) {
    open my $fh, '>', "$o{pidfile}.tmp" or die "pidfile: $!\n";
    print $fh "$$\n";
    close $fh;
    rename "$o{pidfile}.tmp", $o{pidfile};
}

my %kids;
my $stop = 0;

$SIG{TERM} = $SIG{INT} = sub { $stop = 1; };
$SIG{CHLD} = sub {
    while ((my $pid = waitpid(-1, WNOHANG)) > 0) {
        delete $kids{$pid};
    }
};

my $conn_no = 0;
my $parent = getppid();

while (!$stop) {
    # exit with the test that started us, even if it was killed
    last if getppid() != $parent;

    my $rin = '';
    vec($rin, fileno($listen), 1) = 1;
    next unless select(my $rout = $rin, undef, undef, 1) > 0;

    my $c = $listen->accept();
    next unless $c;

    $conn_no++;

    my $pid = fork();
    die "fork: $!\n" unless defined $pid;

    if ($pid == 0) {
        $SIG{TERM} = $SIG{INT} = 'DEFAULT';
        $SIG{CHLD} = 'DEFAULT';
        close $listen;
        session($c, $conn_no);
        exit 0;
    }

    $kids{$pid} = 1;
    close $c;
}

kill 'TERM', keys %kids;
unlink $o{pidfile} if $o{pidfile};
exit 0;


sub reply_text {
    my ($t) = @_;
    $t =~ s/\\n/\r\n/g;
    return "$t\r\n";
}

# an N-line reply, each line LEN octets before its CRLF; the same text as
# SmtpExt::Test::lines_reply()
sub lines_reply {
    my ($code, $n, $len) = @_;
    my $class = substr($code, 0, 1);
    my $out = '';
    for my $i (1 .. $n) {
        my $t = $code . ($i == $n ? ' ' : '-') . "$class.0.0 line $i of $n ";
        my $k = 0;
        $t .= chr(97 + ($i + $k++) % 26) while length $t < $len;
        $out .= substr($t, 0, $len) . "\r\n";
    }
    return $out;
}

# --chaos: what connection N does wrong, from the seed alone
sub chaos_plan {
    my ($seed, $n, $tls) = @_;
    srand($seed * 7919 + $n * 104729);
    return undef if rand() < 0.25;

    my @st = grep { $_ ne 'xclient' && ($_ ne 'starttls' || $tls) } @steps;
    my $step = $st[int rand @st];
    my @acts = qw(close rst stall partial bytes lines lines endless);
    @acts = qw(close rst stall early early rcvbuf) if $step eq 'body';
    @acts = qw(close rst stall extra extra) if $step eq 'starttls';
    my $p = { step => $step, action => $acts[int rand @acts] };
    my $a = $p->{action};

    if ($a eq 'partial') {
        $p->{split} = 1 + int rand 20;
        $p->{gap} = int rand 600;
    } elsif ($a eq 'lines') {
        $p->{n} = 2 + int rand 120;
        $p->{len} = 12 + int rand 500;
    } elsif ($a eq 'early') {
        $p->{ms} = int rand 800;
        $p->{code} = (qw(250 451 554))[int rand 3];
        # a backend that said 250 must still read what follows: its 250
        # may be (taken as) the reply to the dot
        $p->{close_ms} = int rand 1500 if $p->{code} !~ /^2/ && rand() < 0.5;
    } elsif ($a eq 'rcvbuf') {
        $p->{pause} = int rand 3000;
        $p->{delay} = int rand 3;
    } elsif ($a eq 'stall' && $step eq 'body') {
        # stop reading (a blocked writer at the other end), never answer
        $p->{pause} = 8000;
    } elsif ($a eq 'extra') {
        $p->{text} = ('250 2.0.0 injected', '250-injected\n250 twice',
            '554 5.0.0 injected')[int rand 3];
    }

    return $p;
}

sub session {
    my ($sock, $n) = @_;

    $SIG{PIPE} = 'IGNORE';

    my $dir = $o{dir};
    my $seen_helo = 0;
    my $tls = 0;
    my $first_line = 1;
    my $refused = 0;
    my $in_data = 0;
    my $data = '';
    my $data_scan = 0;
    my $data_bytes = 0;
    my $msg_no = 0;
    my @rcpts;
    my $mail = 0;
    my $buf = '';
    my $closing = 0;
    my $frozen = 0;
    my $bdat;           # the chunk being read: { n, left, last, skip }
    my $bdat_tx = 0;
    my $bdat_msg = '';

    # what this connection does, from the options or --chaos
    my %act = %cli_act;
    my $stall = $o{stall};
    my $greeting = $o{greeting};
    my $pause_ms = $o{'pause-after-354'};
    my ($e_ms, $e_text, $e_close_ms) = ($early_ms, $early_text, undef);
    my $extra = $o{'starttls-extra'};
    my $delay_read = $o{'delay-read'};
    my $bytewise = defined $o{'byte-by-byte'} ? ($o{'byte-by-byte'} || 1)
        : 0;
    my ($paused_until, $early_at, $early_close_at, $early_sent) = (0, 0, 0, 0);

    $greeting = $greeting_later
        if defined $greeting_from && $n >= $greeting_from;

    open my $raw, '>>', "$dir/conn-$n.raw" or die "raw: $!\n";
    binmode $raw;
    open my $log, '>>', "$dir/conn-$n.log" or die "log: $!\n";
    binmode $log;
    $log->autoflush(1);

    my $note = sub { print $log "* $_[0]\n"; };

    if (defined $o{chaos}) {
        my $p = chaos_plan($o{chaos}, $n, $o{tls} ? 1 : 0);
        if (!$p) {
            $note->('chaos none');
        } else {
            $note->("chaos $p->{step} $p->{action} " . join ' ',
                map { "$_=$p->{$_}" } grep { !/^(step|action)$/ }
                sort keys %$p);
            my $a = $p->{action};
            if ($a eq 'early') {
                $e_ms = $p->{ms};
                $e_text = "$p->{code} " . substr($p->{code}, 0, 1)
                    . '.0.0 early reply';
                $e_close_ms = $p->{close_ms};
            } elsif ($a eq 'rcvbuf') {
                setsockopt($sock, SOL_SOCKET, SO_RCVBUF, 2048);
                $pause_ms = $p->{pause};
                $delay_read = $p->{delay};
            } elsif ($a eq 'stall' && $p->{step} eq 'body') {
                $pause_ms = $p->{pause};
                $stall = 'dot';
            } elsif ($a eq 'extra') {
                $extra = $p->{text};
            } else {
                $act{ $p->{step} } = $p;
            }
        }
    }

    my $write = sub {
        my ($out) = @_;
        my $off = 0;
        while ($off < length $out) {
            my $w = syswrite($sock, $out, length($out) - $off, $off);
            if (!defined $w) {
                next if $!{EINTR};
                $closing = 1;
                return 0;
            }
            $off += $w;
        }
        return 1;
    };

    # raw reply bytes, maybe in two pieces or one octet at a time
    my $send_raw = sub {
        my ($out, $how) = @_;
        return if $frozen;
        for my $l (split /\r\n/, $out) {
            print $log "< $l\n";
        }
        $how //= $bytewise ? { action => 'bytes', gap => $bytewise } : undef;
        if ($how && $how->{action} eq 'bytes') {
            setsockopt($sock, IPPROTO_TCP, TCP_NODELAY, 1);
            for my $i (0 .. length($out) - 1) {
                return unless $write->(substr($out, $i, 1));
                sleep(($how->{gap} || 1) / 1000);
            }
            return;
        }
        if ($how && $how->{action} eq 'partial' && length $out > 1) {
            my $k = $how->{split} < length $out ? $how->{split}
                : length($out) - 1;
            setsockopt($sock, IPPROTO_TCP, TCP_NODELAY, 1);
            return unless $write->(substr($out, 0, $k));
            sleep($how->{gap} / 1000);
            $write->(substr($out, $k));
            return;
        }
        $write->($out);
    };

    my $send = sub { $send_raw->(reply_text($_[0])); };

    my $finish = sub {
        $note->('closed');
        close $raw;
        close $sock;
        open my $fh, '>', "$dir/conn-$n.closed";
        close $fh;
        close $log;
        exit 0;
    };

    my $reset = sub {
        $note->('reset');
        setsockopt($sock, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
        $finish->();
    };

    # a multiline reply that never ends (bounded: 8 MB, 30 s)
    my $endless = sub {
        my ($code) = @_;
        my $lines = 0;
        eval {
            local $SIG{ALRM} = sub { die "alarm\n" };
            alarm 30;
            my $sent = 0;
            while ($sent < 8 * 1024 * 1024) {
                my $l = "$code-endless line " . ++$lines . ' '
                    . ('z' x 60) . "\r\n";
                last unless $write->($l);
                $sent += length $l;
            }
            alarm 0;
        };
        $note->("endless reply, $lines lines");
    };

    # the reply to STEP, or what this connection does instead; false when
    # nothing was sent
    my $answer = sub {
        my ($step, $text) = @_;
        my $a = delete $act{$step};
        if (!$a) {
            $send->($text);
            return 1;
        }
        my $x = $a->{action};
        $note->("$x at $step");
        $finish->() if $x eq 'close';
        $reset->() if $x eq 'rst';
        if ($x eq 'stall') {
            $frozen = 1;
            return 0;
        }
        my $out = reply_text($text);
        my ($code) = $out =~ /^(\d{3})/;
        $code //= '250';
        if ($x eq 'endless') {
            $endless->($code);
            $finish->();
        }
        if ($x eq 'lines') {
            $out = lines_reply($a->{code} // $code, $a->{n}, $a->{len});
        }
        $send_raw->($out, $x eq 'lines' ? undef : $a);
        return 1;
    };

    if ($stall eq 'greeting') {
        $note->('stall greeting');
    } else {
        $answer->('greeting', $greeting);
        if ($greeting =~ /^4/) {
            $finish->();
        }
        $refused = 1 if $greeting =~ /^5/;
    }

    $finish->() if $o{'close-after-greeting'};

    my $stalled = sub {
        my ($step) = @_;
        return 0 unless $stall eq $step;
        $note->("stall $step");
        $frozen = 1;
        return 1;
    };

    my $end_data = sub {
        my ($body) = @_;
        $msg_no++;
        open my $fh, '>', "$dir/msg-$n-$msg_no.eml.tmp" or die "msg: $!\n";
        binmode $fh;
        print $fh $body;
        close $fh;
        rename "$dir/msg-$n-$msg_no.eml.tmp", "$dir/msg-$n-$msg_no.eml";
        $note->("message $msg_no, " . length($body) . " octets");
        $note->('dot after early reply') if $early_sent;
        $mail = 0;
        @rcpts = ();
        $bdat_tx = 0;
        ($paused_until, $early_at, $early_sent) = (0, 0, 0);
        return if $stalled->('dot');
        my $r = $o{'dot-reply'};
        $r =~ s/%N/$n-$msg_no/g;
        $answer->('dot', $r);
    };

    # $data starts with a virtual "\r\n" (the DATA line's own CRLF);
    # returns (start, end) of the end-of-data mark in $data, -1 if none
    # yet, -2 if a lenient mark might still grow
    my $find_end = sub {
        if ($o{'lenient-dot'}) {
            pos($data) = $data_scan;
            if ($data =~ /(\r\n|\n|\r)\.(\r\n|\n|\r)/g) {
                my ($s, $e, $t) = ($-[0], $+[0], $2);
                # "\r" at the end of input may still become "\r\n"
                return -2 if $t eq "\r" && $e == length $data;
                return ($s, $e, length $1);
            }
            $data_scan = length($data) > 3 ? length($data) - 3 : 0;
            return -1;
        }
        my $i = index($data, "\r\n.\r\n", $data_scan);
        if ($i < 0) {
            $data_scan = length($data) > 4 ? length($data) - 4 : 0;
            return -1;
        }
        return ($i, $i + 5, 2);
    };

    my $command = sub {
        my ($line) = @_;
        print $log "> $line\n";

        if ($first_line && $line =~ /^PROXY /) {
            $first_line = 0;
            $note->('proxy header');
            return;
        }
        $first_line = 0;

        my ($verb, $arg) = $line =~ /^(\S*)\s*(.*)$/s;
        $verb = uc($verb // '');

        if ($verb eq 'QUIT') {
            $send->('221 2.0.0 Bye');
            $finish->();
        }

        if ($refused) {
            $send->('503 5.5.1 Error: service refused');
            return;
        }

        if ($verb eq 'EHLO' || $verb eq 'HELO') {
            return if $stalled->('ehlo');
            if ($verb eq 'EHLO' && defined $o{'ehlo-reply'}) {
                $answer->('ehlo', $o{'ehlo-reply'});
                return if $o{'ehlo-reply'} !~ /^2/;
            } elsif ($verb eq 'HELO') {
                $answer->('ehlo', '250 backend');
            } else {
                my @caps = grep { length } split /,/, $o{caps};
                push @caps, 'STARTTLS' if $o{tls} && !$tls;
                my @l = ('backend', @caps);
                my $r = '';
                for my $i (0 .. $#l) {
                    $r .= '250' . ($i == $#l ? ' ' : '-') . $l[$i];
                    $r .= '\n' if $i != $#l;
                }
                $answer->('ehlo', $r);
            }
            $seen_helo = 1;
            $mail = 0;
            @rcpts = ();
            return;
        }

        if ($verb eq 'XCLIENT') {
            return if $stalled->('xclient');
            $note->("xclient $arg");
            $answer->('xclient', $o{'xclient-reply'});
            if ($o{'xclient-reply'} =~ /^2/) {
                $seen_helo = 0;
                $mail = 0;
                @rcpts = ();
            }
            return;
        }

        if ($verb eq 'STARTTLS' && $o{tls} && !$tls) {
            return if $stalled->('starttls');
            my $r = '220 2.0.0 Ready to start TLS';
            if (defined $extra) {
                # the injection: in the same write as the 220
                $note->('starttls extra');
                $send_raw->(reply_text($r) . reply_text($extra));
            } else {
                $answer->('starttls', $r) or return;
            }
            $note->('tls handshake');
            my $ok = IO::Socket::SSL->start_SSL($sock,
                SSL_server => 1,
                SSL_cert_file => $cert,
                SSL_key_file => $key,
                Timeout => 10,
                @tls_ctx,
                ($o{'tls-client-ca'} ? (
                    SSL_ca_file => $o{'tls-client-ca'},
                    SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_PEER()
                        | IO::Socket::SSL::SSL_VERIFY_FAIL_IF_NO_PEER_CERT(),
                ) : ()),
            );
            if (!$ok) {
                $note->("tls failed: " . IO::Socket::SSL::errstr());
                $finish->();
            }
            if ($o{'tls-info'}) {
                $note->('tls sni ' . ($sock->get_servername() // '-'));
                $note->('tls client '
                    . ($sock->peer_certificate('subject') // '-'));
                $note->('tls reused '
                    . ($sock->get_session_reused() ? 1 : 0));
            }
            $tls = 1;
            $seen_helo = 0;
            $mail = 0;
            @rcpts = ();
            $buf = '';
            return;
        }

        if ($verb eq 'MAIL') {
            return if $stalled->('mail');
            if (!$seen_helo) {
                $send->('503 5.5.1 Error: send HELO/EHLO first');
            } elsif ($mail) {
                $send->('503 5.5.1 Error: nested MAIL command');
            } else {
                $answer->('mail', $o{'mail-reply'});
                $mail = 1 if $o{'mail-reply'} =~ /^2/
                    && (($cli_act{mail} // {})->{code} // '') !~ /^[45]/;
            }
            return;
        }

        if ($verb eq 'RCPT') {
            return if $stalled->('rcpt');
            if (!$mail) {
                $send->('503 5.5.1 Error: need MAIL command');
                return;
            }
            my $r = $o{'rcpt-reply'};
            for my $rule (@rcpt_rules) {
                if ($line =~ $rule->[0]) {
                    $r = $rule->[1];
                    last;
                }
            }
            $answer->('rcpt', $r);
            push @rcpts, $arg if $r =~ /^2/
                && (($cli_act{rcpt} // {})->{code} // '') !~ /^[45]/;
            return;
        }

        if ($verb eq 'DATA') {
            return if $stalled->('data');
            if (!$mail) {
                $send->('503 5.5.1 Error: need MAIL command');
            } elsif (!@rcpts) {
                $send->('554 5.5.1 Error: no valid recipients');
            } else {
                $answer->('data', $o{'data-reply'}) or return;
                if ($o{'data-reply'} =~ /^3/) {
                    $in_data = 1;
                    $data = "\r\n";
                    $data_scan = 0;
                    $data_bytes = 0;
                    $note->('data');
                    if ($pause_ms) {
                        $paused_until = time + $pause_ms / 1000;
                        $note->("pause $pause_ms ms");
                    }
                    $early_at = time + $e_ms / 1000 if defined $e_ms;
                }
            }
            return;
        }

        if ($verb eq 'BDAT') {
            my ($size, $last) = $arg =~ /^(\d+)(?:\s+(LAST))?\s*$/i;
            if (!defined $size) {
                $send->('501 5.5.4 Syntax: BDAT size [LAST]');
                return;
            }
            if (!$mail || !@rcpts) {
                $bdat = { n => $size, left => $size, skip => 1 };
                $send->($mail ? '554 5.5.1 Error: no valid recipients'
                    : '503 5.5.1 Error: need MAIL command');
                return;
            }
            if (!$bdat_tx) {
                $bdat_tx = 1;
                $bdat_msg = '';
                $data_bytes = 0;
                $note->('bdat');
            }
            $bdat = { n => $size, left => $size, last => $last ? 1 : 0 };
            return;
        }

        if ($verb eq 'RSET') {
            return if $stalled->('rset');
            $bdat_tx = 0;
            $mail = 0;
            @rcpts = ();
            $answer->('rset', $o{'rset-reply'});
            return;
        }

        if ($verb eq 'NOOP') {
            $send->('250 2.0.0 Ok');
            return;
        }

        if ($verb eq 'VRFY') {
            $send->('252 2.0.0 Send some mail, I will try my best');
            return;
        }

        $send->('502 5.5.2 Error: command not recognized');
    };

    # the protocol loop: consume $buf
    my $process = sub {
        for (;;) {
            if ($bdat) {
                my $take = length $buf;
                $take = $bdat->{left} if $take > $bdat->{left};
                my $limit = $o{'close-in-data-after'};
                if (!$bdat->{skip} && defined $limit
                    && $take > $limit - $data_bytes)
                {
                    $take = $limit - $data_bytes;
                }
                my $part = substr($buf, 0, $take, '');
                $bdat->{left} -= $take;
                if (!$bdat->{skip}) {
                    $bdat_msg .= $part;
                    $data_bytes += $take;
                    if ($act{body} && $data_bytes > 0) {
                        my $a = delete $act{body};
                        $note->("$a->{action} at body after $data_bytes");
                        $reset->() if $a->{action} eq 'rst';
                        $finish->() if $a->{action} eq 'close';
                        $frozen = 1 if $a->{action} eq 'stall';
                    }
                    if (defined $limit && $data_bytes >= $limit
                        && $bdat->{left} > 0)
                    {
                        $note->("close in data after $data_bytes");
                        $finish->();
                    }
                }
                return if $bdat->{left} > 0;
                my $b = $bdat;
                $bdat = undef;
                next if $b->{skip};
                $note->("chunk $b->{n}" . ($b->{last} ? ' last' : ''));
                if (defined $o{'bdat-chunk-reply'}) {
                    # --bdat-chunk-reply TEXT: every chunk of a BDAT
                    # message is refused with TEXT; no message is stored
                    $bdat_msg = '' if $b->{last};
                    $send->($o{'bdat-chunk-reply'});
                } elsif ($b->{last}) {
                    my $m = $bdat_msg;
                    $bdat_msg = '';
                    $end_data->($m);
                } else {
                    $send->("250 2.0.0 $b->{n} octets received");
                }
                next;
            }

            if ($in_data) {
                my $take = length $buf;
                if (defined $o{'close-in-data-after'}) {
                    my $left = $o{'close-in-data-after'} - $data_bytes;
                    $take = $left if $take > $left;
                }
                $data .= substr($buf, 0, $take, '');
                $data_bytes += $take;

                if ($act{body} && $data_bytes > 0) {
                    my $a = delete $act{body};
                    $note->("$a->{action} at body after $data_bytes");
                    $reset->() if $a->{action} eq 'rst';
                    $finish->() if $a->{action} eq 'close';
                    $frozen = 1 if $a->{action} eq 'stall';
                }

                my ($s, $e, $t1) = $find_end->();

                if ($s == -2) {
                    return;
                }

                if ($s < 0) {
                    if (defined $o{'close-in-data-after'}
                        && $data_bytes >= $o{'close-in-data-after'})
                    {
                        $note->("close in data after $data_bytes");
                        $finish->();
                    }
                    return;
                }

                # the message keeps the line end before the dot
                my $blen = $s + $t1 - 2;
                my $body = $blen > 0 ? substr($data, 2, $blen) : '';
                $buf = substr($data, $e) . $buf;
                $in_data = 0;
                $data = '';
                $end_data->($body);
                next;
            }

            my $i = index($buf, "\n");
            return if $i < 0;
            my $line = substr($buf, 0, $i + 1, '');
            $line =~ s/\r?\n\z//;
            $command->($line);
            return if $closing;
        }
    };

    my $read_size = $o{'read-size'};

    # true when the socket has input within $t seconds
    my $readable = sub {
        my ($t) = @_;
        return 1 if $sock->can('pending') && $sock->pending();
        my $rin = '';
        vec($rin, fileno($sock), 1) = 1;
        return select(my $rout = $rin, undef, undef, $t) > 0;
    };

    while (!$closing) {
        my $now = time;

        if ($early_at && $now >= $early_at) {
            $early_at = 0;
            $early_sent = 1;
            $note->('early reply');
            $send->($e_text);
            $early_close_at = $now + $e_close_ms / 1000 if defined $e_close_ms;
            next;
        }

        if ($early_close_at && $now >= $early_close_at) {
            $note->('close after early reply');
            $finish->();
        }

        my ($wake) = sort { $a <=> $b } grep { $_ } $early_at, $early_close_at;

        if ($paused_until) {
            if ($now < $paused_until) {
                my $until = $wake && $wake < $paused_until ? $wake
                    : $paused_until;
                sleep($until - $now);
                next;
            }
            $paused_until = 0;
            $note->('resume reading');
        }

        if ($wake) {
            next unless $readable->($wake > $now ? $wake - $now : 0);
        }

        sleep($delay_read / 1000) if $delay_read;

        my $chunk;
        my $r = sysread($sock, $chunk, $read_size);
        if (!defined $r) {
            next if $!{EINTR};
            last;
        }
        last if $r == 0;

        print $raw $chunk;
        $raw->flush();

        $buf .= $chunk;
        $process->();
    }

    if ($in_data) {
        $note->("eof in data after $data_bytes");
    }

    $finish->();
}
