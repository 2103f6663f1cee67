#!/usr/bin/perl

# dns-server.pl - a scriptable DNS server (UDP) for the ngx_mail_smtp_ext
# tests.
#
# Usage:
#   dns-server.pl --port PORT [options]
#
# Listens on 127.0.0.1:PORT (UDP) and answers from a map given on the
# command line.  Names are compared without case and without a final dot.
#
# Options:
#   --port N              UDP port on 127.0.0.1 (required)
#   --pidfile FILE        written once the socket is bound
#   --log FILE            one line per query: "TYPE NAME -> RESULT"
#   --ptr NAME=HOST       a PTR record (repeatable; HOST may contain any
#                         byte but '.', e.g. "bad_name.example" or "x y")
#   --a NAME=IPV4         an A record (repeatable: several addresses)
#   --aaaa NAME=IPV6      an AAAA record (repeatable)
#   --nxdomain NAME       NXDOMAIN for every type (also the default for
#                         a name without records)
#   --servfail NAME       SERVFAIL for every type
#   --drop NAME           never answer queries for NAME
#   --delay NAME=MS       answer queries for NAME after MS milliseconds
#
# A query for a known name but a type without records (typically AAAA)
# gets an empty NOERROR answer.  Answers have TTL 60 and point back at the
# question's name (compression pointer 0xC00C).  SIGTERM stops the server;
# it also exits when its parent process goes away.

use strict;
use warnings;

use Getopt::Long;
use IO::Select;
use IO::Socket::INET;
use Socket qw(inet_aton inet_pton AF_INET6);
use Time::HiRes qw(time);

my %o = (ptr => [], a => [], aaaa => [], nxdomain => [], servfail => [],
    drop => [], delay => []);

GetOptions(\%o, 'port=i', 'pidfile=s', 'log=s', 'ptr=s@', 'a=s@',
    'aaaa=s@', 'nxdomain=s@', 'servfail=s@', 'drop=s@', 'delay=s@')
    or die "bad options\n";
die "--port is required\n" unless $o{port};

use constant { T_A => 1, T_PTR => 12, T_AAAA => 28 };

my %type_name = (T_A, 'A', T_PTR, 'PTR', T_AAAA, 'AAAA');

sub norm {
    my ($n) = @_;
    $n = lc $n;
    $n =~ s/\.\z//;
    return $n;
}

# records{name}{type} = [rdata, ...]; rcode{name} = 2|3; drop{name} = 1;
# delay{name} = seconds
my (%records, %rcode, %drop, %delay);

for my $r (@{ $o{delay} }) {
    my ($n, $v) = split /=/, $r, 2;
    $delay{ norm($n) } = $v / 1000;
}

for my $r (@{ $o{ptr} }) {
    my ($n, $v) = split /=/, $r, 2;
    push @{ $records{ norm($n) }{T_PTR()} }, encode_name($v);
}

for my $r (@{ $o{a} }) {
    my ($n, $v) = split /=/, $r, 2;
    my $ip = inet_aton($v) or die "bad IPv4 address $v\n";
    push @{ $records{ norm($n) }{T_A()} }, $ip;
}

for my $r (@{ $o{aaaa} }) {
    my ($n, $v) = split /=/, $r, 2;
    my $ip = inet_pton(AF_INET6, $v) or die "bad IPv6 address $v\n";
    push @{ $records{ norm($n) }{T_AAAA()} }, $ip;
}

$rcode{ norm($_) } = 3 for @{ $o{nxdomain} };
$rcode{ norm($_) } = 2 for @{ $o{servfail} };
$drop{ norm($_) } = 1 for @{ $o{drop} };

# labels without compression; "x y" stays one label
sub encode_name {
    my ($n) = @_;
    $n =~ s/\.\z//;
    my $d = '';
    for my $l (split /\./, $n) {
        die "label too long: $l\n" if length $l > 63;
        $d .= pack('C/a*', $l);
    }
    return $d . "\0";
}

my $sock = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
    LocalPort => $o{port}, Proto => 'udp')
    or die "bind 127.0.0.1:$o{port}: $!\n";

my $log;
if ($o{log}) {
    open $log, '>>', $o{log} or die "$o{log}: $!\n";
    $log->autoflush(1);
}

my $running = 1;
$SIG{TERM} = $SIG{INT} = sub { $running = 0 };

if ($o{pidfile}) {
    open my $fh, '>', "$o{pidfile}.tmp" or die "$o{pidfile}: $!\n";
    print $fh "$$\n";
    close $fh;
    rename "$o{pidfile}.tmp", $o{pidfile} or die "$o{pidfile}: $!\n";
}

my $parent = getppid();
my $sel = IO::Select->new($sock);
my @later;     # [time, response, peer] of delayed answers

while ($running) {
    # an orphan (the test died) must not linger
    last if getppid() != $parent;

    my $now = time;
    while (@later && $later[0][0] <= $now) {
        my $l = shift @later;
        $sock->send($l->[1], 0, $l->[2]);
    }

    my $wait = @later ? $later[0][0] - $now : 0.5;
    $wait = 0.5 if $wait > 0.5;
    next unless $sel->can_read($wait > 0 ? $wait : 0);

    my $peer = $sock->recv(my $q, 4096);
    next unless defined $peer && length $q >= 12;

    my ($resp, $delay) = answer($q);
    next unless defined $resp;

    if ($delay) {
        @later = sort { $a->[0] <=> $b->[0] }
            @later, [time + $delay, $resp, $peer];
    } else {
        $sock->send($resp, 0, $peer);
    }
}

unlink $o{pidfile} if $o{pidfile};
exit 0;


# the response to query $q (undef to drop it), and its delay
sub answer {
    my ($q) = @_;

    my ($id, $flags, $qd) = unpack('n n n', $q);

    # the question: labels, then type and class
    my $off = 12;
    my @labels;
    while ($off < length $q) {
        my $len = unpack('C', substr($q, $off, 1));
        $off++;
        last if $len == 0;
        return undef if $len > 63 || $off + $len > length $q;
        push @labels, substr($q, $off, $len);
        $off += $len;
    }
    return undef if $qd != 1 || $off + 4 > length $q;

    my ($qtype, $qclass) = unpack('n n', substr($q, $off, 4));
    my $question = substr($q, 12, $off + 4 - 12);
    my $name = norm(join '.', @labels);

    my $tname = $type_name{$qtype} // "TYPE$qtype";
    my ($rcode, @rr) = (0);
    my $result;

    if ($drop{$name}) {
        $result = 'drop';

    } elsif ($rcode{$name}) {
        $rcode = $rcode{$name};
        $result = $rcode == 3 ? 'NXDOMAIN' : 'SERVFAIL';

    } elsif (!$records{$name}) {
        $rcode = 3;
        $result = 'NXDOMAIN';

    } else {
        @rr = @{ $records{$name}{$qtype} || [] };
        $result = @rr ? scalar(@rr) . ' records' : 'NODATA';
    }

    print $log "$tname $name -> $result\n" if $log;

    return undef if $result eq 'drop';

    # QR, AA, the client's RD, RA, the rcode
    my $rflags = 0x8000 | 0x0400 | ($flags & 0x0100) | 0x0080 | $rcode;

    my $resp = pack('n n n n n n', $id, $rflags, 1, scalar @rr, 0, 0)
        . $question;

    for my $rdata (@rr) {
        $resp .= pack('n n n N n', 0xC00C, $qtype, 1, 60, length $rdata)
            . $rdata;
    }

    return ($resp, $delay{$name});
}
