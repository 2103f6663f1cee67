#!/usr/bin/env python3
"""Benchmark of ngx_mail_smtp_ext against the alternatives (make bench).

Every candidate relays to the same postfix smtp-sink on 127.0.0.1:

  ext-redis  the module, routing by a Redis domain: key per recipient
  ext        the module without Redis (smtp_ext_pass)
  mail       stock nginx mail proxy (smtp_auth none) + an nginx auth_http
  stream     nginx stream, a raw TCP proxy (the floor)
  direct     smtp-source straight to smtp-sink (the ceiling)

Workloads (smtp-source): one 1 KiB message per new session, many 1 KiB
messages per session, 100 KiB messages, and the memory of idle sessions
after EHLO.  bdat100k (smtp_ext only, not in the default set): 100 KiB
messages in BDAT chunks of 16 KiB from this script's own client, to its
own sink without CHUNKING (converted to DATA) and with it (BDAT), beside
the same client sending DATA; CPU per MB of the nginx under test.
auth1k (not in the default set either): sessions of EHLO, AUTH PLAIN
against a {PLAIN} user in Redis, QUIT, from this script's client, to the
module without and with smtp_ext_redis_cache; CPU of nginx and of Redis
per 1000 AUTHs.  The stable figure is the CPU time (utime + stime from
/proc) of the proxy's processes per 1000 messages, the median of
BENCH_REPS interleaved repetitions; Redis and the auth_http server are
counted apart.  Prints one table, writes bench/results/latest.txt and
(unless BENCH_DOC=0) the generated part of docs/performance.md and
docs/performance-cpu.png.

Environment: SMTP_EXT_MODULE, NGINX_BIN, NGX_MAIL_MODULE,
NGX_STREAM_MODULE, REDIS_SERVER, BENCH_REPS (3), BENCH_NEW_MSGS (10000),
BENCH_SESSION_MSGS (40000), BENCH_BIG_MSGS (4000), BENCH_IDLE (2000),
BENCH_CANDIDATES, BENCH_WORKLOADS (comma lists), BENCH_DOC (1),
BENCH_BDAT_MSGS (2000), BENCH_BDAT_SESSIONS (20), BENCH_AUTH (10000),
BENCH_KEEP (keep the work directory).  Only 127.0.0.1 is used.
"""

import atexit
import datetime
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, 'bench', 'conf')
RESULTS = os.path.join(ROOT, 'bench', 'results')
DOC = os.path.join(ROOT, 'docs', 'performance.md')
CHART = os.path.join(ROOT, 'docs', 'performance-cpu.png')

NGINX = os.environ.get('NGINX_BIN', '/usr/sbin/nginx')
MODULE = os.environ.get(
    'SMTP_EXT_MODULE',
    os.path.join(ROOT, 'build', 'modules', 'ngx_mail_smtp_ext_module.so'))
MAIL_MODULE = os.environ.get(
    'NGX_MAIL_MODULE', '/usr/lib/nginx/modules/ngx_mail_module.so')
STREAM_MODULE = os.environ.get(
    'NGX_STREAM_MODULE', '/usr/lib/nginx/modules/ngx_stream_module.so')
REDIS = os.environ.get('REDIS_SERVER', '/usr/bin/redis-server')
SINK = '/usr/sbin/smtp-sink'
SOURCE = '/usr/sbin/smtp-source'


def env_int(name, default):
    return int(os.environ.get(name, default))


REPS = env_int('BENCH_REPS', 3)

# The proxy under test on CPU 0, load generator, sink, Redis and the
# auth_http server on CPU 1: on a 2-core machine they then do not take
# turns on the proxy's core, which makes its CPU time per message stable.
PIN = env_int('BENCH_PIN', 1 if os.cpu_count() and os.cpu_count() >= 2
              else 0)


def pinned(cmd, cpu):
    return (['taskset', '-c', str(cpu)] + cmd) if PIN else cmd
IDLE = env_int('BENCH_IDLE', 2000)
TICK = os.sysconf('SC_CLK_TCK')
RUN_TIMEOUT = 180          # seconds for one smtp-source run
TOTAL_TIMEOUT = 30 * 60    # the whole bench

SENDER = 'sender@client.test'
RCPT = 'user@bench.test'
HELO = 'client.test'

# name, label, smtp-source arguments, messages, payload bytes
WORKLOADS = [
    ('new1k', 'new session, 1 KiB',
     ['-s', '50'], env_int('BENCH_NEW_MSGS', 10000), 1024),
    ('session1k', 'many msgs/session, 1 KiB',
     ['-d', '-s', '50'], env_int('BENCH_SESSION_MSGS', 40000), 1024),
    ('big100k', '100 KiB msgs, many/session',
     ['-d', '-s', '20'], env_int('BENCH_BIG_MSGS', 4000), 102400),
]

CANDIDATES = ['ext-redis', 'ext-cache', 'ext', 'ext-zone', 'mail', 'stream',
              'direct']
