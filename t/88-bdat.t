#!/usr/bin/perl

# SPEC 12: CHUNKING.  BDAT n [LAST] relayed as BDAT to a backend that
# lists CHUNKING and as dot-stuffed DATA to one that does not; the exact
# octets at the backend, the replies, pipelining, the size limit, bare
# LF in reject mode, refused chunks, a backend that dies in a chunk.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());

my $caps = 'PIPELINING,SIZE 10485760,8BITMIME,ENHANCEDSTATUSCODES';
my $ck = "$caps,CHUNKING";

my %b;
$b{ck} = start_backend(name => 'b_ck', args => ['--caps', $ck]);
$b{pl} = start_backend(name => 'b_pl', args => ['--caps', $caps]);
$b{rck} = start_backend(name => 'b_rck', args => ['--caps', $ck]);
$b{rpl} = start_backend(name => 'b_rpl', args => ['--caps', $caps]);
$b{sck} = start_backend(name => 'b_sck', args => ['--caps', $ck]);
$b{spl} = start_backend(name => 'b_spl', args => ['--caps', $caps]);
$b{dck} = start_backend(name => 'b_dck',
    args => ['--caps', $ck, '--close-in-data-after', 10]);
$b{dpl} = start_backend(name => 'b_dpl',
    args => ['--caps', $caps, '--close-in-data-after', 10]);
$b{off} = start_backend(name => 'b_off', args => ['--caps', $ck]);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    timeout 5s;

    server {
        listen 127.0.0.1:%%PORT_ck%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_ck%%;
    }
    server {
        listen 127.0.0.1:%%PORT_pl%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_pl%%;
    }
    server {
        listen 127.0.0.1:%%PORT_rck%%;
        protocol smtp_ext;
        smtp_ext_bare_lf reject;
        smtp_ext_pass 127.0.0.1:%%PORT_b_rck%%;
    }
    server {
        listen 127.0.0.1:%%PORT_rpl%%;
        protocol smtp_ext;
        smtp_ext_bare_lf reject;
        smtp_ext_pass 127.0.0.1:%%PORT_b_rpl%%;
    }
    server {
        listen 127.0.0.1:%%PORT_sck%%;
        protocol smtp_ext;
        smtp_ext_max_message_size 100;
        smtp_ext_pass 127.0.0.1:%%PORT_b_sck%%;
    }
    server {
        listen 127.0.0.1:%%PORT_spl%%;
        protocol smtp_ext;
        smtp_ext_max_message_size 100;
        smtp_ext_pass 127.0.0.1:%%PORT_b_spl%%;
    }
    server {
        listen 127.0.0.1:%%PORT_dck%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_dck%%;
    }
    server {
        listen 127.0.0.1:%%PORT_dpl%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_dpl%%;
    }
    server {
        listen 127.0.0.1:%%PORT_off%%;
        protocol smtp_ext;
        smtp_ext_chunking off;
        smtp_ext_pass 127.0.0.1:%%PORT_b_off%%;
    }
}
EOF

sub session {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /, "$port: greeting");
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

sub envelope {
    my ($c) = @_;
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 /);
}

# the backend's bytes after the envelope of connection N
sub after_rcpt {
    my ($b, $n) = @_;
    my $raw = $b->raw($n) // '';
    $raw =~ s/\A.*?RCPT TO:<c\@d\.test>\r\n//s;
    return $raw;
}

my $ok = qr/^250 2\.0\.0 Ok: queued as /;

# three chunks: a leading dot, "\r\n.\r\n" inside one, a smuggling
# attempt "\n.\r\n" across the last

my @ch = ("Subject: t\r\n\r\n.line\r\n", "a\r\n.\r\nb", "\n.\r\nend\r\n");
my $dotted = "Subject: t\r\n\r\n..line\r\na\r\n..\r\nb\r\n..\r\nend\r\n";

