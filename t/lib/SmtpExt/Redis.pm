package SmtpExt::Redis;

# A real redis-server for the ngx_mail_smtp_ext tests.
#
#   use SmtpExt::Redis;
#   my $r = start_redis();                # port('redis'), no persistence
#   $r->cmd('HSET', 'user:bob', 'password', '{PLAIN}pw');
#   $r->stall; ...; $r->resume;           # SIGSTOP / SIGCONT
#   $r->kill; ...; $r->restart;           # SIGKILL, then the same port
#   $r->monitor_start; ...; my @lines = $r->monitor_stop;
#
# Every server listens on 127.0.0.1 only, keeps its files in the test
# directory and is killed by an END block.  A tiny RESP client (one
# connection per command, so it survives restarts) talks to it.

use strict;
use warnings;

use Exporter 'import';
use File::Path qw(make_path);
use IO::Socket::INET;
use IO::Select;
use POSIX qw(:sys_wait_h);
use Time::HiRes qw(time sleep);

use SmtpExt::Test ();
use Cwd qw(abs_path);
use File::Basename qw(dirname);

my $root = abs_path(dirname(__FILE__) . '/../../..');

sub testdir { SmtpExt::Test::testdir() }
sub wait_for { SmtpExt::Test::wait_for(@_) }
sub read_file { SmtpExt::Test::read_file(@_) }

our @EXPORT = qw(start_redis redis_bin hash_sha512 hash_yescrypt
    hash_bcrypt hash_ssha cram_md5_response b64 start_hostile_redis);

my @servers;

sub redis_bin { $ENV{REDIS_SERVER} || '/usr/bin/redis-server' }

# start_redis(name => 'redis', password => 'pw', unixsocket => 1,
#             args => [...], conf => 'text', sentinel => 1): the server
# listens on port($name); conf is written to a file given first, which
# a sentinel needs (it rewrites it)
sub start_redis {
    my (%opt) = @_;
    my $name = $opt{name} // 'redis';
    my $dir = testdir() . "/redis-$name";
    make_path($dir);

    my $self = bless {
        name => $name,
        port => SmtpExt::Test::port($name),
        dir => $dir,
        password => $opt{password},
        unixsocket => $opt{unixsocket} ? "$dir/redis.sock" : undef,
        args => $opt{args} || [],
        sentinel => $opt{sentinel},
    }, __PACKAGE__;

    if (defined $opt{conf}) {
        $self->{conf} = "$dir/redis.conf";
        SmtpExt::Test::write_file($self->{conf}, $opt{conf});
    }

    push @servers, $self;
    $self->run() or die "redis-server $name did not start\n";
    return $self;
}

sub port { $_[0]{port} }
sub dir { $_[0]{dir} }
sub pid { $_[0]{pid} }
sub unixsocket { $_[0]{unixsocket} }

sub run {
    my ($self) = @_;
    my @args = ('--port', $self->{port}, '--bind', '127.0.0.1',
        '--save', '', '--appendonly', 'no', '--dir', $self->{dir},
        '--daemonize', 'no', '--logfile', "$self->{dir}/redis.log",
        '--protected-mode', 'no');
    push @args, '--requirepass', $self->{password} if $self->{password};
    push @args, '--unixsocket', $self->{unixsocket}, '--unixsocketperm',
        '777' if $self->{unixsocket};
    push @args, @{ $self->{args} };
    unshift @args, $self->{conf} if $self->{conf};
    push @args, '--sentinel' if $self->{sentinel};

    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>>', "$self->{dir}/stdout.log";
        open STDERR, '>>', "$self->{dir}/stderr.log";
        exec(redis_bin(), @args) or POSIX::_exit(127);
    }
    $self->{pid} = $pid;
    $self->{stopped} = 0;

    # the port may still be held briefly after a kill: give it time
    my $ok = wait_for(sub {
        return -1 if waitpid($pid, WNOHANG) == $pid;
        my $r = eval { $self->cmd('PING') };
        return defined $r && $r eq 'PONG' ? 1 : 0;
    }, 10);
    if ($ok != 1) {
        delete $self->{pid};
        Test::More::diag(read_file("$self->{dir}/redis.log") // '');
        return 0;
    }
    return 1;
}

# SIGSTOP: the server keeps its sockets but answers nothing
sub stall {
    my ($self) = @_;
    CORE::kill 'STOP', $self->{pid} if $self->{pid};
    $self->{stopped} = 1;
}

sub resume {
    my ($self) = @_;
    CORE::kill 'CONT', $self->{pid} if $self->{pid};
    $self->{stopped} = 0;
}

# SIGKILL: connections are reset, the port is closed at once
sub kill {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;
    CORE::kill 'KILL', $pid;
    waitpid($pid, 0);
}

