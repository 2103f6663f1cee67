#!/usr/bin/perl

# SPEC 12 against a real peer: Postfix's smtpd as the backend.  It lists
# CHUNKING, DSN, SMTPUTF8, 8BITMIME and (for 127.0.0.1) XCLIENT, so every
# transaction goes to it as the client sent it.  Postfix hands each
# message, before it queues it, to a recording backend
# (smtpd_proxy_filter): what Postfix made of the module's BDAT chunks,
# DSN parameters and UTF-8 envelopes is read back exactly there, and the
# recording backend's final reply reaches the client through Postfix and
# the module.  Postfix's own refusals (its size limit, met inside a BDAT
# chunk) reach the client too.  Needs root: master(8) starts as root.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;

require_programs(nginx_bin());
my $why = postfix_usable();
plan(skip_all => "a private Postfix cannot run: $why") if $why;

my $f = start_backend(name => 'filter', args => ['--caps',
    'PIPELINING,SIZE 10485760,8BITMIME,SMTPUTF8,DSN,ENHANCEDSTATUSCODES']);
my $pf = start_postfix(name => 'pf', filter => $f->port, main => {
    message_size_limit => 20000,
    smtpd_authorized_xclient_hosts => '127.0.0.0/8',
});

# the same Postfix without CHUNKING, DSN, SMTPUTF8 and 8BITMIME in its
# EHLO: the module converts BDAT to DATA and refuses what it cannot pass
my $f2 = start_backend(name => 'filter2', args => ['--caps',
    'PIPELINING,SIZE 10485760,8BITMIME,SMTPUTF8,DSN,ENHANCEDSTATUSCODES']);
my $pf2 = start_postfix(name => 'pf2', filter => $f2->port, main => {
    smtpd_discard_ehlo_keywords => 'chunking, dsn, smtputf8, 8bitmime',
});

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    timeout 10s;

    server {
        listen 127.0.0.1:%%PORT_mx%%;
        protocol smtp_ext;
        smtp_ext_dsn on;
        smtp_ext_pass 127.0.0.1:%%PORT_pf%%;
    }
    server {
        listen 127.0.0.1:%%PORT_mx2%%;
        protocol smtp_ext;
        smtp_ext_dsn on;
        smtp_ext_pass 127.0.0.1:%%PORT_pf2%%;
    }
}
EOF