for my $k ('ck', 'pl') {
    my $c = session($k);
    like($c->last_reply, qr/^250-CHUNKING\r$/m, "$k: EHLO lists CHUNKING");
    unlike($c->last_reply, qr/BINARYMIME/, "$k: no BINARYMIME");
    envelope($c);
    my $l = length $ch[0];
    $c->send("BDAT $l\r\n$ch[0]");
    $c->expect(qr/^250 2\.0\.0 $l octets received\r\n\z/,
        "$k: chunk 1: 250 $l octets received");
    $l = length $ch[1];
    $c->send("BDAT $l\r\n$ch[1]");
    $c->expect(qr/^250 2\.0\.0 $l octets received\r\n\z/,
        "$k: chunk 2, holding CRLF.CRLF: 250");
    $l = length $ch[2];
    $c->send("BDAT $l LAST\r\n$ch[2]");
    $c->expect(qr/^250 2\.0\.0 Ok: queued as 1-1\r\n\z/,
        "$k: LAST gets the backend's final reply");

    # no CRLF at the end; BDAT 0 LAST
    envelope($c);
    $c->send("BDAT 3\r\nabc");
    $c->expect(qr/^250 2\.0\.0 3 octets received/, "$k: BDAT 3");
    $c->send("BDAT 0 LAST\r\n");
    $c->expect(qr/^250 2\.0\.0 Ok: queued as 1-2\r\n\z/,
        "$k: BDAT 0 LAST: the final reply");
    $c->cmd('QUIT', qr/^221 /);
    ok($b{$k}->wait_closed(1), "$k: backend closed");
}

is(after_rcpt($b{ck}, 1),
    "BDAT " . length($ch[0]) . "\r\n$ch[0]"
    . "BDAT " . length($ch[1]) . "\r\n$ch[1]"
    . "BDAT " . length($ch[2]) . " LAST\r\n$ch[2]"
    . "MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\n"
    . "BDAT 3\r\nabcBDAT 0 LAST\r\nQUIT\r\n",
    'CHUNKING backend: one BDAT per chunk, octets unchanged');
is_deeply([$b{ck}->messages], [join('', @ch), 'abc'],
    'CHUNKING backend: the messages');

is(after_rcpt($b{pl}, 1),
    "DATA\r\n$dotted.\r\n"
    . "MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\n"
    . "DATA\r\nabc\r\n.\r\nQUIT\r\n",
    'DATA backend: dot-stuffed, CRLF line ends, CRLF.CRLF only at the end');
is_deeply([$b{pl}->messages], [$dotted, "abc\r\n"],
    'DATA backend: one message each, none ended early');
unlike(join("\n", $b{pl}->commands(1)), qr/^(?:end|b|\.)/m,
    'DATA backend: no chunk octet taken as a command');

# several chunks pipelined in one write, with the envelope and QUIT

for my $k ('ck', 'pl') {
    my $c = session($k);
    $c->send("MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\n"
        . "BDAT 4\r\nab\r\nBDAT 6\r\nRSET\r\nBDAT 5 LAST\r\nQUIT\r"
        . "NOOP\r\nQUIT\r\n");
    $c->expect(qr/^250 2\.1\.0 /, "$k pipelined: MAIL");
    $c->expect(qr/^250 2\.1\.5 /, "$k pipelined: RCPT");
    $c->expect(qr/^250 2\.0\.0 4 octets received/, "$k pipelined: chunk 1");
    $c->expect(qr/^250 2\.0\.0 6 octets received/, "$k pipelined: chunk 2");
    $c->expect(qr/^250 2\.0\.0 Ok: queued as 2-1/, "$k pipelined: LAST");
    $c->expect(qr/^250 2\.0\.0 Ok\r\n\z/, "$k pipelined: NOOP after it");
    $c->expect(qr/^221 /, "$k pipelined: QUIT");
}
is(($b{ck}->messages)[2], "ab\r\nRSET\r\nQUIT\r",
    'pipelined, CHUNKING: chunk octets that look like commands are data');
is(($b{pl}->messages)[2], "ab\r\nRSET\r\nQUIT\r\n",
    'pipelined, DATA: the same, the bare CR at the end made CRLF');

# DATA after BDAT: 503, the client must RSET; nothing is ended