sub stop {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;
    CORE::kill 'CONT', $pid if $self->{stopped};
    CORE::kill 'TERM', $pid;
    my $gone = wait_for(sub { waitpid($pid, WNOHANG) == $pid }, 5);
    if (!$gone) {
        CORE::kill 'KILL', $pid;
        waitpid($pid, 0);
    }
}

# a new server on the same port (an empty dataset: nothing is saved)
sub restart {
    my ($self) = @_;
    $self->kill() if $self->{pid};
    return $self->run();
}


# RESP client

sub connect {
    my ($self, $timeout) = @_;
    my $s;
    if ($self->{unixsocket} && $self->{via_unix}) {
        require IO::Socket::UNIX;
        $s = IO::Socket::UNIX->new(Peer => $self->{unixsocket});
    } else {
        $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $self->{port}, Proto => 'tcp',
            Timeout => $timeout // 2);
    }
    die "connect to redis: $!\n" unless $s;
    binmode $s;
    return $s;
}

sub encode {
    my (@args) = @_;
    my $out = '*' . scalar(@args) . "\r\n";
    $out .= '$' . length($_) . "\r\n$_\r\n" for @args;
    return $out;
}

# read one reply from a socket with a buffer; errors come back as
# "-ERR ..." strings, nil as undef, arrays as array references
sub read_reply {
    my ($sock, $bufref, $deadline) = @_;

    my $line = sub {
        for (;;) {
            my $i = index($$bufref, "\r\n");
            return substr($$bufref, 0, $i + 2, '') if $i >= 0;
            fill($sock, $bufref, $deadline);
        }
    };

    my $l = $line->();
    chop $l;
    chop $l;
    my ($t, $v) = (substr($l, 0, 1), substr($l, 1));

    return $v if $t eq '+';
    return "-$v" if $t eq '-';
    return $v + 0 if $t eq ':';
    if ($t eq '$') {
        return undef if $v < 0;
        fill($sock, $bufref, $deadline) while length($$bufref) < $v + 2;
        my $d = substr($$bufref, 0, $v + 2, '');
        return substr($d, 0, $v);
    }
    if ($t eq '*') {
        return undef if $v < 0;
        return [ map { read_reply($sock, $bufref, $deadline) } 1 .. $v ];
    }
    die "bad RESP line: $l\n";
}

sub fill {
    my ($sock, $bufref, $deadline) = @_;
    my $left = $deadline - time;
    die "redis timeout\n" if $left <= 0;
    die "redis timeout\n" unless IO::Select->new($sock)->can_read($left);
    my $r = sysread($sock, my $chunk, 65536);
    die "redis connection closed\n" unless $r;
    $$bufref .= $chunk;
}

# one command on a new connection; dies on connection errors
sub cmd {
    my ($self, @args) = @_;
    my $s = $self->connect();
    my $buf = '';
    my $deadline = time + 5;
    my $req = '';
    $req .= encode('AUTH', $self->{password}) if $self->{password};
    $req .= encode(@args);
    syswrite($s, $req) or die "redis write: $!\n";
    if ($self->{password}) {
        my $a = read_reply($s, \$buf, $deadline);
        die "redis AUTH: $a\n" unless $a eq 'OK';
    }
    my $r = read_reply($s, \$buf, $deadline);
    close $s;
    return $r;
}

# several commands in one go; returns the replies
sub cmds {
    my ($self, @list) = @_;
    return map { $self->cmd(@$_) } @list;
}


# MONITOR: every command the server executes, in order