LABELS = {
    'ext-redis': 'smtp_ext + Redis',
    'ext-cache': 'smtp_ext + Redis + cache',
    'ext': 'smtp_ext, smtp_ext_pass',
    'ext-zone': 'smtp_ext, pool with zone',
    'mail': 'stock nginx mail',
    'stream': 'nginx stream',
    'direct': 'direct to smtp-sink',
}


def sel(name, allowed):
    v = os.environ.get(name)
    if not v:
        return allowed
    want = [x.strip() for x in v.split(',') if x.strip()]
    bad = [x for x in want if x not in allowed]
    if bad:
        sys.exit('%s: unknown %s' % (name, ', '.join(bad)))
    return [x for x in allowed if x in want]


CANDS = sel('BENCH_CANDIDATES', CANDIDATES)
ALL_WLS = [x[0] for x in WORKLOADS] + ['idle', 'bdat100k', 'auth1k']
WLS = [w for w in WORKLOADS if w[0] in sel('BENCH_WORKLOADS', ALL_WLS)]
DO_IDLE = 'idle' in sel('BENCH_WORKLOADS', ALL_WLS)
# bdat100k only when asked for: the default set stays as it was
DO_BDAT = 'bdat100k' in [x.strip() for x in
                         (os.environ.get('BENCH_WORKLOADS') or '').split(',')]
DO_AUTH = 'auth1k' in [x.strip() for x in
                         (os.environ.get('BENCH_WORKLOADS') or '').split(',')]
AUTH_SESSIONS = env_int('BENCH_AUTH', 10000)
AUTH_USER = 'bench'
AUTH_PASSWORD = 'bench-secret'
BDAT_MSGS = env_int('BENCH_BDAT_MSGS', 2000)
BDAT_SESSIONS = env_int('BENCH_BDAT_SESSIONS', 20)
BDAT_SIZE = 102400
BDAT_CHUNK = 16384


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- processes --------------------------------------------------------

procs = []        # every child we started, killed at exit
workdir = None


def cleanup():
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(5)
            except Exception:
                try:
                    p.kill()
                    p.wait(5)
                except Exception:
                    pass
    if workdir and not os.environ.get('BENCH_KEEP'):
        shutil.rmtree(workdir, ignore_errors=True)


def on_signal(sig, frame):
    sys.exit('bench: interrupted (signal %d)' % sig)


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    p = s.getsockname()[1]
    s.close()
    return p


def listening(port):
    try:
        socket.create_connection(('127.0.0.1', port), 0.5).close()
        return True
    except OSError:
        return False


def wait_listen(port, proc, what, logfile=None):
    end = time.time() + 10
    while time.time() < end:
        if proc.poll() is not None:
            break
        if listening(port):
            return
        time.sleep(0.05)
    text = ''
    if logfile and os.path.exists(logfile):
        with open(logfile) as f:
            text = f.read()[-2000:]
    sys.exit('bench: %s did not start\n%s' % (what, text))


def proc_cpu(pid, user_only=False):
    """utime + stime (or utime) of one process, in clock ticks"""
    with open('/proc/%d/stat' % pid) as f:
        st = f.read()
    fields = st[st.rindex(')') + 2:].split()
    # fields[0] is field 3 (state): utime and stime are fields 14, 15
    if user_only:
        return int(fields[11])
    return int(fields[11]) + int(fields[12])


def children(pid):
    out = []
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % d) as f:
                st = f.read()
        except OSError:
            continue
        if int(st[st.rindex(')') + 2:].split()[1]) == pid:
            out.append(int(d))
    return out


