#!/usr/bin/perl

# redis-hostile.pl - a scriptable, misbehaving RESP server for the
# ngx_mail_smtp_ext tests.
#
# Usage:
#   redis-hostile.pl --port PORT --redis-port RPORT --control FILE
#                    [--pidfile FILE] [--stream-time SECONDS]
#
# Listens on 127.0.0.1:PORT, one select loop for all clients.  For every
# command a client sends it reads the first word of FILE (the mode; a
# missing or empty file means "proxy") and answers as that mode says:
#
#   proxy        forward the command to the real Redis on 127.0.0.1:RPORT
#                (one upstream connection per client) and pass its reply
#                back: a well-behaved Redis
#   unsolicited  as proxy, plus an extra "+OK" after each reply
#   hugearray    "*2147483647", then ":1" elements streamed forever
#   hugebulk     "$104857600", then octets streamed forever
#   deep         one reply of arrays nested 20 levels
#   wide         an array of 1025 bulk strings
#   wrongtype    GET: an array of an integer and an array; HMGET: one
#                integer per field; anything else: an integer.  Never
#                the type a caller expects
#   silent       read and never answer; a connection that saw "silent"
#                stays silent (a hung server), new ones follow the mode
#   garbage      non-RESP octets
#   loading      "-LOADING Redis is loading the dataset in memory" to
#                every command, as a restarting Redis answers
#   geterr       "-ERR hostile" to GET only, the rest proxied
#   hmgeterr     "-ERR hostile" to HMGET only, the rest proxied
#   refuse       as a Redis over maxclients: "-ERR max number of clients
#                reached" unasked on connect (or as the answer), then close
#
# Streams stop after --stream-time seconds (default 10) or 256 MB, or
# when the client goes away.  Every command is logged to FILE.log as
# "MODE COMMAND".  SIGTERM stops the server.

use strict;
use warnings;

use Getopt::Long;
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw(time);
use Errno qw(EAGAIN EWOULDBLOCK EINTR);

my ($port, $rport, $control, $pidfile);
my $stream_time = 10;

GetOptions('port=i' => \$port, 'redis-port=i' => \$rport,
    'control=s' => \$control, 'pidfile=s' => \$pidfile,
    'stream-time=f' => \$stream_time) or die "bad options\n";
die "--port, --redis-port and --control are required\n"
    unless $port && $rport && $control;

my $stream_max = 256 * 1024 * 1024;

my $listen = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
    LocalPort => $port, Proto => 'tcp', Listen => 64, ReuseAddr => 1)
    or die "listen on $port: $!\n";
$listen->blocking(0);

$SIG{TERM} = sub { exit 0 };
$SIG{PIPE} = 'IGNORE';

if ($pidfile) {
    open my $fh, '>', "$pidfile.tmp" or die "$pidfile: $!\n";
    print $fh "$$\n";
    close $fh;
    rename "$pidfile.tmp", $pidfile or die "$pidfile: $!\n";
}

open my $log, '>>', "$control.log" or die "$control.log: $!\n";
$log->autoflush(1);

my %clients;    # fileno => state
my $sel = IO::Select->new($listen);

for (;;) {
    my $wsel = IO::Select->new(map { $_->{sock} }
        grep { length $_->{out} || $_->{stream} } values %clients);

    my ($r, $w) = IO::Select->select($sel, $wsel, undef, 0.5);

    for my $s (@{ $r || [] }) {
        if ($s == $listen) {
            while (my $c = $listen->accept()) {
                $c->blocking(0);
                binmode $c;
                my $cl = { sock => $c, in => '', out => '',
                    up => undef, upbuf => '', silent => 0 };
                $clients{ fileno $c } = $cl;
                $sel->add($c);
                if (mode() eq 'refuse') {
                    $cl->{out} = "-ERR max number of clients reached\r\n";
                    $cl->{close} = 1;
                    write_some($cl);
                }
            }
            next;
        }

        next unless defined fileno $s;
        my $cl = $clients{ fileno $s } or next;
        my $n = sysread($s, my $buf, 65536);
        if (!defined $n) {
            next if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
            drop($cl);
            next;
        }
        if ($n == 0) {
            drop($cl);
            next;
        }
        $cl->{in} .= $buf;
        commands($cl);
    }

    for my $s (@{ $w || [] }) {
        next unless defined fileno $s;
        my $cl = $clients{ fileno $s } or next;
        write_some($cl);
    }
}

