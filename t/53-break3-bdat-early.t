#!/usr/bin/perl

# Break attempts on BDAT with backends that answer early (SPEC §12: LAST
# gets the backend's final reply; nothing ends a failed message): DATA
# refused with 554, an early 5xx while the converted chunks flow, a
# CHUNKING backend that refuses BDAT, pipelined chunks behind them.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use Time::HiRes qw(time sleep);
use SmtpExt::Test;

require_programs(nginx_bin());

my $caps = 'PIPELINING,SIZE 10485760,8BITMIME,ENHANCEDSTATUSCODES';
my $ck = "$caps,CHUNKING";

my %b;
$b{nd} = start_backend(name => 'b_nd',
    args => ['--caps', $caps, '--data-reply', '554 5.3.0 no data today']);
$b{er} = start_backend(name => 'b_er',
    args => ['--caps', $caps, '--early-reply', '200=554 5.7.1 go away']);
$b{ek} = start_backend(name => 'b_ek',
    args => ['--caps', $ck, '--bdat-chunk-reply', '554 5.7.1 go away']);

my $n = start_nginx(<<'EOF2');
mail {
    server_name mx.test;
    timeout 5s;

    server {
        listen 127.0.0.1:%%PORT_nd%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_nd%%;
    }
    server {
        listen 127.0.0.1:%%PORT_er%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_er%%;
    }
    server {
        listen 127.0.0.1:%%PORT_ek%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b_ek%%;
    }
}
EOF2

sub session {
    my ($port) = @_;
    my $c = smtp_client($port);
    $c->expect(qr/^220 /, "$port: greeting");
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 /);
    return $c;
}

# DATA refused by the backend: chunks 250, LAST the backend's 554
{
    my $c = session('nd');
    $c->send("BDAT 4\r\nab\r\nBDAT 4\r\ncd\r\nBDAT 4 LAST\r\nef\r\nNOOP\r\n");
    $c->expect(qr/^250 2\.0\.0 4 octets received/, 'nd: chunk 1');
    $c->expect(qr/^250 2\.0\.0 4 octets received/, 'nd: chunk 2');
    $c->expect(qr/^554 5\.3\.0 no data today\r\n\z/,
        "nd: LAST gets the backend's refusal of DATA");
    $c->expect(qr/^250 /, 'nd: NOOP after it');
    $c->cmd('QUIT', qr/^221 /);
    is(scalar($b{nd}->messages), 0, 'nd: no message');
}

# an early 554 while converted chunks flow to a DATA backend (er); a
# CHUNKING backend that refuses every chunk with 554 (ek)
for my $k ('er', 'ek') {
    my $c = session($k);
    $c->send("BDAT 4\r\nab\r\n");
    $c->expect(qr/^250 2\.0\.0 4 octets received/, "$k: chunk 1");
    sleep(0.5);
    $c->send("BDAT 4\r\ncd\r\n");
    $c->expect(qr/^250 2\.0\.0 4 octets received/,
        "$k: chunk 2 after the early reply: 250");
    $c->send("BDAT 4 LAST\r\nef\r\n");
    $c->expect(qr/^554 5\.7\.1 go away\r\n\z/,
        "$k: LAST gets the backend's early 554");
    $c->cmd('NOOP', qr/^250 /, "$k: the session goes on");
    $c->cmd('QUIT', qr/^221 /);
    is(scalar($b{$k}->messages), 0, "$k: no message at the backend");
}

unlike($n->error_log, qr/\[alert\]|\[crit\]|\[emerg\]|exited on signal/,
    'no alerts');

done_testing();