sub session {
    my $c = smtp_client($_[0] // 'mx');
    $c->expect(qr/^220 /, 'greeting');
    $c->cmd('EHLO client.test', qr/^250 /m);
    return $c;
}

# Postfix opens a connection to the filter for every message: the K-th
# message is "queued as K-1".

# the message the recording backend got from Postfix, without the
# Received: header Postfix put on top (still dot-stuffed, as on the wire)
sub filtered {
    my ($k) = @_;
    my @m = $f->messages;
    my $m = $m[$k] // return undef;
    $m =~ s/\AReceived: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*//;
    return $m;
}

# the recording backend's command lines, over all its connections
sub filter_commands {
    return map { $f->commands($_) } 1 .. $f->connections;
}

my $c = session();
like($c->last_reply, qr/^250-CHUNKING\r$/m, 'EHLO lists CHUNKING');
like($c->last_reply, qr/^250-DSN\r$/m, 'EHLO lists DSN');

# 1. three chunks: a leading dot, CRLF.CRLF inside a chunk, a line
# across two chunks; DSN parameters and BODY=8BITMIME

$c->cmd('MAIL FROM:<a@b.test> BODY=8BITMIME RET=HDRS ENVID=QQ314159',
    qr/^250 2\.1\.0 Ok\r\n\z/, 'MAIL with RET, ENVID, BODY: Postfix 250');
$c->cmd('RCPT TO:<c@d.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;c@d.test',
    qr/^250 2\.1\.5 Ok\r\n\z/, 'RCPT with NOTIFY, ORCPT: Postfix 250');
my @ch = ("Subject: t\r\n\r\n.line\r\n", "a\r\n.\r\nb", "\r\nend \xe9\r\n");
for my $i (0 .. 2) {
    my $l = length $ch[$i];
    my $last = $i == 2 ? ' LAST' : '';
    $c->send("BDAT $l$last\r\n$ch[$i]");
    $c->expect($last ? qr/^250 2\.0\.0 Ok: queued as 1-1\r\n\z/
        : qr/^250 2\.0\.0 $l octets received\r\n\z/,
        "chunk $i" . ($last ? ': the final reply of the filter' : ''));
}
is(filtered(0), "Subject: t\r\n\r\n..line\r\na\r\n..\r\nb\r\nend \xe9\r\n",
    'Postfix passed on the chunks joined: one message, none ended early');
ok($pf->wait_log(qr/proxy-accept: END-OF-MESSAGE: 250 2\.0\.0 Ok: queued as 1-1;.* helo=<client\.test>/),
    'Postfix accepted it, with the client\'s HELO from XCLIENT');
my @fc = filter_commands();
is_deeply([@fc[1, 2]],
    ['MAIL FROM:<a@b.test> BODY=8BITMIME RET=HDRS ENVID=QQ314159',
     'RCPT TO:<c@d.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;c@d.test'],
    'the DSN parameters went through Postfix unchanged');

# 2. the whole transaction and the next command in one write

$c->send("MAIL FROM:<a\@b.test>\r\nRCPT TO:<c\@d.test>\r\n"
    . "BDAT 4\r\nab\r\nBDAT 6\r\nRSET\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n");
$c->expect(qr/^250 2\.1\.0 /, 'pipelined: MAIL');
$c->expect(qr/^250 2\.1\.5 /, 'pipelined: RCPT');
$c->expect(qr/^250 2\.0\.0 4 octets received/, 'pipelined: chunk 1');
$c->expect(qr/^250 2\.0\.0 6 octets received/, 'pipelined: chunk 2');
$c->expect(qr/^250 2\.0\.0 Ok: queued as 2-1\r\n\z/, 'pipelined: LAST');
$c->expect(qr/^250 2\.0\.0 Ok\r\n\z/, 'pipelined: NOOP after it');
is(filtered(1), "ab\r\nRSET\r\nQUIT\r\n",
    'pipelined: chunk octets that look like commands stayed data');

# 3. a UTF-8 envelope: SMTPUTF8 goes to Postfix, which lists it

$c->cmd("MAIL FROM:<\xc3\xb1\@b.test> SMTPUTF8", qr/^250 2\.1\.0 /,
    'UTF-8 MAIL with SMTPUTF8');
$c->cmd("RCPT TO:<\xc3\xa9\@d.test>", qr/^250 2\.1\.5 /, 'UTF-8 RCPT');
my $u = "hi \xc3\xa9\r\n";
$c->send("BDAT " . length($u) . " LAST\r\n$u");
$c->expect(qr/^250 2\.0\.0 Ok: queued as 3-1\r\n\z/, 'UTF-8: LAST');
@fc = filter_commands();
ok((grep { $_ eq "MAIL FROM:<\xc3\xb1\@b.test> SMTPUTF8" } @fc),
    'UTF-8: Postfix got, and passed on, SMTPUTF8');

# 4. DATA in the same session still goes as DATA

$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 /);
$c->cmd('DATA', qr/^354 /, 'DATA: 354');
$c->cmd("Subject: d\r\n\r\n..dot\r\n.", qr/^250 2\.0\.0 Ok: queued as 4-1\r\n\z/,
    'DATA: the final reply');
is(filtered(3), "Subject: d\r\n\r\n..dot\r\n", 'DATA: the message');

# 5. Postfix refuses the message inside BDAT (message_size_limit 20000,
# ours is 10 MiB): the client's chunks are still read to their end,
# a chunk before LAST is answered by the module, and LAST gets
# Postfix's 552

$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 /);
my $x = ('x' x 78 . "\r\n") x 150;              # 12000 octets
$c->send('BDAT ' . length($x) . "\r\n$x");
$c->expect(qr/^250 2\.0\.0 12000 octets received\r\n\z/, 'big: chunk 1');
$c->send('BDAT ' . length($x) . "\r\n$x");
$c->expect(qr/^250 2\.0\.0 12000 octets received\r\n\z/,
    'big: chunk 2, over Postfix\'s limit: the module\'s 250');
$c->send("BDAT 6 LAST\r\nlast\r\n");
$c->expect(qr/^552 5\.3\.4 [^\r\n]*\r\n\z/, 'big: LAST gets Postfix\'s 552');
is(scalar(() = $f->messages), 4, 'big: nothing reached the filter');

# the session goes on: the next transaction on a connection in sync
$c->cmd('RSET', qr/^250 /, 'big: RSET');
$c->cmd('MAIL FROM:<a@b.test>', qr/^250 /);
$c->cmd('RCPT TO:<c@d.test>', qr/^250 /);
$c->send("BDAT 7 LAST\r\nafter\r\n");
$c->expect(qr/^250 2\.0\.0 Ok: queued as \d+-\d+\r\n\z/,
    'after the refusal: the next message');
is(filtered(4), "after\r\n", 'after the refusal: its octets, alone');
$c->cmd('QUIT', qr/^221 /);

