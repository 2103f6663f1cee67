package SmtpExt::Test;

# Test library for the ngx_mail_smtp_ext integration tests.
#
#   use lib 't/lib';
#   use SmtpExt::Test;
#
#   my $b = start_backend(name => 'b1', args => ['--rcpt-reply', '...']);
#   my $n = start_nginx(<<'EOF');
#   mail {
#       server_name mx.test;
#       server {
#           listen 127.0.0.1:%%PORT_smtp%%;
#           protocol smtp_ext;
#           smtp_ext_pass 127.0.0.1:%%PORT_b1%%;
#       }
#   }
#   EOF
#   my $c = smtp_client('smtp');        # connects to port('smtp')
#   $c->expect(qr/^220 /);
#
# Environment: NGINX_BIN (default /usr/sbin/nginx), SMTP_EXT_MODULE
# (default build/modules/ngx_mail_smtp_ext_module.so of the repository),
# NGX_MAIL_MODULE (default /usr/lib/nginx/modules/ngx_mail_module.so),
# SMTP_EXT_KEEP=1 keeps the test directory and prints its name.

use strict;
use warnings;

use Exporter 'import';
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Temp qw(tempdir);
use IO::Socket::INET;
use POSIX qw(:sys_wait_h);
use Socket qw(SOL_SOCKET SO_REUSEADDR);
use Test::More;
use Time::HiRes qw(time sleep);

our @EXPORT = qw(
    port testdir start_nginx stop_nginx nginx_t nginx_conf_text
    start_backend start_smtp_sink start_postfix postfix_usable
    smtp_client wait_for
    error_log error_log_clean worker_pid worker_rss gen_cert
    require_programs module_path mail_module_path nginx_bin
    read_file write_file
    lines_reply worker_sockets worker_busy_sockets is_asan
    http_get metrics_samples cache_counts cache_delta
);

my $root = abs_path(dirname(__FILE__) . '/../../..');

# END blocks must run to stop nginx and the backends: turn signals into
# exit, and let a closed stdout (prove | head) not kill the test
$SIG{PIPE} = 'IGNORE';
$SIG{$_} = sub { exit 1 } for qw(INT TERM HUP);

sub nginx_bin { $ENV{NGINX_BIN} || '/usr/sbin/nginx' }

sub module_path {
    $ENV{SMTP_EXT_MODULE}
        || "$root/build/modules/ngx_mail_smtp_ext_module.so";
}

sub mail_module_path {
    $ENV{NGX_MAIL_MODULE} || '/usr/lib/nginx/modules/ngx_mail_module.so';
}

my $testdir;

sub testdir {
    return $testdir if $testdir;
    my $base = $ENV{TMPDIR} || '/tmp';
    $testdir = tempdir('smtp-ext-t-XXXXXX', DIR => $base,
        CLEANUP => !$ENV{SMTP_EXT_KEEP});
    chmod 0755, $testdir;
    diag("test dir $testdir") if $ENV{SMTP_EXT_KEEP};
    return $testdir;
}

sub read_file {
    my ($f) = @_;
    open my $fh, '<', $f or return undef;
    binmode $fh;
    local $/;
    my $d = <$fh>;
    close $fh;
    return $d;
}

sub write_file {
    my ($f, $d) = @_;
    open my $fh, '>', $f or die "$f: $!";
    binmode $fh;
    print $fh $d;
    close $fh;
}

# skip the whole file when an external program is missing
sub require_programs {
    for my $p (@_) {
        my $found = $p =~ m{/} ? -x $p
            : grep { -x "$_/$p" } split(/:/, $ENV{PATH} . ':/usr/sbin');
        plan(skip_all => "$p not found") unless $found;
    }
}

# wait until $cond returns true; returns its value or false on timeout
sub wait_for {
    my ($cond, $timeout) = @_;
    $timeout //= 5;
    my $end = time + $timeout;
    my $delay = 0.01;
    for (;;) {
        my $r = $cond->();
        return $r if $r;
        return 0 if time > $end;
        sleep($delay);
        $delay *= 2 if $delay < 0.1;
    }
}


# the status page: an HTTP/1.0 GET to 127.0.0.1:port($name); the whole
# response, '' when it cannot be had
sub http_get {
    my ($name, $path) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => port($name), Timeout => 5) or return '';
    print $s "GET $path HTTP/1.0\r\nHost: x\r\n\r\n";
    local $/;
    my $res = <$s>;
    return $res // '';
}