sub drop {
    my ($cl) = @_;
    $sel->remove($cl->{sock});
    delete $clients{ fileno $cl->{sock} };
    close $cl->{sock};
    close $cl->{up} if $cl->{up};
}

sub mode {
    open my $fh, '<', $control or return 'proxy';
    my $m = <$fh> // '';
    close $fh;
    return $m =~ /^\s*(\w+)/ ? $1 : 'proxy';
}

# complete multibulk commands out of the client's input
sub commands {
    my ($cl) = @_;

    for (;;) {
        return if $cl->{close};

        my ($cmd, $raw) = parse_command(\$cl->{in});
        if (!defined $cmd) {
            if ($raw) {
                # not RESP: answer as Redis would and close
                $cl->{out} .= "-ERR Protocol error\r\n";
                $cl->{close} = 1;
            }
            return;
        }

        my $mode = mode();
        $cl->{silent} = 1 if $mode eq 'silent';
        $mode = 'silent' if $cl->{silent};
        print $log "$mode @{[ uc($cmd->[0] // '') ]}\n";

        next if $mode eq 'silent';

        # a stream never ends: nothing after it is answered
        next if $cl->{stream};

        answer($cl, $mode, $cmd, $raw);
    }
}

# returns ([args], raw) for one command, () when incomplete, (undef, 1)
# on garbage
sub parse_command {
    my ($bufref) = @_;

    return () unless length $$bufref;
    return (undef, 1) unless $$bufref =~ /^\*/;

    my $pos = 0;
    my $nl = index($$bufref, "\r\n", $pos);
    return () if $nl < 0;
    my $argc = substr($$bufref, 1, $nl - 1);
    return (undef, 1) unless $argc =~ /^\d+$/ && $argc < 1024;
    $pos = $nl + 2;

    my @args;
    for (1 .. $argc) {
        $nl = index($$bufref, "\r\n", $pos);
        return () if $nl < 0;
        my $h = substr($$bufref, $pos, $nl - $pos);
        return (undef, 1) unless $h =~ /^\$(\d+)$/ && $1 < 1048576;
        my $len = $1;
        return () if length($$bufref) < $nl + 2 + $len + 2;
        push @args, substr($$bufref, $nl + 2, $len);
        $pos = $nl + 2 + $len + 2;
    }

    my $raw = substr($$bufref, 0, $pos, '');
    return (\@args, $raw);
}