def rss_kb(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


class Nginx:
    def __init__(self, name, port, ports):
        self.name = name
        self.port = port
        self.dir = os.path.join(workdir, name)
        os.makedirs(os.path.join(self.dir, 'tmp'), exist_ok=True)
        with open(os.path.join(CONF, 'head.conf.in')) as f:
            head = f.read()
        with open(os.path.join(CONF, name + '.conf.in')) as f:
            text = f.read().replace('@HEAD@', head)
        subst = {
            '@DIR@': self.dir, '@PORT@': str(port), '@MODULE@': MODULE,
            '@MAIL_MODULE@': MAIL_MODULE, '@STREAM_MODULE@': STREAM_MODULE,
        }
        for k, v in ports.items():
            subst['@PORT_%s@' % k] = str(v)
        for k, v in subst.items():
            text = text.replace(k, v)
        self.conf = os.path.join(self.dir, 'nginx.conf')
        with open(self.conf, 'w') as f:
            f.write(text)
        self.proc = None

    def start(self):
        err = os.path.join(self.dir, 'error.log')
        out = open(os.path.join(self.dir, 'stderr.log'), 'w')
        self.proc = subprocess.Popen(
            pinned([NGINX, '-p', self.dir + '/', '-c', self.conf, '-e', err],
                   1 if self.name == 'auth' else 0),
            stdout=out, stderr=subprocess.STDOUT)
        procs.append(self.proc)
        wait_listen(self.port, self.proc, 'nginx ' + self.name,
                    os.path.join(self.dir, 'stderr.log'))
        end = time.time() + 5
        while not self.workers() and time.time() < end:
            time.sleep(0.05)
        if len(self.workers()) != 1:
            sys.exit('bench: nginx %s: no single worker' % self.name)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def workers(self):
        return children(self.proc.pid)

    def pids(self):
        return [self.proc.pid] + self.workers()


def start_sink(port):
    u = ['-u', 'nobody'] if os.geteuid() == 0 else []
    out = open(os.path.join(workdir, 'sink.log'), 'w')
    p = subprocess.Popen(
        pinned([SINK] + u + ['-m', '4096', '127.0.0.1:%d' % port, '4096'], 1),
        stdout=out, stderr=subprocess.STDOUT)
    procs.append(p)
    wait_listen(port, p, 'smtp-sink', os.path.join(workdir, 'sink.log'))
    return p


def redis_cmd(port, *args):
    s = socket.create_connection(('127.0.0.1', port), 5)
    req = '*%d\r\n' % len(args)
    for a in args:
        req += '$%d\r\n%s\r\n' % (len(a.encode()), a)
    s.sendall(req.encode())
    reply = s.recv(4096).decode()
    s.close()
    if reply[:1] == '-':
        sys.exit('bench: redis: ' + reply)
    return reply


def start_redis(port, sink_port, name='redis'):
    d = os.path.join(workdir, name)
    os.makedirs(d)
    out = open(os.path.join(d, 'redis.log'), 'w')
    p = subprocess.Popen(
        pinned([REDIS, '--port', str(port), '--bind', '127.0.0.1', '--save',
                '', '--appendonly', 'no', '--dir', d, '--daemonize', 'no'],
               1),
        stdout=out, stderr=subprocess.STDOUT)
    procs.append(p)
    wait_listen(port, p, 'redis-server', os.path.join(d, 'redis.log'))
    redis_cmd(port, 'SET', 'domain:' + RCPT.split('@')[1],
              '127.0.0.1:%d' % sink_port)
    return p


# --- measurements -----------------------------------------------------

def cpu_of(pids, user_only=False):
    return sum(proc_cpu(p, user_only) for p in pids)


def run_load(cmd):
    """a load generator on CPU 1; returns its wall time, exits if it fails"""
    cmd = pinned(cmd, 1)
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=RUN_TIMEOUT)
    t = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit('bench: %s failed (%d):\n%s'
                 % (' '.join(cmd), r.returncode,
                    r.stdout.decode(errors='replace')[-2000:]))
    return t


def run_source(port, args, msgs, size):
    return run_load([SOURCE] + args
                    + ['-m', str(msgs), '-l', str(size), '-f', SENDER, '-t',
                       RCPT, '-M', HELO, '127.0.0.1:%d' % port])


def read_reply(s, buf):
    """reads one complete SMTP reply; returns (code, rest of buffer)"""
    while True:
        while b'\r\n' in buf:
            line, buf = buf.split(b'\r\n', 1)
            if len(line) < 4 or line[3:4] != b'-':
                return line[:3], buf
        chunk = s.recv(4096)
        if not chunk:
            raise OSError('connection closed')
        buf += chunk


def idle_sessions(port, n):
    """n sessions: greeting, EHLO and its reply; returns the sockets"""
    socks = []
    for _ in range(n):
        s = socket.create_connection(('127.0.0.1', port), 10)
        s.settimeout(10)
        code, buf = read_reply(s, b'')
        if code != b'220':
            raise OSError('greeting %r' % code)
        s.sendall(b'EHLO ' + HELO.encode() + b'\r\n')
        code, buf = read_reply(s, buf)
        if code != b'250':
            raise OSError('EHLO %r' % code)
        socks.append(s)
    return socks


def measure_idle(ng):
    """bytes of worker RSS per idle session after EHLO"""
    w = ng.workers()[0]
    time.sleep(0.2)
    before = rss_kb(w)
    socks = idle_sessions(ng.port, IDLE)
    time.sleep(0.5)
    after = rss_kb(w)
    for s in socks:
        s.close()
    return (after - before) * 1024.0 / IDLE


# --- output ---------------------------------------------------------------