# every sample of /metrics on port($name): { 'name{labels}' => value }
sub metrics_samples {
    my ($name) = @_;
    my %v;
    for (split /\n/, http_get($name // 'http', '/metrics')) {
        $v{$1} = $2 if /^(\S+) (\S+)$/ && !/^#/;
    }
    return \%v;
}

# smtp_ext_redis_cache_total by result, and the change between two
sub cache_counts {
    my ($name) = @_;
    my %c = http_get($name // 'http', '/metrics')
        =~ /^smtp_ext_redis_cache_total\{result="(\w+)"\} (\d+)\r?$/mg;
    $c{$_} //= 0 for qw(hit miss stale);
    return \%c;
}

sub cache_delta {
    my ($a, $b) = @_;
    return join ' ', map { "$_=" . ($b->{$_} - $a->{$_}) } qw(hit miss stale);
}


# TERM to the child $obj->{pid}, KILL after $timeout seconds; reaped once
sub stop_process {
    my ($obj, $timeout) = @_;
    my $pid = $obj->{pid} or return;
    $obj->{pid} = undef;
    kill 'TERM', $pid;
    my $gone = wait_for(sub { waitpid($pid, WNOHANG) == $pid }, $timeout);
    if (!$gone) {
        kill 'KILL', $pid;
        waitpid($pid, 0);
    }
}


# ports: one free port per name for the whole test file

my %ports;
my %used;

sub port {
    my ($name) = @_;
    return $ports{$name} if $ports{$name};
    # below the ephemeral range, so that no outgoing connection of this
    # or a parallel test takes it between now and the bind
    for (1 .. 1000) {
        my $p = 20000 + int(rand(12000));
        next if $used{$p}++;
        my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
            LocalPort => $p, Proto => 'tcp', Listen => 1, ReuseAddr => 1)
            or next;
        close $s;
        return $ports{$name} = $p;
    }
    die "no free port";
}

sub listening {
    my ($p) = @_;
    my $hex = sprintf('%04X', $p);
    for my $f ('/proc/net/tcp', '/proc/net/tcp6') {
        open my $fh, '<', $f or next;
        while (my $l = <$fh>) {
            # local_address rem_address st; 0A is LISTEN
            return 1 if $l =~ /^\s*\d+:\s+[0-9A-F]+:$hex\s+[0-9A-F]+:0000\s+0A/;
        }
    }
    return 0;
}


# nginx

my %nginx_pids;
my $nginx_seq = 0;
my $last_nginx;

sub substitute {
    my ($text, $dir) = @_;
    $text =~ s/%%PORT_(\w+)%%/port($1)/ge;
    $text =~ s/%%TESTDIR%%/testdir()/ge;
    $text =~ s/%%DIR%%/$dir/g;
    $text =~ s/%%MODULE%%/module_path()/ge;
    $text =~ s/%%MAIL_MODULE%%/mail_module_path()/ge;
    return $text;
}

# the whole nginx.conf for a mail {} (and maybe http {}) text
sub nginx_conf_text {
    my ($conf, $dir, %opt) = @_;
    my $head = '';
    $head .= 'load_module ' . mail_module_path() . ";\n"
        unless $opt{no_mail_module};
    $head .= 'load_module ' . module_path() . ";\n"
        unless $opt{no_module};
    my $workers = $opt{workers} // 1;
    $head .= <<"EOF";
daemon off;
master_process on;
worker_processes $workers;
error_log $dir/error.log info;
pid $dir/nginx.pid;

events {
    worker_connections 1024;
}

EOF
    return $head . substitute($conf, $dir);
}

sub new_nginx_dir {
    my $dir = testdir() . '/nginx-' . ++$nginx_seq;
    make_path("$dir/logs");
    return $dir;
}

# start_nginx($conf, %opt): returns { pid, dir, conf }; dies (failing the
# test) when nginx does not come up.  Options: no_module => 1 (stock
# modules only), wait_ports => [names] (default: every listen port).
sub start_nginx {
    my ($conf, %opt) = @_;

    my $dir = new_nginx_dir();
    my $text = nginx_conf_text($conf, $dir, %opt);
    write_file("$dir/nginx.conf", $text);

    my @wait;
    if ($opt{wait_ports}) {
        @wait = map { port($_) } @{ $opt{wait_ports} };
    } else {
        @wait = $text =~ /^\s*listen\s+(?:127\.0\.0\.1:)?(\d+)/mg;
    }

    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', "$dir/stdout.log";
        open STDERR, '>', "$dir/stderr.log";
        exec(nginx_bin(), '-p', "$dir/", '-c', "$dir/nginx.conf",
            '-e', "$dir/error.log")
            or POSIX::_exit(127);
    }

    my $n = bless { pid => $pid, dir => $dir, conf => $text },
        'SmtpExt::Test::Nginx';
    $nginx_pids{$pid} = $n;
    $last_nginx = $n;

    my $up = wait_for(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        return 0 if grep { !listening($_) } @wait;
        return $n->worker_pid() ? 1 : 0;
    }, 10);

    if ($up != 1) {
        $n->stop() if $up != -1;
        delete $nginx_pids{$pid};
        my $log = (read_file("$dir/error.log") // '')
            . (read_file("$dir/stderr.log") // '');
        diag("nginx did not start:\n$log");
        die "nginx did not start\n";
    }

    return $n;
}

sub stop_nginx {
    my ($n) = @_;
    $n //= $last_nginx;
    $n->stop() if $n;
}

# nginx -t on a config: returns (exit code, output)
sub nginx_t {
    my ($conf, %opt) = @_;
    my $dir = new_nginx_dir();
    write_file("$dir/nginx.conf", nginx_conf_text($conf, $dir, %opt));
    my $cmd = join ' ', map { "'$_'" } nginx_bin(), '-t', '-p', "$dir/",
        '-c', "$dir/nginx.conf", '-e', "$dir/error.log";
    my $out = `$cmd 2>&1`;
    return ($? >> 8, $out);
}

# the error log of the last (or given) nginx
sub error_log {
    my ($n) = @_;
    $n //= $last_nginx;
    return '' unless $n;
    return read_file("$n->{dir}/error.log") // '';
}

# true when the log has no alert/crash; diag()s the offending lines
sub error_log_clean {
    my ($n) = @_;
    my @bad = grep { /\[(alert|emerg|crit)\]|signal 11|exited on signal/ }
        split /\n/, error_log($n);
    diag(join "\n", @bad) if @bad;
    return !@bad;
}

sub worker_pid {
    my ($n) = @_;
    $n //= $last_nginx;
    return $n->worker_pid();
}

# RSS of the worker in kB
sub worker_rss {
    my ($n) = @_;
    my $pid = worker_pid($n) or return undef;
    my $st = read_file("/proc/$pid/status") // '';
    return $st =~ /^VmRSS:\s+(\d+)\s+kB/m ? $1 : undef;
}

END {
    local $?;
    for my $n (values %nginx_pids) {
        $n->stop();
    }
}


package SmtpExt::Test::Nginx;

sub pid { $_[0]{pid} }
sub dir { $_[0]{dir} }

sub worker_pid {
    my ($self) = @_;
    my $w = $self->{worker};
    # under valgrind (NGINX_BIN=a wrapper) the title is valgrind's
    my $title = $ENV{SMTP_EXT_VALGRIND} ? qr/./ : qr/worker process/;
    if ($w && (SmtpExt::Test::read_file("/proc/$w/cmdline") // '')
        =~ $title)
    {
        return $w;
    }
    opendir my $d, '/proc' or return undef;
    for my $p (grep { /^\d+$/ } readdir $d) {
        my $st = SmtpExt::Test::read_file("/proc/$p/stat") // next;
        # pid (comm) state ppid
        next unless $st =~ /\)\s+\S+\s+(\d+)/;
        next unless $1 == $self->{pid};
        my $cmd = SmtpExt::Test::read_file("/proc/$p/cmdline") // '';
        return $self->{worker} = $p if $cmd =~ $title;
    }
    return undef;
}

sub error_log { SmtpExt::Test::error_log($_[0]) }

sub stop {
    my ($self) = @_;
    my $pid = $self->{pid} or return;
    my $worker = $self->worker_pid();
    delete $nginx_pids{$pid};
    $self->{pid} = undef;
    kill 'TERM', $pid;
    my $gone = SmtpExt::Test::wait_for(
        sub { waitpid($pid, POSIX::WNOHANG()) == $pid }, 10);
    if (!$gone) {
        kill 'KILL', $pid;
        kill 'KILL', $worker if $worker;
        waitpid($pid, 0);
    }
}

# reload with a new config text (same placeholders)
sub reload {
    my ($self, $conf, %opt) = @_;
    SmtpExt::Test::write_file("$self->{dir}/nginx.conf",
        SmtpExt::Test::nginx_conf_text($conf, $self->{dir}, %opt));
    kill 'HUP', $self->{pid};
}


# backends

package SmtpExt::Test;

my @backends;
my $backend_script = "$root/t/bin/smtp-backend.pl";

# start_backend(name => 'b1', args => [...]) listens on port('b1')
sub start_backend {
    my (%opt) = @_;
    my $name = $opt{name} // 'backend';
    my $p = port($name);
    my $dir = testdir() . "/backend-$name";
    my $seq = 0;
    $dir = testdir() . "/backend-$name-" . ++$seq while -e $dir;
    make_path($dir);

    my $pidfile = "$dir/pid";
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', "$dir/stdout.log";
        open STDERR, '>', "$dir/stderr.log";
        exec($^X, $backend_script, '--port', $p, '--dir', $dir,
            '--pidfile', $pidfile, @{ $opt{args} || [] })
            or POSIX::_exit(127);
    }

    my $b = bless { pid => $pid, dir => $dir, port => $p, name => $name },
        'SmtpExt::Test::Backend';
    push @backends, $b;

    my $ok = wait_for(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        return -e $pidfile ? 1 : 0;
    }, 10);
    if ($ok != 1) {
        diag(read_file("$dir/stderr.log") // '');
        die "backend $name did not start\n";
    }
    return $b;
}