for my $k ('ck', 'pl') {
    my $c = session($k);
    envelope($c);
    $c->send("BDAT 5\r\nhello");
    $c->expect(qr/^250 2\.0\.0 5 octets received/);
    $c->cmd('DATA', qr/^503 5\.5\.1 /, "$k: DATA after BDAT: 503 5.5.1");
    $c->cmd('RCPT TO:<e@d.test>', qr/^503 5\.5\.1 /,
        "$k: RCPT after BDAT: 503 5.5.1");
    $c->cmd('RSET', qr/^250 /, "$k: RSET");
    envelope($c);
    $c->send("BDAT 2 LAST\r\nok");
    $c->expect($ok, "$k: a new transaction after RSET");
    $c->cmd('QUIT', qr/^221 /);
}
ok($b{ck}->wait_closed(3) && $b{pl}->wait_closed(3), 'backends closed');
is_deeply([($b{ck}->messages)[3 .. 3]], ['ok'],
    'CHUNKING: the abandoned message never got LAST');
unlike($b{ck}->raw(3), qr/hello.*LAST/s, 'no LAST after the dropped chunk');
is_deeply([($b{pl}->messages)[3 .. 3]], ["ok\r\n"],
    'DATA: the abandoned message never got its dot');

# BDAT refused: before MAIL, before RCPT; its octets are dropped

{
    my $c = session('ck');
    $c->send("BDAT 12\r\nQUIT\r\nRSET\r\nNOOP\r\n");
    $c->expect(qr/^503 5\.5\.1 Need MAIL before BDAT/, 'BDAT before MAIL: 503');
    $c->expect(qr/^250 2\.0\.0 Ok\r\n\z/, 'its 12 octets dropped, not run');
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
    $c->send("BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n");
    $c->expect(qr/^503 5\.5\.1 Need RCPT before BDAT/,
        'BDAT before an accepted RCPT: 503');
    $c->expect(qr/^250 2\.0\.0 Ok\r\n\z/, 'its octets dropped too');
    $c->cmd('BDAT 1x', qr/^421 4\.5\.4 /,
        'BDAT with a bad size: 421, its end is unknown');
    ok($c->closed(3), 'BDAT with a bad size: the session is closed');
}

# chunking off: 502, not listed, octets dropped

{
    my $c = session('off');
    unlike($c->last_reply, qr/CHUNKING/, 'off: EHLO does not list CHUNKING');
    envelope($c);
    $c->send("BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n");
    $c->expect(qr/^502 5\.5\.1 /, 'off: BDAT gets 502');
    $c->expect(qr/^250 2\.0\.0 Ok\r\n\z/, 'off: its octets dropped');
    $c->cmd('QUIT', qr/^221 /);
}

# the size limit: chunks before LAST get 250, LAST 552; nothing ended

for my $k ('sck', 'spl') {
    my $c = session($k);
    envelope($c);
    my $x = ('x' x 58) . "\r\n";
    $c->send("BDAT 60\r\n$x");
    $c->expect(qr/^250 2\.0\.0 60 octets received/, "$k: 60 octets: 250");
    $c->send("BDAT 60\r\n$x");
    $c->expect(qr/^250 2\.0\.0 60 octets received/,
        "$k: past the limit, still 250");
    $c->send("BDAT 2 LAST\r\n\r\n");
    $c->expect(qr/^552 5\.3\.4 /, "$k: LAST over the limit: 552 5.3.4");
    envelope($c);
    $c->send("BDAT 98\r\n" . ('y' x 96) . "\r\nBDAT 2 LAST\r\nzz");
    $c->expect(qr/^250 2\.0\.0 98 octets/);
    $c->expect($ok, "$k: exactly 100 octets pass");
    $c->cmd('QUIT', qr/^221 /);
}
is_deeply([$b{sck}->messages], [('y' x 96) . "\r\nzz"],
    'CHUNKING: no message over the limit at the backend');
