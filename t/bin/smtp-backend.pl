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
#                       of the message)
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
use Time::HiRes qw(sleep);

my %o = (
    greeting => '220 backend ESMTP',
    caps => 'PIPELINING,SIZE 10485760,8BITMIME,SMTPUTF8,ENHANCEDSTATUSCODES,'
        . 'XCLIENT NAME ADDR PORT PROTO HELO LOGIN',
    'mail-reply' => '250 2.1.0 Ok',
    'rcpt-reply' => '250 2.1.5 Ok',
    'data-reply' => '354 End data with <CR><LF>.<CR><LF>',
    'dot-reply' => '250 2.0.0 Ok: queued as %N',
    'xclient-reply' => '220 backend ESMTP',
    'read-size' => 16384,
    stall => '',
    rcpt => [],
);

GetOptions(\%o, 'port=i', 'dir=s', 'pidfile=s', 'greeting=s', 'caps=s',
    'ehlo-reply=s', 'mail-reply=s', 'rcpt-reply=s', 'rcpt=s@',
    'data-reply=s', 'dot-reply=s', 'xclient-reply=s',
    'close-after-greeting', 'close-in-data-after=i', 'stall=s',
    'delay-read=i', 'read-size=i', 'lenient-dot', 'tls=s')
    or die "bad options\n";

die "--port and --dir are required\n" unless $o{port} && $o{dir};

my @rcpt_rules;
for my $r (@{ $o{rcpt} }) {
    my ($re, $reply) = $r =~ /^(.*)=(\d{3}.*)$/
        or die "bad --rcpt '$r'\n";
    push @rcpt_rules, [qr/$re/i, $reply];
}

my ($cert, $key);
if ($o{tls}) {
    ($cert, $key) = split /,/, $o{tls};
    require IO::Socket::SSL;
}

my $listen = IO::Socket::INET->new(
    LocalAddr => '127.0.0.1',
    LocalPort => $o{port},
    Listen => 128,
    ReuseAddr => 1,
    Proto => 'tcp',
) or die "listen 127.0.0.1:$o{port}: $!\n";

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

sub session {
    my ($sock, $n) = @_;

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

    open my $raw, '>>', "$dir/conn-$n.raw" or die "raw: $!\n";
    binmode $raw;
    open my $log, '>>', "$dir/conn-$n.log" or die "log: $!\n";
    binmode $log;
    $log->autoflush(1);

    my $note = sub { print $log "* $_[0]\n"; };

    my $send = sub {
        my ($text) = @_;
        return if $frozen;
        my $out = reply_text($text);
        for my $l (split /\r\n/, $out) {
            print $log "< $l\n";
        }
        my $off = 0;
        while ($off < length $out) {
            my $w = syswrite($sock, $out, length($out) - $off, $off);
            if (!defined $w) {
                next if $!{EINTR};
                $closing = 1;
                return;
            }
            $off += $w;
        }
    };

    my $finish = sub {
        $note->('closed');
        close $raw;
        close $sock;
        open my $fh, '>', "$dir/conn-$n.closed";
        close $fh;
        close $log;
        exit 0;
    };

    if ($o{stall} eq 'greeting') {
        $note->('stall greeting');
    } else {
        $send->($o{greeting});
        if ($o{greeting} =~ /^4/) {
            $finish->();
        }
        $refused = 1 if $o{greeting} =~ /^5/;
    }

    $finish->() if $o{'close-after-greeting'};

    my $stalled = sub {
        my ($step) = @_;
        return 0 unless $o{stall} eq $step;
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
        $mail = 0;
        @rcpts = ();
        return if $stalled->('dot');
        my $r = $o{'dot-reply'};
        $r =~ s/%N/$n-$msg_no/g;
        $send->($r);
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
                $send->($o{'ehlo-reply'});
                return if $o{'ehlo-reply'} !~ /^2/;
            } elsif ($verb eq 'HELO') {
                $send->('250 backend');
            } else {
                my @caps = grep { length } split /,/, $o{caps};
                push @caps, 'STARTTLS' if $o{tls} && !$tls;
                my @l = ('backend', @caps);
                my $r = '';
                for my $i (0 .. $#l) {
                    $r .= '250' . ($i == $#l ? ' ' : '-') . $l[$i];
                    $r .= '\n' if $i != $#l;
                }
                $send->($r);
            }
            $seen_helo = 1;
            $mail = 0;
            @rcpts = ();
            return;
        }

        if ($verb eq 'XCLIENT') {
            return if $stalled->('xclient');
            $note->("xclient $arg");
            $send->($o{'xclient-reply'});
            if ($o{'xclient-reply'} =~ /^2/) {
                $seen_helo = 0;
                $mail = 0;
                @rcpts = ();
            }
            return;
        }

        if ($verb eq 'STARTTLS' && $o{tls} && !$tls) {
            $send->('220 2.0.0 Ready to start TLS');
            $note->('tls handshake');
            my $ok = IO::Socket::SSL->start_SSL($sock,
                SSL_server => 1,
                SSL_cert_file => $cert,
                SSL_key_file => $key,
            );
            if (!$ok) {
                $note->("tls failed: " . IO::Socket::SSL::errstr());
                $finish->();
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
                $send->($o{'mail-reply'});
                $mail = 1 if $o{'mail-reply'} =~ /^2/;
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
            $send->($r);
            push @rcpts, $arg if $r =~ /^2/;
            return;
        }

        if ($verb eq 'DATA') {
            return if $stalled->('data');
            if (!$mail) {
                $send->('503 5.5.1 Error: need MAIL command');
            } elsif (!@rcpts) {
                $send->('554 5.5.1 Error: no valid recipients');
            } else {
                $send->($o{'data-reply'});
                if ($o{'data-reply'} =~ /^3/) {
                    $in_data = 1;
                    $data = "\r\n";
                    $data_scan = 0;
                    $data_bytes = 0;
                    $note->('data');
                }
            }
            return;
        }

        if ($verb eq 'RSET') {
            $mail = 0;
            @rcpts = ();
            $send->('250 2.0.0 Ok');
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
            if ($in_data) {
                my $take = length $buf;
                if (defined $o{'close-in-data-after'}) {
                    my $left = $o{'close-in-data-after'} - $data_bytes;
                    $take = $left if $take > $left;
                }
                $data .= substr($buf, 0, $take, '');
                $data_bytes += $take;

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

    while (!$closing) {
        sleep($o{'delay-read'} / 1000) if $o{'delay-read'};

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