def fmt(v, nd=0):
    if v is None:
        return 'n/a'
    return '%.*f' % (nd, v)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def versions():
    def out(cmd):
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=10)
            return r.stdout.decode(errors='replace').strip()
        except Exception as e:
            return 'n/a (%s)' % e
    cpu = 'unknown'
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    rev = out(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'])
    dirty = out(['git', '-C', ROOT, 'status', '--porcelain', '--',
                 'ngx_mail_smtp_ext', 'config'])
    return [
        ('nginx', out([NGINX, '-v']).replace('nginx version: ', '')),
        ('module', '%s (git %s%s)' % (MODULE, rev,
                                      ', modified' if dirty else '')),
        ('postfix smtp-source/sink',
         out(['/usr/sbin/postconf', '-h', 'mail_version'])),
        ('redis', out([REDIS, '--version'])),
        ('kernel', platform.release()),
        ('cpu', '%s, %d cores' % (cpu, os.cpu_count())),
        ('python', platform.python_version()),
    ]


def commands(ports):
    lines = []
    for name, label, args, msgs, size in WLS:
        lines.append('%-10s %s' % (name, ' '.join(
            [SOURCE] + args + ['-m', str(msgs), '-l', str(size), '-f',
                               SENDER, '-t', RCPT, '-M', HELO,
                               '127.0.0.1:PORT'])))
    lines.append('%-10s %s' % ('sink', ' '.join(
        [SINK, '-u', 'nobody', '-m', '4096', '127.0.0.1:PORT', '4096'])))
    if PIN:
        lines.append('%-10s %s' % ('pinning', 'taskset -c 0 for the nginx '
                     'under test; taskset -c 1 for smtp-source, smtp-sink, '
                     'redis-server and the auth_http nginx (BENCH_PIN=0 '
                     'turns it off)'))
    return lines


# --- bdat100k: a BDAT client and a sink of our own ------------------------
#
# smtp-source and smtp-sink speak no BDAT.  Both sides below run as
# processes of this script ("bench.py --bdat-sink ..." / "--bdat-client
# ...") pinned like smtp-source and smtp-sink.

def bdat_sink(port, chunking):
    """a threaded SMTP sink: DATA and, with chunking, BDAT; drops it all"""
    import threading

    caps = b'250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n'
    if chunking:
        caps += b'250-CHUNKING\r\n'
    caps += b'250 ENHANCEDSTATUSCODES\r\n'

    def conn(s):
        buf = b''

        def more():
            nonlocal buf
            d = s.recv(262144)
            if not d:
                raise EOFError
            buf += d

        try:
            s.sendall(b'220 sink ESMTP\r\n')
            while True:
                while b'\r\n' not in buf:
                    more()
                line, buf = buf.split(b'\r\n', 1)
                v = line[:4].upper()
                if v == b'EHLO':
                    s.sendall(caps)
                elif v == b'DATA':
                    s.sendall(b'354 go\r\n')
                    buf = b'\r\n' + buf
                    at = 0
                    while True:
                        i = buf.find(b'\r\n.\r\n', at)
                        if i >= 0:
                            buf = buf[i + 5:]
                            break
                        at = max(0, len(buf) - 4)
                        more()
                    s.sendall(b'250 2.0.0 Ok: queued\r\n')
                elif v == b'BDAT':
                    parts = line.split()
                    n = int(parts[1])
                    while len(buf) < n:
                        more()
                    buf = buf[n:]
                    s.sendall(b'250 2.0.0 Ok: queued\r\n'
                              if len(parts) > 2 else b'250 2.0.0 Ok\r\n')
                elif v == b'QUIT':
                    s.sendall(b'221 2.0.0 Bye\r\n')
                    break
                else:
                    s.sendall(b'250 2.0.0 Ok\r\n')
        except (EOFError, OSError):
            pass
        s.close()

    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(('127.0.0.1', port))
    ls.listen(1024)
    while True:
        s, _ = ls.accept()
        threading.Thread(target=conn, args=(s,), daemon=True).start()


def bdat_message():
    body = b''
    i = 0
    while len(body) < BDAT_SIZE:
        body += (b'line %06d ' % i) + b'x' * 66 + b'\r\n'
        i += 1
    return body[:BDAT_SIZE - 2] + b'\r\n'


def bdat_client(port, mode, msgs, sessions):
    """sessions in threads, msgs in all: BDAT chunks or DATA"""
    import threading

    body = bdat_message()
    if mode == 'bdat':
        chunks = [body[i:i + BDAT_CHUNK]
                  for i in range(0, len(body), BDAT_CHUNK)]
        wire = b''
        for k, c in enumerate(chunks):
            wire += b'BDAT %d%s\r\n' % (
                len(c), b' LAST' if k == len(chunks) - 1 else b'') + c
        nreplies = len(chunks)
    else:
        wire = body + b'.\r\n'
        nreplies = 1
    env = ('MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\n' % (SENDER, RCPT)).encode()
    errors = []

    def run(n):
        try:
            s = socket.create_connection(('127.0.0.1', port), 10)
            s.settimeout(60)
            code, buf = read_reply(s, b'')
            s.sendall(b'EHLO ' + HELO.encode() + b'\r\n')
            code, buf = read_reply(s, buf)
            for _ in range(n):
                s.sendall(env + (b'DATA\r\n' if mode == 'data' else b''))
                for _ in range(2):
                    code, buf = read_reply(s, buf)
                    if code[:1] != b'2':
                        raise OSError('envelope %r' % code)
                if mode == 'data':
                    code, buf = read_reply(s, buf)
                    if code != b'354':
                        raise OSError('DATA %r' % code)
                s.sendall(wire)
                for _ in range(nreplies):
                    code, buf = read_reply(s, buf)
                    if code != b'250':
                        raise OSError('message %r' % code)
            s.sendall(b'QUIT\r\n')
            read_reply(s, buf)
            s.close()
        except Exception as e:
            errors.append(str(e))

    per = [msgs // sessions + (1 if i < msgs % sessions else 0)
           for i in range(sessions)]
    ts = [threading.Thread(target=run, args=(n,)) for n in per if n]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        sys.exit('bdat client: %d sessions failed: %s'
                 % (len(errors), errors[0]))


def bdat_bench():
    """bdat100k: returns the table rows"""
    me = os.path.abspath(__file__)
    ports = {k: free_port() for k in ('psink', 'csink', 'ext', 'bdat-ck')}
    for name, ck in (('psink', 'plain'), ('csink', 'chunking')):
        out = open(os.path.join(workdir, name + '.log'), 'w')
        p = subprocess.Popen(pinned([sys.executable, me, '--bdat-sink',
                                     str(ports[name]), ck], 1),
                             stdout=out, stderr=subprocess.STDOUT)
        procs.append(p)
        wait_listen(ports[name], p, 'sink ' + name,
                    os.path.join(workdir, name + '.log'))

    ng = Nginx('ext-bdat', ports['ext'], ports)
    ng.start()

    cases = [
        ('DATA, sink without CHUNKING', 'data', ports['ext']),
        ('BDAT to DATA (no CHUNKING)', 'bdat', ports['ext']),
        ('BDAT to BDAT (CHUNKING)', 'bdat', ports['bdat-ck']),
    ]
    runs = {}
    for rep in range(REPS):
        for label, mode, port in cases:
            pp = ng.pids()
            p0 = cpu_of(pp)
            t = run_load([sys.executable, me, '--bdat-client', str(port),
                          mode, str(BDAT_MSGS), str(BDAT_SESSIONS)])
            time.sleep(0.2)
            p1 = cpu_of(pp)
            mb = BDAT_MSGS * BDAT_SIZE / 1e6
            ms_mb = (p1 - p0) * 1000.0 / TICK / mb
            runs.setdefault(label, []).append((t, mb / t, ms_mb))
            log('bdat100k %d/%d %-30s %6.2fs %7.1f MB/s cpu %.2f ms/MB'
                % (rep + 1, REPS, label, t, mb / t, ms_mb))
    ng.stop()

    hdr = '%-10s %-32s %8s %7s %8s' % ('workload', 'smtp_ext, client -> '
                                       'backend', 'msgs/s', 'MB/s', 'ms/MB')
    rows = [hdr, '-' * len(hdr)]
    for label, mode, port in cases:
        rs = runs[label]
        t = statistics.median(r[0] for r in rs)
        rows.append('%-10s %-32s %8.0f %7.1f %8.2f' % (
            'bdat100k', label, BDAT_MSGS / t,
            statistics.median(r[1] for r in rs),
            statistics.median(r[2] for r in rs)))
    rows.append('')
    rows.append('bdat100k: %d messages of %d octets, %d sessions; chunks of '
                '%d octets; ms/MB: CPU of the nginx under test per MB of '
                'payload, median of %d.' % (BDAT_MSGS, BDAT_SIZE,
                                            BDAT_SESSIONS, BDAT_CHUNK, REPS))
    return rows


# --- auth1k: AUTH PLAIN sessions ---------------------------------------

def auth_client(port, n, threads):
    """n sessions in threads: EHLO, AUTH PLAIN, QUIT; every AUTH 235"""
    import base64
    import threading

    auth = base64.b64encode(('\0%s\0%s' % (AUTH_USER, AUTH_PASSWORD))
                            .encode())
    wire = b'EHLO ' + HELO.encode() + b'\r\nAUTH PLAIN ' + auth + b'\r\n'
    errors = []

    def run(k):
        try:
            for _ in range(k):
                s = socket.create_connection(('127.0.0.1', port), 10)
                s.settimeout(30)
                code, buf = read_reply(s, b'')
                s.sendall(wire)
                code, buf = read_reply(s, buf)
                code, buf = read_reply(s, buf)
                if code != b'235':
                    raise OSError('AUTH %r' % code)
                s.sendall(b'QUIT\r\n')
                read_reply(s, buf)
                s.close()
        except Exception as e:
            errors.append(str(e))

    per = [n // threads + (1 if i < n % threads else 0)
           for i in range(threads)]
    ts = [threading.Thread(target=run, args=(k,)) for k in per if k]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    if errors:
        sys.exit('auth client: %d threads failed: %s'
                 % (len(errors), errors[0]))


def auth_bench():
    """auth1k: returns the table rows"""
    me = os.path.abspath(__file__)
    ports = {k: free_port() for k in ('sink', 'redis', 'ext-auth',
                                      'ext-auth-cache')}
    redis = start_redis(ports['redis'], ports['sink'], 'redis-auth')
    redis_cmd(ports['redis'], 'HSET', 'user:' + AUTH_USER, 'password',
              '{PLAIN}' + AUTH_PASSWORD)

    cases = [('ext-auth', 'smtp_ext + Redis'),
             ('ext-auth-cache', 'smtp_ext + Redis + cache')]
    ngx = {c: Nginx(c, ports[c], ports) for c, _ in cases}
    for c in ngx:
        ngx[c].start()

    runs = {}
    for rep in range(REPS):
        for c, label in cases:
            pp = ngx[c].pids()
            p0, r0 = cpu_of(pp), cpu_of([redis.pid])
            t = run_load([sys.executable, me, '--auth-client', str(ports[c]),
                          str(AUTH_SESSIONS), '20'])
            time.sleep(0.2)
            k = AUTH_SESSIONS / 1000.0
            ng = (cpu_of(pp) - p0) * 1000.0 / TICK / k
            rd = (cpu_of([redis.pid]) - r0) * 1000.0 / TICK / k
            runs.setdefault(c, []).append((t, ng, rd))
            log('auth1k %d/%d %-26s %6.2fs nginx %.1f ms/1k redis %.1f '
                'ms/1k' % (rep + 1, REPS, label, t, ng, rd))
    for c in ngx:
        ngx[c].stop()
    redis.terminate()
    redis.wait(10)

    hdr = '%-10s %-28s %9s %12s %12s' % ('workload', 'candidate',
                                          'AUTH/s', 'nginx ms/1k',
                                          'Redis ms/1k')
    rows = [hdr, '-' * len(hdr)]
    for c, label in cases:
        rs = runs[c]
        rows.append('%-10s %-28s %9.0f %12.1f %12.1f' % (
            'auth1k', label,
            AUTH_SESSIONS / statistics.median(x[0] for x in rs),
            statistics.median(x[1] for x in rs),
            statistics.median(x[2] for x in rs)))
    rows.append('')
    rows.append('auth1k: %d sessions of EHLO, AUTH PLAIN ({PLAIN} user), '
                'QUIT, 20 client threads; CPU per 1000 AUTHs, median of %d.'
                % (AUTH_SESSIONS, REPS))
    return rows


def main():
    global workdir
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(TOTAL_TIMEOUT)
    atexit.register(cleanup)

    for path in (NGINX, SINK, SOURCE, REDIS, MAIL_MODULE):
        if not os.path.exists(path):
            sys.exit('bench: missing %s' % path)
    if not os.path.exists(MODULE):
        sys.exit('bench: missing %s (make build)' % MODULE)
    if 'stream' in CANDS and not os.path.exists(STREAM_MODULE):
        sys.exit('bench: missing %s (apt-get install libnginx-mod-stream)'
                 % STREAM_MODULE)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    if want < IDLE * 2 + 100:
        sys.exit('bench: open files limit %d is too low' % want)

    workdir = tempfile.mkdtemp(prefix='smtp-ext-bench-')
    os.chmod(workdir, 0o755)

    for flag, fn, name in ((DO_BDAT, bdat_bench, 'bdat100k'),
                           (DO_AUTH, auth_bench, 'auth1k')):
        rows = fn() if flag else []
        if rows:
            print()
            print('\n'.join(rows))
            os.makedirs(RESULTS, exist_ok=True)
            with open(os.path.join(RESULTS, name + '.txt'), 'w') as f:
                f.write('\n'.join(rows) + '\n')
    if (DO_BDAT or DO_AUTH) and not WLS and not DO_IDLE:
        return

    ports = {k: free_port() for k in
             ('sink', 'redis', 'auth', 'ext-redis', 'ext-cache', 'ext',
              'ext-zone', 'mail', 'stream')}
    ports['direct'] = ports['sink']

    sink = start_sink(ports['sink'])
    redis = start_redis(ports['redis'], ports['sink']) \
        if 'ext-redis' in CANDS or 'ext-cache' in CANDS else None
    auth = None
    if 'mail' in CANDS:
        auth = Nginx('auth', ports['auth'], ports)
        auth.start()

    ngx = {c: Nginx(c, ports[c], ports) for c in CANDS if c != 'direct'}

    # idle memory first, each on a fresh nginx so that malloc has no
    # free memory left over from earlier sessions
    mem = {c: [] for c in CANDS}
    if DO_IDLE:
        for rep in range(REPS):
            for c in CANDS:
                if c == 'direct':
                    continue
                ngx[c].start()
                try:
                    mem[c].append(measure_idle(ngx[c]))
                finally:
                    ngx[c].stop()
                log('idle %d/%d %-10s %6.0f bytes/session'
                    % (rep + 1, REPS, c, mem[c][-1]))
                time.sleep(0.5)

    for c in ngx:
        ngx[c].start()

    def aux_pids(c):
        if c in ('ext-redis', 'ext-cache'):
            return [redis.pid]
        if c == 'mail':
            return auth.pids()
        return []

    def proxy_pids(c):
        return [] if c == 'direct' else ngx[c].pids()

    runs = {}    # (workload, cand) -> list of dicts
    for name, label, args, msgs, size in WLS:
        for rep in range(REPS):
            for c in CANDS:
                pp, ap = proxy_pids(c), aux_pids(c)
                p0, a0, s0 = cpu_of(pp), cpu_of(ap), cpu_of([sink.pid])
                u0 = cpu_of(pp, True)
                t = run_source(ports[c], args, msgs, size)
                time.sleep(0.2)     # let the proxy finish its closes
                p1, a1, s1 = cpu_of(pp), cpu_of(ap), cpu_of([sink.pid])
                u1 = cpu_of(pp, True)
                mb = msgs * size / 1e6
                r = {
                    'time': t,
                    'msgs_s': msgs / t,
                    'mb_s': mb / t,
                    # ms of CPU per 1000 messages
                    'cpu': (p1 - p0) * 1000.0 / TICK / msgs * 1000
                    if pp else None,
                    'aux': (a1 - a0) * 1000.0 / TICK / msgs * 1000
                    if ap else None,
                    'sink': (s1 - s0) * 1000.0 / TICK / msgs * 1000,
                    # share of user time in the proxy's CPU
                    'usr': (u1 - u0) / float(p1 - p0)
                    if pp and p1 > p0 else None,
                    'mb': mb,
                }
                runs.setdefault((name, c), []).append(r)
                log('%-9s %d/%d %-10s %6.2fs %8.0f msg/s %7.1f MB/s '
                    'cpu %s ms/1k (usr %s) aux %s sink %.0f'
                    % (name, rep + 1, REPS, c, t, r['msgs_s'], r['mb_s'],
                       fmt(r['cpu'], 1), fmt(r['usr'], 2), fmt(r['aux'], 1),
                       r['sink']))

    def med(name, c, key):
        vals = [r[key] for r in runs[(name, c)] if r[key] is not None]
        return statistics.median(vals) if vals else None

    # --- the table ------------------------------------------------------
    hdr = ('%-10s %-24s %8s %7s %10s %8s %11s %9s %7s'
           % ('workload', 'candidate', 'msgs/s', 'MB/s', 'CPU ms/1k',
              'ms/MB', 'aux ms/1k', 'x stream', 'x mail'))
    rows = []
    summary = {}
    for name, label, args, msgs, size in WLS:
        for c in CANDS:
            cpu = med(name, c, 'cpu')
            aux = med(name, c, 'aux')
            # ms of CPU per MB of payload
            per_mb = cpu / 1000.0 / (size / 1e6) \
                if cpu is not None else None
            st = med(name, 'stream', 'cpu') if 'stream' in CANDS else None
            ml = med(name, 'mail', 'cpu') if 'mail' in CANDS else None
            summary[(name, c)] = cpu
            auxs = ''
            if aux is not None:
                auxs = ('%s %s' % (fmt(aux, 1),
                                   'redis' if c in ('ext-redis', 'ext-cache')
                                   else 'auth'))
            rows.append('%-10s %-24s %8s %7s %10s %8s %11s %9s %7s' % (
                name, LABELS[c], fmt(med(name, c, 'msgs_s')),
                fmt(med(name, c, 'mb_s'), 1), fmt(cpu, 1),
                fmt(per_mb, 2), auxs or '-',
                fmt(ratio(cpu, st), 2), fmt(ratio(cpu, ml), 2)))
        rows.append('')
    if DO_IDLE:
        st = statistics.median(mem['stream']) if mem.get('stream') else None
        ml = statistics.median(mem['mail']) if mem.get('mail') else None
        for c in CANDS:
            v = statistics.median(mem[c]) if mem[c] else None
            summary[('idle', c)] = v
            rows.append('%-10s %-24s %8s %7s %10s %8s %11s %9s %7s' % (
                'idle', LABELS[c], '', '', fmt(v) + ' B/ses'
                if v is not None else 'n/a', '', '',
                fmt(ratio(v, st), 2), fmt(ratio(v, ml), 2)))
    table = '\n'.join([hdr, '-' * len(hdr)] + rows).rstrip()

    # --- targets ----------------------------------------------------------
    checks = []

    def target(desc, val, limit, unit=''):
        if val is None:
            checks.append('  n/a   %s' % desc)
        else:
            ok = val <= limit
            checks.append('  %-5s %s: %.2f%s (limit %s%s)'
                          % ('PASS' if ok else 'FAIL', desc, val, unit,
                             limit, unit))

    def xs(name):
        return ratio(summary.get((name, 'ext-redis')),
                     summary.get((name, 'stream')))
    target('new session 1 KiB, smtp_ext+Redis CPU/msg vs stream',
           xs('new1k'), 1.0, 'x')
    target('many msgs/session, smtp_ext+Redis CPU/msg vs stream',
           xs('session1k'), 1.1, 'x')
    target('100 KiB msgs, smtp_ext+Redis CPU/MB vs stream',
           xs('big100k'), 1.0, 'x')
    target('idle session after EHLO, smtp_ext+Redis bytes',
           summary.get(('idle', 'ext-redis')), 3000, ' B')

    now = datetime.datetime.now(datetime.timezone.utc)
    vers = versions()
    cmds = commands(ports)
    notes = [
        'CPU ms/1k: utime+stime of the proxy\'s nginx master+worker per '
        '1000 messages (median of %d interleaved runs; clock tick %d ms).'
        % (REPS, 1000 // TICK),
        'aux ms/1k: redis-server (smtp_ext + Redis) or the auth_http '
        'nginx (stock mail), counted apart.',
        'MB/s and ms/MB count message payload only (-l bytes).',
        'idle: worker RSS growth / %d sessions after greeting + EHLO, '
        'fresh nginx, median of %d; direct has no proxy.' % (IDLE, REPS),
        'x stream / x mail: the candidate\'s CPU (or bytes) over '
        'nginx stream\'s / stock mail\'s.',
    ]

    text = ['ngx_mail_smtp_ext bench, %s' % now.strftime('%Y-%m-%d %H:%M UTC'),
            '', table, '', 'Targets (smtp_ext with Redis routing):']
    text += checks
    text += [''] + notes + ['', 'Versions:']
    text += ['  %-26s %s' % v for v in vers]
    text += ['', 'Commands:'] + ['  ' + c for c in cmds]
    report = '\n'.join(text) + '\n'

    print()
    print(report)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, 'latest.txt'), 'w') as f:
        f.write(report)
        f.write('\nAll runs (time s, msgs/s, MB/s, cpu, aux, sink '
                'ms/1k, user share of cpu):\n')
        for (name, c), rs in runs.items():
            for r in rs:
                f.write('  %-9s %-10s %6.2f %8.0f %7.1f %8s %8s %8.1f %5s\n'
                        % (name, c, r['time'], r['msgs_s'], r['mb_s'],
                           fmt(r['cpu'], 1), fmt(r['aux'], 1), r['sink'],
                           fmt(r['usr'], 2)))
        if DO_IDLE:
            for c in CANDS:
                f.write('  idle      %-10s %s\n'
                        % (c, ' '.join(fmt(v) for v in mem[c])))

    if os.environ.get('BENCH_DOC', '1') != '0':
        chart(summary)
        write_doc(table, checks, notes, vers, cmds, now)
        log('wrote %s and %s' % (DOC, CHART))