is(scalar(() = ($b{sck}->raw(1) // '') =~ /BDAT 60\r\n/g), 1,
    'CHUNKING: the chunk past the limit never went out');
is_deeply([$b{spl}->messages], [('y' x 96) . "\r\nzz\r\n"],
    'DATA: no message over the limit at the backend');

# bare LF with reject: 550 5.6.11 at LAST, no message

for my $k ('rck', 'rpl') {
    my $c = session($k);
    envelope($c);
    $c->send("BDAT 7\r\nab\ncd\r\n");
    $c->expect(qr/^250 2\.0\.0 7 octets received/, "$k: bare LF chunk: 250");
    $c->send("BDAT 3 LAST\r\nxyz");
    $c->expect(qr/^550 5\.6\.11 /, "$k: LAST: 550 5.6.11");
    envelope($c);
    $c->send("BDAT 6 LAST\r\nab\r\nc\n");
    $c->expect(qr/^550 5\.6\.11 /, "$k: a bare LF in the LAST chunk: 550");
    envelope($c);
    $c->send("BDAT 4 LAST\r\nab\r\r");
    $c->expect(qr/^550 5\.6\.11 /, "$k: bare CRs at the end: 550");
    envelope($c);
    $c->send("BDAT 3 LAST\r\nab\r");
    $c->expect(qr/^550 5\.6\.11 /, "$k: a message ending in CR: 550");
    envelope($c);
    $c->send("BDAT 5 LAST\r\n.a\r\nb");
    $c->expect($ok, "$k: a clean message passes");
    $c->cmd('QUIT', qr/^221 /);
}
is_deeply([$b{rck}->messages], [".a\r\nb"],
    'reject, CHUNKING: only the clean message');
like($b{rck}->raw(5) // '',
    qr/BDAT 5\r\n\.a\r\nbBDAT 0 LAST\r\n/,
    'reject, CHUNKING: LAST in a chunk of its own after the check');
unlike(join('', map { $b{rck}->raw($_) // '' } 1 .. 5),
    qr/ab\ncd\r\n.*LAST|BDAT 6 LAST|BDAT 4 LAST/s,
    'reject, CHUNKING: no LAST for a message with a bare CR or LF');
is_deeply([$b{rpl}->messages], ["..a\r\nb\r\n"],
    'reject, DATA: only the clean message');

# a backend that dies in a chunk: 250 before LAST, 451 at LAST, the
# session goes on

for my $k ('dck', 'dpl') {
    my $c = session($k);
    envelope($c);
    $c->send("BDAT 40\r\n" . ('z' x 38) . "\r\n");
    $c->expect(qr/^250 2\.0\.0 40 octets received/, "$k: chunk: 250");
    $c->send("BDAT 40 LAST\r\n" . ('z' x 38) . "\r\n");
    $c->expect(qr/^451 4\.4\.2 /, "$k: LAST: 451 4.4.2");
    $c->cmd('NOOP', qr/^250 /, "$k: the session goes on");
    envelope($c);
    $c->cmd('RSET', qr/^250 /);
    $c->cmd('QUIT', qr/^221 /);
    is(scalar($b{$k}->messages), 0, "$k: no message at the backend");
}

# 100 KiB in 16 KiB chunks: streamed, zero-copy and copied paths

{
    my $body = '';
    my $i = 0;
    $body .= sprintf(".%05d %s\r\n", $i++, 'm' x 70) while length $body < 102400;
    $body = substr($body, 0, 102400);
    for my $k ('ck', 'pl') {
        my $c = session($k);
        envelope($c);
        my $out = '';
        my $nch = 0;
        for (my $off = 0; $off < length $body; $off += 16384) {
            my $part = substr($body, $off, 16384);
            my $last = $off + 16384 >= length $body ? ' LAST' : '';
            $out .= 'BDAT ' . length($part) . "$last\r\n$part";
            $nch++;
        }
        $c->send($out);
        my $good = 0;
        for my $j (1 .. $nch) {
            my $r = $c->reply(10) // '';
            $good++ if $j < $nch ? $r =~ /^250 2\.0\.0 16384 octets/
                : $r =~ $ok;
        }
        is($good, $nch, "$k: 100 KiB in $nch pipelined chunks: all replies");
        $c->cmd('QUIT', qr/^221 /);
        ok($b{$k}->wait_closed(scalar $b{$k}->connections), "$k: closed");
    }
    my $stuffed = $body =~ s/(^|\r\n)\./$1../gr;
    $stuffed .= "\r\n" if $stuffed !~ /\r\n\z/;
    is((grep { $_ eq $body } $b{ck}->messages), 1,
        'CHUNKING: 100 KiB message intact');
    is((grep { $_ eq "$stuffed" } $b{pl}->messages), 1,
        'DATA: 100 KiB message intact, dot-stuffed');
}

like($n->error_log, qr/\bsize=102400\b/, 'the log line has the size');
unlike($n->error_log, qr/\[alert\]|\[crit\]/, 'no alerts');

done_testing();