sub answer {
    my ($cl, $mode, $cmd, $raw) = @_;

    my $name = uc($cmd->[0] // '');

    if ($mode eq 'proxy' || $mode eq 'unsolicited') {
        my $reply = proxy($cl, $raw);
        $cl->{out} .= $reply;
        $cl->{out} .= "+OK\r\n" if $mode eq 'unsolicited';

    } elsif ($mode eq 'hugearray') {
        $cl->{out} .= "*2147483647\r\n";
        start_stream($cl, ":1\r\n" x 4096);

    } elsif ($mode eq 'hugebulk') {
        $cl->{out} .= "\$104857600\r\n";
        start_stream($cl, 'x' x 65536);

    } elsif ($mode eq 'deep') {
        $cl->{out} .= ("*1\r\n" x 20) . ":1\r\n";

    } elsif ($mode eq 'wide') {
        $cl->{out} .= "*1025\r\n" . ("\$1\r\nx\r\n" x 1025);

    } elsif ($mode eq 'wrongtype') {
        $cl->{out} .= $name eq 'GET' ? "*2\r\n:1\r\n*1\r\n:2\r\n"
                     : $name eq 'HMGET' ? '*' . (@$cmd - 2) . "\r\n"
                                          . (":7\r\n" x (@$cmd - 2))
                     : ":7\r\n";

    } elsif ($mode eq 'loading') {
        $cl->{out} .= "-LOADING Redis is loading the dataset in memory\r\n";

    } elsif ($mode eq 'geterr' || $mode eq 'hmgeterr') {
        # an error to one command only, the others go through
        $cl->{out} .= $name eq uc(substr($mode, 0, -3))
                      ? "-ERR hostile\r\n" : proxy($cl, $raw);

    } elsif ($mode eq 'refuse') {
        $cl->{out} .= "-ERR max number of clients reached\r\n";
        $cl->{close} = 1;

    } elsif ($mode eq 'garbage') {
        $cl->{out} .= "\x00\xff garbage \x07\r\n!!\r\n";

    } else {
        $cl->{out} .= "-ERR unknown mode $mode\r\n";
    }

    write_some($cl);
}

sub start_stream {
    my ($cl, $chunk) = @_;
    $cl->{stream} = $chunk;
    $cl->{stream_end} = time + $stream_time;
    $cl->{streamed} = 0;
}

sub write_some {
    my ($cl) = @_;

    if ($cl->{stream} && length($cl->{out}) < 65536) {
        if (time > $cl->{stream_end} || $cl->{streamed} > $stream_max) {
            $cl->{stream} = undef;
        } else {
            $cl->{out} .= $cl->{stream};
            $cl->{streamed} += length $cl->{stream};
        }
    }

    return unless length $cl->{out};

    my $n = syswrite($cl->{sock}, $cl->{out});
    if (!defined $n) {
        return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
        drop($cl);
        return;
    }
    substr($cl->{out}, 0, $n, '');

    drop($cl) if $cl->{close} && !length $cl->{out};
}

# one command to the real Redis, its raw reply back (blocking: it is local)
sub proxy {
    my ($cl, $raw) = @_;

    if (!$cl->{up}) {
        $cl->{up} = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $rport, Proto => 'tcp', Timeout => 2)
            or return "-ERR upstream: $!\r\n";
        binmode $cl->{up};
        $cl->{upbuf} = '';
    }

    my $up = $cl->{up};
    my $deadline = time + 3;
    my $reply = eval {
        syswrite($up, $raw) == length($raw) or die "write\n";
        my $pos = 0;
        reply_end($up, \$cl->{upbuf}, \$pos, $deadline);
        substr($cl->{upbuf}, 0, $pos, '');
    };

    if (!defined $reply) {
        close $up;
        $cl->{up} = undef;
        return "-ERR upstream failed\r\n";
    }

    return $reply;
}

# advances $$posref over one reply in $$bufref, reading as needed
sub reply_end {
    my ($sock, $bufref, $posref, $deadline) = @_;

    my $nl;
    while (($nl = index($$bufref, "\r\n", $$posref)) < 0) {
        upfill($sock, $bufref, $deadline);
    }

    my $t = substr($$bufref, $$posref, 1);
    my $v = substr($$bufref, $$posref + 1, $nl - $$posref - 1);
    $$posref = $nl + 2;

    if ($t eq '$' && $v >= 0) {
        upfill($sock, $bufref, $deadline)
            while length($$bufref) < $$posref + $v + 2;
        $$posref += $v + 2;

    } elsif ($t eq '*' && $v > 0) {
        reply_end($sock, $bufref, $posref, $deadline) for 1 .. $v;
    }
}

sub upfill {
    my ($sock, $bufref, $deadline) = @_;
    my $left = $deadline - time;
    die "timeout\n" if $left <= 0;
    die "timeout\n" unless IO::Select->new($sock)->can_read($left);
    my $n = sysread($sock, my $chunk, 65536);
    die "closed\n" unless $n;
    $$bufref .= $chunk;
}
