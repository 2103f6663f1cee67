#!/usr/bin/perl

# A 30 MB message through a slow backend: streamed, not buffered (worker
# RSS stays bounded), and received exactly.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use SmtpExt::Test;
use Digest::MD5 qw(md5_hex);

require_programs(nginx_bin());

my $b = start_backend(name => 'b1',
    args => ['--delay-read', 5, '--read-size', 32768]);

my $n = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
        smtp_ext_max_message_size 64m;
        timeout 30s;
    }
}
EOF

sub open_tx {
    my $c = smtp_client('smtp', timeout => 40);
    $c->expect(qr/^220 /);
    $c->cmd('EHLO client.test', qr/^250 /m);
    $c->cmd('MAIL FROM:<a@b.test>', qr/^250 2\.1\.0 /);
    $c->cmd('RCPT TO:<c@d.test>', qr/^250 2\.1\.5 /);
    $c->cmd('DATA', qr/^354 /);
    return $c;
}

# warm up, then the baseline
my $c = open_tx();
$c->send("warm up\r\n.\r\n");
$c->expect(qr/^250 2\.0\.0 /);
$c->cmd('QUIT', qr/^221 /);

my $base = worker_rss($n);
ok($base, "worker RSS before: $base kB");

# 1 MiB block of varied lines, some dot-stuffed
my $block = '';
my $i = 0;
while (length($block) < 1024 * 1024) {
    my $l = $i % 17 == 0 ? '..stuffed line ' : "line $i ";
    $l .= chr(33 + $i % 90) x (($i * 7) % 70);
    $block .= "$l\r\n";
    $i++;
}

$c = open_tx();
my $md5 = Digest::MD5->new;
my $max = $base;
my $chunk = 256 * 1024;
for my $k (1 .. 30) {
    my $blk = "block $k\r\n" . $block;
    $md5->add($blk);
    for (my $off = 0; $off < length $blk; $off += $chunk) {
        $c->send(substr($blk, $off, $chunk)) or last;
        my $rss = worker_rss($n) // 0;
        $max = $rss if $rss > $max;
    }
}
$c->send(".\r\n");
my $t = time;
$c->expect(qr/^250 2\.0\.0 Ok: queued as 2-1\r\n\z/, '30 MB delivered');
$c->cmd('QUIT', qr/^221 /);

my $growth = $max - $base;
ok($growth < 8192, "worker RSS growth $growth kB < 8 MB (max $max kB)");

my @f = $b->message_files;
is(scalar @f, 2, 'two messages at the backend');
open my $fh, '<', $f[-1] or die;
binmode $fh;
my $got = Digest::MD5->new->addfile($fh)->hexdigest;
close $fh;
is($got, $md5->hexdigest, 'md5 of the received message');
is(-s $f[-1], 30 * (length($block) + length("block 10\r\n")) - 9,
    'size of the received message');

$n->stop();
ok(error_log_clean($n), 'no alerts');

done_testing();