END {
    local $?;
    $_->stop() for @backends;
}


package SmtpExt::Test::Backend;

sub port { $_[0]{port} }
sub dir { $_[0]{dir} }

# bytes received on connection N (1-based)
sub raw {
    my ($self, $n) = @_;
    return SmtpExt::Test::read_file("$self->{dir}/conn-$n.raw");
}

sub log {
    my ($self, $n) = @_;
    return SmtpExt::Test::read_file("$self->{dir}/conn-$n.log");
}

# command lines the backend executed on connection N
sub commands {
    my ($self, $n) = @_;
    my $l = $self->log($n) // '';
    return map { substr($_, 2) } grep { /^> / } split /\n/, $l;
}

sub connections {
    my ($self) = @_;
    opendir my $d, $self->{dir} or return 0;
    return scalar grep { /^conn-\d+\.raw$/ } readdir $d;
}

sub closed {
    my ($self, $n) = @_;
    return -e "$self->{dir}/conn-$n.closed";
}

# wait until connection N is over
sub wait_closed {
    my ($self, $n, $timeout) = @_;
    return SmtpExt::Test::wait_for(sub { $self->closed($n) }, $timeout // 5);
}

# message bodies in order (connection, then message)
sub messages {
    my ($self) = @_;
    opendir my $d, $self->{dir} or return ();
    my @f = map { $_->[0] }
        sort { $a->[1] <=> $b->[1] || $a->[2] <=> $b->[2] }
        map { /^msg-(\d+)-(\d+)\.eml$/ ? [$_, $1, $2] : () } readdir $d;
    return map { SmtpExt::Test::read_file("$self->{dir}/$_") } @f;
}

sub message_files {
    my ($self) = @_;
    opendir my $d, $self->{dir} or return ();
    return map { "$self->{dir}/$_" } sort grep { /^msg-\d+-\d+\.eml$/ }
        readdir $d;
}

sub stop {
    my ($self) = @_;
    # the accept loop wakes up on the signal; its children get TERM
    SmtpExt::Test::stop_process($self, 5);
}


# postfix smtp-sink as a backend

package SmtpExt::Test;

my @sinks;

# start_smtp_sink(name => 'sink'): counts messages; ->messages_count
sub start_smtp_sink {
    my (%opt) = @_;
    my $name = $opt{name} // 'sink';
    my $p = port($name);
    my $dir = testdir() . "/sink-$name";
    make_path("$dir/dump");
    chmod 0777, "$dir/dump";

    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', "$dir/stdout.log";
        open STDERR, '>', "$dir/stderr.log";
        my @u = $> == 0 ? ('-u', 'nobody') : ();
        exec('/usr/sbin/smtp-sink', @u, '-c', '-d', "$dir/dump/%M%S.",
            @{ $opt{args} || [] }, "127.0.0.1:$p", '128')
            or POSIX::_exit(127);
    }

    my $s = bless { pid => $pid, dir => $dir, port => $p },
        'SmtpExt::Test::Sink';
    push @sinks, $s;

    my $ok = wait_for(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        return listening($p) ? 1 : 0;
    }, 10);
    if ($ok != 1) {
        diag(read_file("$dir/stderr.log") // '');
        die "smtp-sink did not start\n";
    }
    return $s;
}