# Postfix counted what it got: BDAT, not DATA, for the chunked messages;
# the refused chunk ended that connection (the module never ends a failed
# message towards the backend), the next message came on a new one
# postlogd writes each smtpd's lines as they come: wait for both
$pf->wait_log(qr/disconnect from .* quit=1 /);
wait_for(sub { (() = $pf->maillog =~ /disconnect from /g) >= 2 }, 5);
my $log = $pf->maillog;
my @disc = $log =~ /disconnect from \S+ (.*)/g;
is(scalar @disc, 2, 'Postfix: two connections') or diag($log);
# (a successful XCLIENT is logged as "xclient=0/1": Postfix resets its
# counters with the session; the second EHLO shows it was accepted)
like($disc[0] // '', qr/^ehlo=2 xclient=\S+ mail=5 rcpt=5 data=1 bdat=8\/9 /,
    'Postfix, first connection: XCLIENT, EHLO, 8 good BDAT, the 9th refused'
    . ', 1 DATA');
like($log, qr/exceeds message size limit.*\n.*lost connection after BDAT/,
    'Postfix: the refused chunk, then the connection closed');
like($disc[1] // '', qr/^ehlo=2 xclient=\S+ mail=1 rcpt=1 bdat=1 quit=1 /,
    'Postfix, second connection: one message, QUIT');
unlike($log, qr/warning: .*(?:improper command pipelining|non-SMTP command)/,
    'Postfix saw no command inside message data');

# 6. the Postfix without CHUNKING: the chunks become one dot-stuffed
# DATA, a smuggling attempt across chunks included; Postfix's DATA
# parser and the filter see one message with every line intact

$c = session('mx2');
like($c->last_reply, qr/^250-CHUNKING\r$/m,
    'no-CHUNKING Postfix: the module still lists CHUNKING');
$c->cmd('MAIL FROM:<a@b.test> RET=FULL ENVID=E1', qr/^250 2\.1\.0 /,
    'no-DSN Postfix: MAIL with DSN parameters accepted');
$c->cmd('RCPT TO:<c@d.test> NOTIFY=FAILURE', qr/^250 2\.1\.5 /,
    'no-DSN Postfix: RCPT with NOTIFY accepted');
@ch = ("Subject: s\r\n\r\n.a\r\nb", "\n.\r\nMAIL FROM:<x\@y.test>\r\n",
    "\r.\rRCPT TO:<z\@y.test>\r\n.");
for my $i (0 .. 2) {
    my $l = length $ch[$i];
    my $last = $i == 2 ? ' LAST' : '';
    $c->send("BDAT $l$last\r\n$ch[$i]");
    $c->expect($last ? qr/^250 2\.0\.0 Ok: queued as 1-1\r\n\z/
        : qr/^250 2\.0\.0 $l octets received\r\n\z/,
        "no-CHUNKING Postfix: chunk $i");
}
is(($f2->messages)[0] =~ s/\AReceived: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*//r,
    "Subject: s\r\n\r\n..a\r\nb\r\n..\r\nMAIL FROM:<x\@y.test>\r\n\r\n..\r\n"
    . "RCPT TO:<z\@y.test>\r\n..\r\n",
    'no-CHUNKING Postfix: one message, every smuggled line still data');
is_deeply([grep { /^(?:MAIL|RCPT)/ } $f2->commands(1)],
    ['MAIL FROM:<a@b.test>', 'RCPT TO:<c@d.test>'],
    'no-DSN Postfix: the DSN parameters were dropped, nothing smuggled');

# what the module cannot pass on: refused per recipient
$c->cmd("MAIL FROM:<\xc3\xb1\@b.test> SMTPUTF8", qr/^250 /);
$c->cmd('RCPT TO:<c@d.test>',
    qr/^553 5\.6\.7 Recipient's server does not support SMTPUTF8\r\n\z/,
    'no-SMTPUTF8 Postfix: 553 5.6.7');
$c->cmd('RSET', qr/^250 /);
$c->cmd('MAIL FROM:<a@b.test> BODY=8BITMIME', qr/^250 /);
$c->cmd('RCPT TO:<c@d.test>',
    qr/^554 5\.6\.9 Recipient's server does not support 8BITMIME\r\n\z/,
    'no-8BITMIME Postfix: 554 5.6.9');
$c->cmd('QUIT', qr/^221 /);

$pf2->wait_log(qr/disconnect from /);
like($pf2->maillog, qr/disconnect from \S+ ehlo=1 mail=1 rcpt=1 data=1 quit=1 /,
    'no-CHUNKING Postfix: one MAIL, one RCPT, DATA, no BDAT')
    or diag($pf2->maillog);
unlike($pf2->maillog, qr/bdat=/, 'no-CHUNKING Postfix: no BDAT reached it');
like(error_log($n), qr/\[warn\].*DSN/, 'the dropped DSN parameters: a warn');

$n->stop;
ok(error_log_clean($n), 'no alerts in the error log');

done_testing();
