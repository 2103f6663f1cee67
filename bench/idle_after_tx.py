#!/usr/bin/env python3
"""idle-after-tx: client sessions that delivered one message and stay open.

Backend connections follow transactions, not sessions, with "keepalive"
(SPEC 8).  For each configuration this starts a small SMTP sink of its
own (asyncio: smtp-sink serves fewer than 1024 connections) and nginx with
the module (one worker), opens BENCH_IDLE (default 1000) sessions, sends
one message in each and leaves them open, then prints the backend
connections still open (ESTABLISHED towards the sink) and the worker's
memory per idle session (RSS growth / sessions).

    SMTP_EXT_MODULE=build/modules/ngx_mail_smtp_ext_module.so \\
        bench/idle_after_tx.py
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

NGINX = os.environ.get('NGINX_BIN', '/usr/sbin/nginx')
MODULE = os.path.abspath(os.environ.get(
    'SMTP_EXT_MODULE', 'build/modules/ngx_mail_smtp_ext_module.so'))
MAIL_MODULE = os.environ.get('NGX_MAIL_MODULE',
                             '/usr/lib/nginx/modules/ngx_mail_module.so')
IDLE = int(os.environ.get('BENCH_IDLE', '1000'))

CONFIGS = [
    ('no keepalive', ''),
    ('keepalive 16', 'keepalive 16;'),
    ('keepalive 16, zone', 'zone bench 64k; keepalive 16;'),
]


def sink_main(port):
    """a sink: 250 to everything, 354 to DATA, 221 to QUIT"""
    import asyncio
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def session(reader, writer):
        writer.write(b'220 sink ESMTP\r\n')
        data = False
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if data:
                    if line == b'.\r\n':
                        data = False
                        writer.write(b'250 2.0.0 queued\r\n')
                    continue
                verb = line[:4].upper()
                if verb == b'EHLO':
                    writer.write(b'250-sink\r\n250-PIPELINING\r\n'
                                 b'250 8BITMIME\r\n')
                elif verb == b'DATA':
                    data = True
                    writer.write(b'354 go\r\n')
                elif verb == b'QUIT':
                    writer.write(b'221 bye\r\n')
                    break
                else:
                    writer.write(b'250 2.0.0 ok\r\n')
                await writer.drain()
        except OSError:
            pass
        writer.close()

    async def serve():
        server = await asyncio.start_server(session, '127.0.0.1', port,
                                            backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listen(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(('127.0.0.1', port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit('bench: nothing listens on %d' % port)


def rss_kb(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


def established_to(port):
    """ESTABLISHED TCP connections whose remote end is 127.0.0.1:port"""
    n = 0
    want = '0100007F:%04X' % port
    with open('/proc/net/tcp') as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[2] == want and parts[3] == '01':
                n += 1
    return n


def reply(s, buf):
    while True:
        while b'\n' in buf:
            line, buf = buf.split(b'\n', 1)
            if line[3:4] != b'-':
                return line[:3], buf
        chunk = s.recv(65536)
        if not chunk:
            raise OSError('connection closed')
        buf += chunk


def one_message(port):
    s = socket.create_connection(('127.0.0.1', port), 10)
    s.settimeout(10)
    buf = b''
    for cmd, want in ((None, b'220'), (b'EHLO client.test', b'250'),
                      (b'MAIL FROM:<a@client.test>', b'250'),
                      (b'RCPT TO:<b@bench.test>', b'250'),
                      (b'DATA', b'354'),
                      (b'Subject: idle\r\n\r\nhello\r\n.', b'250')):
        if cmd is not None:
            s.sendall(cmd + b'\r\n')
        code, buf = reply(s, buf)
        if code != want:
            raise OSError('%r: %r %r' % (cmd, code, buf))
    return s


def run(label, pool_extra, workdir):
    sink_port = free_port()
    port = free_port()
    d = tempfile.mkdtemp(dir=workdir)
    sink = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                             '--sink', str(sink_port)])
    wait_listen(sink_port)
    conf = os.path.join(d, 'nginx.conf')
    with open(conf, 'w') as f:
        f.write("""
load_module %s;
load_module %s;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16384;
error_log %s/error.log warn;
pid %s/nginx.pid;
events { worker_connections 8192; }
mail {
    server_name mx.bench.test;
    smtp_ext_upstream sink {
        server 127.0.0.1:%d;
        %s
    }
    server {
        listen 127.0.0.1:%d backlog=4096;
        protocol smtp_ext;
        smtp_ext_pass sink;
        smtp_ext_xclient off;
        timeout 10m;
    }
}
""" % (MAIL_MODULE, MODULE, d, d, sink_port, pool_extra, port))
    ng = subprocess.Popen([NGINX, '-p', d + '/', '-c', conf, '-e',
                           d + '/error.log'],
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        wait_listen(port)
        time.sleep(0.3)
        worker = int(subprocess.check_output(
            ['pgrep', '-P', str(ng.pid)]).split()[0])
        # warm up: the first sessions grow the pools of the worker
        for s in [one_message(port) for _ in range(20)]:
            s.close()
        time.sleep(0.3)
        before = rss_kb(worker)
        socks = [one_message(port) for _ in range(IDLE)]
        time.sleep(0.5)
        after = rss_kb(worker)
        conns = established_to(sink_port)
        for s in socks:
            s.close()
        return conns, (after - before) * 1024.0 / IDLE
    finally:
        ng.send_signal(signal.SIGTERM)
        ng.wait(10)
        sink.send_signal(signal.SIGTERM)
        sink.wait(10)


def main():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    workdir = tempfile.mkdtemp(prefix='smtp-ext-idle-')
    if os.environ.get('BENCH_KEEP'):
        print('workdir', workdir)
    print('idle-after-tx: %d sessions, one message each, left open' % IDLE)
    print('%-22s %18s %22s' % ('configuration', 'backend conns open',
                               'worker bytes/session'))
    try:
        for label, extra in CONFIGS:
            conns, per = run(label, extra, workdir)
            print('%-22s %18d %22.0f' % (label, conns, per))
    finally:
        if not os.environ.get('BENCH_KEEP'):
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == '--sink':
        sink_main(int(sys.argv[2]))
    else:
        main()