END {
    local $?;
    $_->stop() for @sinks;
}


package SmtpExt::Test::Sink;

sub port { $_[0]{port} }

# the number of messages dumped
sub messages_count {
    my ($self) = @_;
    opendir my $d, "$self->{dir}/dump" or return 0;
    return scalar grep { !/^\./ } readdir $d;
}

sub messages {
    my ($self) = @_;
    opendir my $d, "$self->{dir}/dump" or return ();
    return map { SmtpExt::Test::read_file("$self->{dir}/dump/$_") }
        sort grep { !/^\./ } readdir $d;
}

sub stop { SmtpExt::Test::stop_process($_[0], 5) }


# a private Postfix smtpd as a backend

package SmtpExt::Test;

my @postfixes;
my $postfix_dir = '/usr/lib/postfix/sbin';

# why a private Postfix cannot run here, or '' when it can: master(8)
# must start as root and drop to the postfix user
sub postfix_usable {
    return 'not root' if $> != 0;
    return 'no postfix user' unless defined getpwnam('postfix');
    for my $p ('/usr/sbin/postfix', "$postfix_dir/master",
        "$postfix_dir/smtpd")
    {
        return "$p not found" unless -x $p;
    }
    return '';
}

# start_postfix(name => 'pf', filter => PORT, main => { param => value }):
# Postfix's smtpd on port(name), with its own configuration, queue and
# log below the test directory.  Every message is handed, before it is
# queued, to the SMTP server on 127.0.0.1:PORT (smtpd_proxy_filter), so
# the whole mail path is synchronous and nothing is queued or delivered.
sub start_postfix {
    my (%opt) = @_;
    my $name = $opt{name} // 'postfix';
    my $p = port($name);
    my $dir = testdir() . "/postfix-$name";
    my %main = (
        compatibility_level => '3.6',
        queue_directory => "$dir/queue",
        data_directory => "$dir/data",
        mail_owner => 'postfix',
        myhostname => 'postfix.test',
        mydomain => 'test',
        mydestination => '',
        inet_interfaces => '127.0.0.1',
        inet_protocols => 'ipv4',
        mynetworks => '127.0.0.0/8',
        maillog_file => "$dir/maillog",
        maillog_file_prefixes => $dir,
        local_recipient_maps => '',
        alias_maps => '',
        alias_database => '',
        smtpd_peername_lookup => 'no',
        smtpd_relay_restrictions => 'permit_mynetworks, reject',
        smtpd_proxy_filter => "127.0.0.1:$opt{filter}",
        smtpd_proxy_timeout => '20s',
        %{ $opt{main} || {} },
    );

    make_path("$dir/etc", "$dir/queue", "$dir/data");
    chown((getpwnam('postfix'))[2], -1, "$dir/data");
    write_file("$dir/etc/main.cf",
        join('', map { "$_ = $main{$_}\n" } sort keys %main));
    write_file("$dir/etc/master.cf", <<"EOF");
127.0.0.1:$p inet n - n - - smtpd
postlog unix-dgram n - n - 1 postlogd
anvil unix - - n - 1 anvil
proxymap unix - - n - - proxymap
rewrite unix - - n - - trivial-rewrite
EOF
    # the queue's subdirectories, owned and protected as Postfix wants
    if (system("/usr/sbin/postfix -c $dir/etc post-install create-missing"
        . " >$dir/post-install.log 2>&1") != 0)
    {
        diag(read_file("$dir/post-install.log") // '');
        diag(read_file("$dir/maillog") // '');
        die "postfix post-install failed\n";
    }

    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', "$dir/master.log";
        open STDERR, '>&', \*STDOUT;
        # its own process group: master(8) stops the group when it goes
        POSIX::setsid();
        # not exit(): the END blocks would stop the parent's servers
        exec("$postfix_dir/master", '-d', '-c', "$dir/etc")
            or POSIX::_exit(127);
    }

    my $s = bless { pid => $pid, dir => $dir, port => $p },
        'SmtpExt::Test::Postfix';
    push @postfixes, $s;

    my $ok = wait_for(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        return listening($p) ? 1 : 0;
    }, 10);
    if ($ok != 1) {
        diag(read_file("$dir/master.log") // '');
        diag(read_file("$dir/maillog") // '');
        die "postfix did not start\n";
    }
    return $s;
}

END {
    local $?;
    $_->stop() for @postfixes;
}


package SmtpExt::Test::Postfix;

sub port { $_[0]{port} }
sub dir { $_[0]{dir} }

# what Postfix logged (postlogd writes it a moment after the event)
sub maillog {
    my ($self) = @_;
    return SmtpExt::Test::read_file("$self->{dir}/maillog") // '';
}

# wait until the mail log has a line matching $re; returns that line
sub wait_log {
    my ($self, $re, $timeout) = @_;
    my $line;
    SmtpExt::Test::wait_for(sub {
        ($line) = grep { /$re/ } split /\n/, $self->maillog;
        return defined $line;
    }, $timeout // 5);
    return $line;
}

sub stop {
    my ($self) = @_;
    # master(8) stops its children on TERM
    SmtpExt::Test::stop_process($self, 10);
}


# self-signed certificate: returns (cert, key) paths

package SmtpExt::Test;

sub gen_cert {
    my ($name) = @_;
    $name //= 'localhost';
    my $dir = testdir();
    my ($crt, $key) = ("$dir/$name.crt", "$dir/$name.key");
    return ($crt, $key) if -e $crt;
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', '/dev/null';
        open STDERR, '>', "$dir/openssl.log";
        exec('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes',
        '-subj', "/CN=$name", '-days', '2', '-keyout', $key, '-out', $crt,
        '-batch') or POSIX::_exit(127);
    }
    waitpid($pid, 0);
    die "openssl req failed\n" if $?;
    return ($crt, $key);
}


# an N-line reply with CODE, each line LEN octets before its CRLF: what
# smtp-backend.pl --reply-lines sends
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

# is nginx running with AddressSanitizer (scripts/asan-test.sh)?
sub is_asan {
    return (nginx_bin() =~ /asan/ || ($ENV{LD_PRELOAD} // '') =~ /asan/)
        ? 1 : 0;
}

my %tcp_state = (
    '01' => 'ESTABLISHED', '02' => 'SYN-SENT', '03' => 'SYN-RECV',
    '04' => 'FIN-WAIT-1', '05' => 'FIN-WAIT-2', '06' => 'TIME-WAIT',
    '07' => 'CLOSE', '08' => 'CLOSE-WAIT', '09' => 'LAST-ACK',
    '0A' => 'LISTEN', '0B' => 'CLOSING',
);

# the sockets the worker holds: a list of { fd, inode, state, local,
# remote }; state is a TCP state ("LISTEN", "CLOSE-WAIT", ...), "unix",
# or "?" for a socket in no table (a TCP socket already reset, say)
sub worker_sockets {
    my ($n) = @_;
    my $pid = worker_pid($n) or return ();
    my %fd;
    opendir my $d, "/proc/$pid/fd" or return ();
    for my $f (readdir $d) {
        my $l = readlink("/proc/$pid/fd/$f") // next;
        $fd{$1} = $f if $l =~ /^socket:\[(\d+)\]$/;
    }
    my %info;
    for my $t ('/proc/net/tcp', '/proc/net/tcp6') {
        open my $fh, '<', $t or next;
        while (my $l = <$fh>) {
            my @f = split ' ', $l;
            next unless @f > 9 && $f[0] =~ /^\d+:$/;
            my ($lp, $rp) = map { hex((split /:/)[1]) } @f[1, 2];
            $info{ $f[9] } = { state => $tcp_state{ $f[3] } // $f[3],
                local => $lp, remote => $rp };
        }
    }
    for my $t ('/proc/net/unix') {
        open my $fh, '<', $t or next;
        while (my $l = <$fh>) {
            my @f = split ' ', $l;
            $info{ $f[6] } //= { state => 'unix' } if @f > 6;
        }
    }
    return map { { fd => $fd{$_}, inode => $_,
        %{ $info{$_} // { state => '?' } } } } sort keys %fd;
}

# the worker's sockets other than listening and unix ones (client,
# backend, Redis connections, or leaked ones), as text for diag()
sub worker_busy_sockets {
    my ($n) = @_;
    return map {
        "fd $_->{fd} $_->{state}"
            . (defined $_->{local} ? " $_->{local} -> $_->{remote}" : '')
    } grep { $_->{state} ne 'LISTEN' && $_->{state} ne 'unix' }
        worker_sockets($n);
}


# client: smtp_client($port_name_or_number, %opt)

sub smtp_client {
    my ($p, %opt) = @_;
    $p = port($p) unless $p =~ /^\d+$/;
    return SmtpExt::Test::Client->new($p, %opt);
}


package SmtpExt::Test::Client;

use IO::Select;
use Time::HiRes qw(time);

sub new {
    my ($class, $port, %opt) = @_;
    # local => '127.0.0.2': another client address (127.0.0.0/8 is local)
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $port, Proto => 'tcp', Timeout => 5,
        $opt{local} ? (LocalAddr => $opt{local}) : ())
        or die "connect 127.0.0.1:$port: $!\n";
    binmode $s;
    my $self = bless { sock => $s, buf => '', timeout => $opt{timeout} // 5,
        port => $port, eof => 0, code => undef, last => undef }, $class;
    if ($opt{ssl}) {
        $self->start_ssl() or die "TLS handshake failed\n";
    }
    return $self;
}

sub sock { $_[0]{sock} }

sub send {
    my ($self, $data) = @_;
    my $off = 0;
    local $SIG{PIPE} = 'IGNORE';
    while ($off < length $data) {
        my $w = syswrite($self->{sock}, $data, length($data) - $off, $off);
        if (!defined $w) {
            next if $!{EINTR} || $!{EAGAIN};
            return 0;
        }
        $off += $w;
    }
    return 1;
}

# send without blocking longer than $timeout seconds in all: returns the
# octets written (length $data when all went out)
sub send_within {
    my ($self, $data, $timeout) = @_;
    my $s = $self->{sock};
    my $deadline = time + $timeout;
    my $off = 0;
    local $SIG{PIPE} = 'IGNORE';
    $s->blocking(0);
    while ($off < length $data) {
        my $left = $deadline - time;
        last if $left <= 0;
        my $sel = IO::Select->new($s);
        next unless $sel->can_write($left);
        my $w = syswrite($s, $data, length($data) - $off, $off);
        if (!defined $w) {
            next if $!{EINTR} || $!{EAGAIN} || $!{EWOULDBLOCK};
            last;
        }
        $off += $w;
    }
    $s->blocking(1);
    return $off;
}

# read more input; returns false on EOF or timeout
sub fill {
    my ($self, $deadline) = @_;
    my $s = $self->{sock};
    for (;;) {
        my $pending = $s->can('pending') ? $s->pending() : 0;
        if (!$pending) {
            my $left = $deadline - time;
            return 0 if $left <= 0;
            my $sel = IO::Select->new($s);
            next unless $sel->can_read($left);
        }
        my $r = sysread($s, my $chunk, 65536);
        if (!defined $r) {
            next if $!{EINTR} || $!{EAGAIN} || $!{EWOULDBLOCK};
            $self->{eof} = 1;
            return 0;
        }
        if ($r == 0) {
            $self->{eof} = 1;
            return 0;
        }
        $self->{buf} .= $chunk;
        return 1;
    }
}

# one complete (multiline) reply, or undef on timeout/EOF
sub reply {
    my ($self, $timeout) = @_;
    my $deadline = time + ($timeout // $self->{timeout});
    my $text = '';
    for (;;) {
        while ((my $i = index($self->{buf}, "\n")) >= 0) {
            my $line = substr($self->{buf}, 0, $i + 1, '');
            $text .= $line;
            if ($line =~ /^(\d{3})(?: |\r?\n)/) {
                $self->{code} = $1;
                $self->{last} = $text;
                return $text;
            }
            if ($line !~ /^\d{3}-/) {
                $self->{code} = undef;
                $self->{last} = $text;
                return $text;
            }
        }
        if (!$self->fill($deadline)) {
            $self->{code} = undef;
            $self->{last} = length($text . $self->{buf})
                ? $text . $self->{buf} : undef;
            return $self->{last};
        }
    }
}

sub code { $_[0]{code} }
sub last_reply { $_[0]{last} }

# reply() and like() it; returns the reply
sub expect {
    my ($self, $re, $name) = @_;
    my $r = $self->reply();
    $name //= "reply matches $re";
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    Test::More::like($r // '<no reply>', $re, $name);
    return $r;
}

# send a command and expect a reply
sub cmd {
    my ($self, $line, $re, $name) = @_;
    $self->send("$line\r\n");
    local $Test::Builder::Level = $Test::Builder::Level + 1;
    return $self->expect($re, $name // "$line -> $re");
}

# did the server close? (waits up to $timeout seconds, default 3)
sub closed {
    my ($self, $timeout) = @_;
    return 1 if $self->{eof};
    my $deadline = time + ($timeout // 3);
    while (time < $deadline) {
        $self->fill($deadline) or last;
    }
    return $self->{eof};
}

# unread input (anything the server sent without being asked)
sub pending_input {
    my ($self, $timeout) = @_;
    $self->fill(time + ($timeout // 0.3));
    return $self->{buf};
}

sub start_ssl {
    my ($self) = @_;
    require IO::Socket::SSL;
    IO::Socket::SSL->start_SSL($self->{sock},
        SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_NONE(),
        SSL_hostname => '',
        Timeout => $self->{timeout},
    ) or return 0;
    $self->{buf} = '';
    return 1;
}

# STARTTLS: send it, expect 220, handshake; returns true on success
sub starttls {
    my ($self) = @_;
    $self->send("STARTTLS\r\n");
    my $r = $self->reply() // '';
    return 0 unless $r =~ /^220/;
    return $self->start_ssl();
}

# greeting + EHLO, returns the EHLO reply
sub ehlo {
    my ($self, $name) = @_;
    $self->send('EHLO ' . ($name // 'client.test') . "\r\n");
    return $self->reply();
}

sub close {
    my ($self) = @_;
    close $self->{sock};
}



###########################################################################
# Helpers for t/96-slowloris.t, t/97-session-memory.t, t/98-reload.t
# (slow clients, long pipelined sessions, reload and shutdown).

package SmtpExt::Test;

push @EXPORT, qw(nginx_workers process_gone);

# the children of a master: { pid => title } ("nginx: worker process",
# "nginx: worker process is shutting down", "nginx: cache manager ...")
sub nginx_workers {
    my ($n) = @_;
    $n //= $last_nginx;
    my %w;
    return \%w unless $n && $n->{pid};
    opendir my $d, '/proc' or return \%w;
    for my $p (grep { /^\d+$/ } readdir $d) {
        my $st = read_file("/proc/$p/stat") // next;
        next unless $st =~ /\)\s+(\S+)\s+(\d+)/;
        next unless $2 == $n->{pid} && $1 ne 'Z';
        my $cmd = read_file("/proc/$p/cmdline") // '';
        $cmd =~ s/\0+/ /g;
        $cmd =~ s/\s+$//;
        $w{$p} = $cmd;
    }
    return \%w;
}

# true when a process is gone or a zombie (exited, not yet reaped)
sub process_gone {
    my ($pid) = @_;
    my $st = read_file("/proc/$pid/stat") // return 1;
    return $st =~ /\)\s+Z\s/ ? 1 : 0;
}


package SmtpExt::Test::Client;

# Send many command lines pipelined (RFC 2920) while reading the replies,
# so that neither side blocks.  Returns a reference to the list of the
# replies (each a full, maybe multiline, reply text) in order; stops early
# when the server closes, or after timeout seconds (default 60).
sub pipeline {
    my ($self, $lines, %opt) = @_;
    my $s = $self->{sock};
    my $data = join '', map { "$_\r\n" } @$lines;
    my $want = $opt{replies} // scalar @$lines;
    my $deadline = time + ($opt{timeout} // 60);
    my ($off, $text, @got) = (0, '');

    local $SIG{PIPE} = 'IGNORE';
    $s->blocking(0);

    while (@got < $want && !$self->{eof}) {
        my $left = $deadline - time;
        last if $left <= 0;

        my $rs = IO::Select->new($s);
        my $ws = $off < length($data) ? IO::Select->new($s) : undef;
        my ($r, $w) = IO::Select->select($rs, $ws, undef, $left);

        if ($w && @$w) {
            my $len = length($data) - $off;
            $len = 65536 if $len > 65536;
            my $n = syswrite($s, $data, $len, $off);
            if (defined $n) {
                $off += $n;
            } elsif (!$!{EAGAIN} && !$!{EWOULDBLOCK} && !$!{EINTR}) {
                # the server is gone: read what it said
                $off = length $data;
            }
        }

        next unless $r && @$r;

        my $n = sysread($s, my $chunk, 65536);
        if (!defined $n) {
            next if $!{EAGAIN} || $!{EWOULDBLOCK} || $!{EINTR};
            $self->{eof} = 1;
            last;
        }
        if ($n == 0) {
            $self->{eof} = 1;
            last;
        }
        $self->{buf} .= $chunk;

        while ((my $i = index($self->{buf}, "\n")) >= 0) {
            my $line = substr($self->{buf}, 0, $i + 1, '');
            $text .= $line;
            next if $line =~ /^\d{3}-/;
            push @got, $text;
            $text = '';
        }
    }

    $self->{buf} = $text . $self->{buf};
    $s->blocking(1);
    return \@got;
}

1;