def chart(summary):
    cands = [c for c in CANDS if c != 'direct']
    data = os.path.join(workdir, 'cpu.dat')
    with open(data, 'w') as f:
        f.write('workload ' + ' '.join('"%s"' % LABELS[c] for c in cands)
                + '\n')
        for name, label, args, msgs, size in WLS:
            f.write('"%s" ' % label + ' '.join(
                fmt(summary.get((name, c)), 2)
                if summary.get((name, c)) is not None else '?'
                for c in cands) + '\n')
    cols = ', '.join(
        "'%s' using %d:xtic(1) title columnheader(%d)" % (data, i + 2, i + 2)
        if i == 0 else "'' using %d title columnheader(%d)" % (i + 2, i + 2)
        for i in range(len(cands)))
    script = '\n'.join([
        'set terminal pngcairo size 900,500 font "sans,10"'
        if has_pngcairo() else 'set terminal png size 900,500',
        "set output '%s'" % CHART,
        'set title "CPU time of the proxy per 1000 messages '
        '(1 worker, lower is better)"',
        'set ylabel "ms CPU / 1000 messages"',
        'set termoption noenhanced',
        'set style data histogram',
        'set style histogram clustered gap 1',
        'set style fill solid 0.8 border -1',
        'set key outside bottom center horizontal',
        'set grid ytics',
        'set yrange [0:*]',
        'plot ' + cols,
    ])
    r = subprocess.run(['gnuplot'], input=script.encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=60)
    if r.returncode != 0:
        log('gnuplot failed: ' + r.stdout.decode(errors='replace'))


