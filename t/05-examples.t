#!/usr/bin/perl

# Release checks: every examples/*.conf passes "nginx -t" (with the
# load_module lines of this build instead of Debian's modules-enabled
# include, and placeholder certificates and log paths); the version is
# the same in the header, CHANGES, debian/changelog and README.md, and
# nginx logs "[notice] ... ngx_mail_smtp_ext/VERSION" once at start;
# loading the module before ngx_mail_module.so fails with the message
# that README.md explains.

use strict;
use warnings;

use lib 't/lib';
use Test::More;
use File::Basename qw(basename dirname);
use Cwd qw(abs_path);
use SmtpExt::Test;

require_programs(nginx_bin(), 'openssl');

my $root = abs_path(dirname(__FILE__) . '/..');

my ($crt, $key) = gen_cert('mx.example.com');

# the configuration as nginx -t sees it here: modules of this build,
# files under the test directory
sub localize {
    my ($text, $dir) = @_;

    my $n = ($text =~ s{^\s*include\s+/etc/nginx/modules-enabled/\*\.conf;[^\n]*\n}{}mg);
    $n += ($text =~ s{^\s*load_module\s+[^;]+;[^\n]*\n}{}mg);

    $text =~ s{/var/log/nginx/}{$dir/}g;
    $text =~ s{/run/nginx\.pid}{$dir/nginx.pid}g;
    $text =~ s{^(\s*ssl_certificate)\s+[^;]+;}{$1 $crt;}mg;
    $text =~ s{^(\s*ssl_certificate_key)\s+[^;]+;}{$1 $key;}mg;

    return ($n, 'load_module ' . mail_module_path() . ";\n"
        . 'load_module ' . module_path() . ";\n" . $text);
}

my $seq = 0;

sub example_t {
    my ($text) = @_;
    my $dir = testdir() . '/example-' . ++$seq;
    mkdir $dir or die "mkdir $dir: $!";
    mkdir "$dir/logs";
    my ($n, $conf) = localize($text, $dir);
    write_file("$dir/nginx.conf", $conf);
    my $cmd = join ' ', map { "'$_'" } nginx_bin(), '-t', '-p', "$dir/",
        '-c', "$dir/nginx.conf", '-e', "$dir/error.log";
    my $out = `$cmd 2>&1`;
    return ($? >> 8, $out, $n);
}

# --- examples -----------------------------------------------------------

my @examples = sort glob("$root/examples/*.conf");
my %have = map { basename($_) => 1 } @examples;

for my $name (qw(nginx.conf mx-postfix.conf submission.conf
                 proxy-protocol.conf several-nodes.conf))
{
    ok($have{$name}, "examples/$name exists");
}

for my $file (@examples) {
    my $name = basename($file);
    my $text = read_file($file);

    like($text, qr/^\s*protocol\s+smtp_ext;/m,
        "$name: has a protocol smtp_ext server");

    if ($name ne 'nginx.conf') {
        # a package configuration: the module comes from modules-enabled
        unlike($text, qr/^\s*load_module/m, "$name: no load_module line");
        like($text,
            qr{^include /etc/nginx/modules-enabled/\*\.conf;}m,
            "$name: includes modules-enabled");
    }

    my ($rc, $out, $n) = example_t($text);
    ok($n >= 1, "$name: module lines replaced");
    is($rc, 0, "$name: nginx -t") or diag($out);
    like($out, qr/test is successful/, "$name: test is successful");
    unlike($out, qr/\[(emerg|alert|crit)\]/, "$name: no emerg")
        or diag($out);
}

# the harness can fail: a broken example is caught
{
    my $text = read_file("$root/examples/mx-postfix.conf");
    $text =~ s/(protocol smtp_ext;)/$1\n        smtp_ext_no_such_directive on;/
        or die "no protocol line";
    my ($rc, $out) = example_t($text);
    isnt($rc, 0, 'nginx -t fails on a broken example');
    like($out, qr/unknown directive "smtp_ext_no_such_directive"/,
        'unknown directive reported');
}

# --- version --------------------------------------------------------------

my ($version) = read_file("$root/ngx_mail_smtp_ext/ngx_mail_smtp_ext_version.h")
    =~ /#define\s+NGX_MAIL_SMTP_EXT_VERSION\s+"([^"]+)"/;
like($version // '', qr/^\d+\.\d+\.\d+$/, "version macro: MAJOR.MINOR.PATCH");
$version //= 'none';

my ($changes) = read_file("$root/CHANGES") =~ /^Changes with ngx_mail_smtp_ext (\S+)/m;
is($changes, $version, 'first entry of CHANGES');

my ($deb) = read_file("$root/debian/changelog") =~ /^\S+ \(([^)-]+)-\d+\)/;
is($deb, $version, 'debian/changelog');

like(read_file("$root/README.md"), qr/\b\Q$version\E\b/, 'README.md');

ok(-f "$root/LICENSE", 'LICENSE');

my $ngx = start_nginx(<<'EOF');
mail {
    server_name mx.test;
    server {
        listen 127.0.0.1:%%PORT_smtp%%;
        protocol smtp_ext;
        smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
    }
}
EOF

my @lines = grep { /ngx_mail_smtp_ext\// } split /\n/, error_log($ngx);
is(scalar @lines, 1, 'one version line at start') or diag(join "\n", @lines);
like($lines[0] // '', qr/ \[notice\] \d+#\d+: ngx_mail_smtp_ext\/\Q$version\E$/,
    'version line');

$ngx->stop();
ok(error_log_clean($ngx), 'no alerts in error.log');

# --- load order -----------------------------------------------------------

# ngx_mail_module.so after the module: dlopen() cannot resolve the mail
# module's symbols (README.md, docs/operations.md)
my ($rc, $out) = nginx_t("load_module " . mail_module_path() . ";\n"
    , no_mail_module => 1);
isnt($rc, 0, 'module before ngx_mail_module.so: nginx -t fails');
like($out, qr/undefined symbol: ngx_mail_auth_http_module/,
    'undefined symbol: ngx_mail_auth_http_module');

done_testing();