sub monitor_start {
    my ($self) = @_;
    my $file = "$self->{dir}/monitor." . ++$self->{mon_seq};
    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        # POSIX::_exit: the END blocks of the parent must not run here
        $SIG{TERM} = sub { POSIX::_exit(0) };
        open my $out, '>', $file or POSIX::_exit(1);
        $out->autoflush(1);
        my $s = eval { $self->connect() } or POSIX::_exit(1);
        my $buf = '';
        my $req = '';
        $req .= encode('AUTH', $self->{password}) if $self->{password};
        syswrite($s, $req . encode('MONITOR'));
        for (;;) {
            my $r = eval { read_reply($s, \$buf, time + 3600) };
            POSIX::_exit(0) unless defined $r;
            print $out "$r\n";
        }
    }
    $self->{mon_pid} = $pid;
    $self->{mon_file} = $file;
    # MONITOR answers +OK first
    wait_for(sub { (read_file($file) // '') =~ /^OK$/m }, 5);
    return $file;
}

# stops the monitor; returns the commands seen (the part after the
# "[db addr]" prefix), without the MONITOR's own OK
sub monitor_stop {
    my ($self) = @_;
    my $pid = delete $self->{mon_pid} or return ();
    sleep(0.2);
    CORE::kill 'TERM', $pid;
    waitpid($pid, 0);
    my @l = split /\n/, read_file($self->{mon_file}) // '';
    return map { /^\d+\.\d+ \[\d+ [^\]]+\] (.*)$/ ? $1 : () } @l;
}

END {
    local $?;
    for my $r (@servers) {
        if (my $m = delete $r->{mon_pid}) {
            CORE::kill 'TERM', $m;
            waitpid($m, 0);
        }
        $r->stop();
    }
}


# t/bin/redis-hostile.pl on port($name) in front of the real Redis $r:
# it misbehaves as ->mode('MODE') says ("proxy": it behaves).  Stopped
# at the end of the test.
my @hostiles;

sub start_hostile_redis {
    my ($r, %opt) = @_;
    my $name = $opt{name} // 'hostile';
    my $dir = testdir() . "/$name";
    make_path($dir);
    my $self = bless { ctl => "$dir/mode", port => SmtpExt::Test::port($name),
        dir => $dir }, 'SmtpExt::Redis::Hostile';
    $self->mode('proxy');

    my $pid = fork();
    die "fork: $!" unless defined $pid;
    if ($pid == 0) {
        open STDOUT, '>', "$dir/stdout.log";
        open STDERR, '>', "$dir/stderr.log";
        exec($^X, "$root/t/bin/redis-hostile.pl", '--port', $self->{port},
            '--redis-port', $r->port, '--control', $self->{ctl},
            '--pidfile', "$dir/pid", '--stream-time',
            $opt{stream_time} // 10)
            or POSIX::_exit(127);
    }
    $self->{pid} = $pid;
    push @hostiles, $self;
    die "redis-hostile.pl did not start\n"
        unless wait_for(sub { -e "$dir/pid" }, 10);
    return $self;
}

END {
    local $?;
    SmtpExt::Test::stop_process($_, 5) for @hostiles;
}

package SmtpExt::Redis::Hostile;

sub port { $_[0]{port} }

sub mode {
    my ($self, $mode) = @_;
    SmtpExt::Test::write_file($self->{ctl}, "$mode\n");
}

package SmtpExt::Redis;

# password hashes for user:LOGIN

sub b64 {
    require MIME::Base64;
    return MIME::Base64::encode_base64($_[0], '');
}

sub salt_chars {
    my ($n) = @_;
    my @c = ('a' .. 'z', 'A' .. 'Z', '0' .. '9', '.', '/');
    return join '', map { $c[int rand @c] } 1 .. $n;
}

sub checked_crypt {
    my ($pw, $setting) = @_;
    my $h = crypt($pw, $setting);
    die "crypt() does not support $setting\n"
        unless defined $h && $h =~ /^\$/ && length($h) > length($setting);
    return $h;
}

# $6$ (SHA-512 crypt), optional rounds
sub hash_sha512 {
    my ($pw, $rounds) = @_;
    my $r = $rounds ? "rounds=$rounds\$" : '';
    return checked_crypt($pw, "\$6\$$r" . salt_chars(16));
}

# $y$ (yescrypt, libxcrypt); j9T is the Debian default cost
sub hash_yescrypt {
    my ($pw, $cost) = @_;
    return checked_crypt($pw, '$y$' . ($cost // 'j9T') . '$'
        . salt_chars(20));
}

# $2b$ (bcrypt, libxcrypt); the last salt character carries 2 bits only
sub hash_bcrypt {
    my ($pw, $cost) = @_;
    return checked_crypt($pw, sprintf('$2b$%02d$', $cost // 5)
        . salt_chars(21) . 'u');
}

# {SSHA}: base64(SHA1(pw . salt) . salt)
sub hash_ssha {
    my ($pw) = @_;
    require Digest::SHA;
    my $salt = join '', map { chr int rand 256 } 1 .. 8;
    return '{SSHA}' . b64(Digest::SHA::sha1($pw . $salt) . $salt);
}

# the base64 CRAM-MD5 answer to a "334 base64-challenge" line
sub cram_md5_response {
    my ($user, $secret, $challenge_line) = @_;
    require Digest::MD5;
    require MIME::Base64;
    my ($b) = $challenge_line =~ /^334 (\S+)/ or return undef;
    my $chal = MIME::Base64::decode_base64($b);
    my $key = $secret;
    $key = Digest::MD5::md5($key) if length $key > 64;
    $key .= "\0" x (64 - length $key);
    my $inner = Digest::MD5::md5(($key ^ ("\x36" x 64)) . $chal);
    my $hmac = Digest::MD5::md5_hex(($key ^ ("\x5c" x 64)) . $inner);
    return b64("$user $hmac");
}

1;