def has_pngcairo():
    r = subprocess.run(['gnuplot', '-e', 'set terminal'],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return b'pngcairo' in r.stdout


BEGIN = '<!-- bench:begin (generated by make bench) -->'
END = '<!-- bench:end -->'


def write_doc(table, checks, notes, vers, cmds, now):
    gen = [BEGIN, '',
           'Run of %s on %s.' % (now.strftime('%Y-%m-%d %H:%M UTC'),
                                 platform.node() or 'this machine'),
           '', '```', table, '```', '',
           'Targets (smtp_ext with Redis routing, this bench, 1 worker):',
           '', '```'] + [c.strip() for c in checks] + ['```', '']
    gen += ['- ' + n for n in notes]
    gen += ['', '![CPU per 1000 messages](performance-cpu.png)', '',
            'Versions:', '']
    gen += ['- %s: `%s`' % v for v in vers]
    gen += ['', 'Commands (PORT: the candidate\'s port, chosen free at '
            'start):', '', '```'] + cmds + ['```', '', END]
    block = '\n'.join(gen)

    if os.path.exists(DOC):
        with open(DOC) as f:
            old = f.read()
        if BEGIN in old and END in old:
            pre = old[:old.index(BEGIN)]
            post = old[old.index(END) + len(END):]
            new = pre + block + post
        else:
            new = old.rstrip() + '\n\n' + block + '\n'
    else:
        new = '# Performance\n\n' + block + '\n'
    with open(DOC, 'w') as f:
        f.write(new)


if __name__ == '__main__' and len(sys.argv) > 1 \
        and sys.argv[1] == '--bdat-sink':
    bdat_sink(int(sys.argv[2]), sys.argv[3] == 'chunking')
    sys.exit(0)

if __name__ == '__main__' and len(sys.argv) > 1 \
        and sys.argv[1] == '--bdat-client':
    bdat_client(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                int(sys.argv[5]))
    sys.exit(0)

if __name__ == '__main__' and len(sys.argv) > 1 \
        and sys.argv[1] == '--auth-client':
    auth_client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    sys.exit(0)

if __name__ == '__main__':
    main()
