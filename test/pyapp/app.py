#!/usr/bin/env python3
"""A molt worker NOT written in Go: proof that any program that speaks
systemd's socket activation and sd_notify works unchanged.

It takes fd 3 (LISTEN_FDS, LISTEN_PID must be its own pid), answers
HTTP/1.1 GET with 200 and X-Molt-Worker-Pid / X-Molt-App: python, and
reports READY=1 on NOTIFY_SOCKET itself or, with --systemd-notify, through
the systemd-notify tool. On SIGTERM it finishes the current request and
exits. The listening socket is shared with other workers and is
non-blocking: it waits with select and treats BlockingIOError as "another
worker took that connection"; it never calls setblocking on the listener,
which would change the mode for every process sharing it.

With --blocking-accept it is instead a worker written for
systemd-socket-activate: it calls setblocking(True) on the listener and
accept()s in a loop, as molt's listen option ",blocking" allows. Its stop
signal interrupts a blocked accept, so that its drain ends at once: the
accept is libc's, through ctypes, which returns EINTR (socket.accept
retries it, PEP 475, unless the handler raises, and a handler that raises
just after the accept returned loses that connection: its client sees a
reset). Without the option, molt switches the
shared socket back to non-blocking and accept raises BlockingIOError
(EAGAIN): the worker dies with it, as the C worker of issue 13 did.
"""
import ctypes
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

stopping = False

# Traffic figures, sent by hand as MOLT_STATS= (docs/worker-protocol.md,
# "Traffic figures"): requests by class (2xx 3xx 4xx 5xx panicked cut
# other) and a latency histogram with the protocol's bucket bounds.
BOUNDS_US = [50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000,
             250000, 500000, 1000000, 2500000, 5000000, 10000000]
classes = [0] * 7
buckets = [0] * (len(BOUNDS_US) + 1)
last_report = 0.0


def record(cls, seconds):
    us = seconds * 1e6
    b = len(BOUNDS_US)
    for i, bound in enumerate(BOUNDS_US):
        if us <= bound:
            b = i
            break
    buckets[b] += 1
    classes[cls] += 1


def report_stats(force=False):
    global last_report
    now = time.monotonic()
    if not force and now - last_report < 1.0:
        return
    last_report = now
    notify("MOLT_STATS=1 %s %s" % (",".join(map(str, classes)), ",".join(map(str, buckets))))


def on_term(signum, frame):
    global stopping
    stopping = True


def notify(state):
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(state.encode(), addr)
    except OSError:
        pass  # as sd_notify: the manager may be gone (its death is why we stop)
    finally:
        s.close()


def stats_flood(n):
    """Worker 0 only: n MOLT_STATS= datagrams as fast as they go, every
    other one malformed, the rest a lie (10^14 5xx): the master takes at
    most one a second and the lie counts for this worker alone."""
    if os.environ.get("MOLT_WORKER") != "0":
        return
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    big = 10 ** 14
    lie = "MOLT_STATS=1 0,0,0,%d,0,0,0 %s" % (big, ",".join(["0"] * 17 + [str(big)]))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.settimeout(1)
    sent = 0
    try:
        for i in range(n):
            msg = lie if i % 2 == 0 else "MOLT_STATS=1 x,y z"
            try:
                s.sendto(msg.encode(), addr)
                sent += 1
            except OSError:
                pass
    finally:
        s.close()
    sys.stderr.write("pyapp: stats flood: %d of %d sent\n" % (sent, n))


def status_flood(seconds):
    """Worker 0 only, in a thread: STATUS= datagrams as fast as they go
    for seconds (each one the loop must apply), then STATUS=flood done N
    with the number sent: the master paces it, and loses none."""
    if os.environ.get("MOLT_WORKER") != "0":
        return
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]

    def run():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.settimeout(1)
        sent, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                s.sendto(b"STATUS=flood %d" % sent, addr)
                sent += 1
            except OSError:
                pass
        s.settimeout(30)
        s.sendto(b"STATUS=flood done %d" % sent, addr)
        s.close()
        sys.stderr.write("pyapp: status flood: %d sent\n" % sent)

    threading.Thread(target=run, daemon=True).start()


def dgram_flood(kind, seconds):
    """Worker 0 only, in a thread: datagrams as fast as they go for
    seconds, each one the master drops before its loop: kind "stats", a
    valid MOLT_STATS= report past the one a second it takes; "junk", a
    malformed report; "foreign", a valid report sent from a child in a
    session of its own (not the worker's: rejected)."""
    if os.environ.get("MOLT_WORKER") != "0":
        return
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    msg = b"MOLT_STATS=1 x,y z" if kind == "junk" else ("MOLT_STATS=1 %s %s" % (
        ",".join(["0"] * 7), ",".join(["0"] * len(buckets)))).encode()

    parent = os.getpid()

    def send():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.settimeout(1)
        sent, end = 0, time.monotonic() + seconds
        while time.monotonic() < end and (kind != "foreign" or os.getppid() == parent):
            for _ in range(100):
                try:
                    s.sendto(msg, addr)
                    sent += 1
                except OSError:
                    pass
        s.close()
        sys.stderr.write("pyapp: %s flood: %d sent\n" % (kind, sent))

    if kind == "foreign":
        if os.fork() == 0:
            os.setsid()
            try:
                send()
            finally:
                os._exit(0)
        return
    threading.Thread(target=send, daemon=True).start()


def kill_new(path):
    """In a thread, once path exists: SIGKILL, every 50 ms, each process
    of this user outside this worker's session whose master is not this
    worker's and whose command line names path (the next generation's
    workers of this test, nothing else on the machine). Armed only in a
    worker started before path existed: an old worker."""
    if os.path.exists(path):
        return
    me, master, mark = os.getsid(0), os.environ.get("MOLT_MASTER_PID", ""), path.encode()

    def run():
        while not os.path.exists(path):
            time.sleep(0.05)
        killed = set()
        while True:
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                pid = int(d)
                try:
                    with open("/proc/%d/cmdline" % pid, "rb") as f:
                        if mark not in f.read():
                            continue
                    with open("/proc/%d/stat" % pid) as f:
                        ppid = f.read().rsplit(")", 1)[1].split()[1]
                    if os.stat("/proc/%d" % pid).st_uid != os.getuid() or os.getsid(pid) == me or ppid == master:
                        continue
                    os.kill(pid, signal.SIGKILL)
                    if pid not in killed:
                        killed.add(pid)
                        sys.stderr.write("pyapp: killed next-generation worker %d\n" % pid)
                except (OSError, IndexError):
                    pass
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True).start()


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("pyapp: LISTEN_PID %r is not my pid %d" % (os.environ.get("LISTEN_PID"), os.getpid()))
    if int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("pyapp: no LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES", "")
    signal.signal(signal.SIGTERM, on_term)
    ln = socket.socket(fileno=3)
    if "--systemd-notify" in sys.argv:
        subprocess.run(["systemd-notify", "--ready", "--status=python worker up"], check=True)
    else:
        notify("READY=1\nSTATUS=python worker up")
    flood = None  # --stats-flood N:PATH: flood once PATH exists
    if "--stats-flood" in sys.argv:
        n, path = sys.argv[sys.argv.index("--stats-flood") + 1].split(":", 1)
        flood = (int(n), path)
    status = None  # --status-flood SECONDS:PATH: flood once PATH exists
    if "--status-flood" in sys.argv:
        secs, path = sys.argv[sys.argv.index("--status-flood") + 1].split(":", 1)
        status = (float(secs), path)
    if "--kill-new" in sys.argv:
        kill_new(sys.argv[sys.argv.index("--kill-new") + 1])
    dflood = None  # --dgram-flood KIND:SECONDS:PATH: flood once PATH exists
    if "--dgram-flood" in sys.argv:
        kind, secs, path = sys.argv[sys.argv.index("--dgram-flood") + 1].split(":", 2)
        dflood = (kind, float(secs), path)
    if "--blocking-accept" in sys.argv:
        ln.setblocking(True)
        blocking_loop(ln, names)
        notify("STOPPING=1")
        return
    while not stopping:
        report_stats()
        if flood and os.path.exists(flood[1]):
            stats_flood(flood[0])
            flood = None
        if status and os.path.exists(status[1]):
            status_flood(status[0])
            status = None
        if dflood and os.path.exists(dflood[2]):
            dgram_flood(dflood[0], dflood[1])
            dflood = None
        try:
            r, _, _ = select.select([ln], [], [], 0.2)
        except InterruptedError:
            continue
        if not r:
            continue
        try:
            conn, _ = ln.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another worker accepted it
        answer(conn, names)
    report_stats(force=True)
    notify("STOPPING=1")


def blocking_loop(ln, names):
    """Accept in blocking mode until the stop signal. The signal interrupts
    a blocked accept (EINTR), and its handler runs once accept returned:
    it never raises, so a connection accepted is always answered. A
    signal just before accept is entered leaves it blocked until the next
    connection, which it answers before it stops. EAGAIN (a non-blocking
    socket) is fatal, as in a C worker."""
    libc = ctypes.CDLL(None, use_errno=True)
    while not stopping:
        fd = libc.accept(ln.fileno(), None, None)
        if fd < 0:
            e = ctypes.get_errno()
            if e == errno.EINTR:
                continue
            raise OSError(e, os.strerror(e))
        answer(socket.socket(fileno=fd), names)


def answer(conn, names):
    """GET /status/NNN answers NNN; anything else 200."""
    conn.setblocking(True)  # the accepted socket is this process's alone
    conn.settimeout(10)
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        if b"\r\n\r\n" not in data:
            return  # no request
        start = time.monotonic()
        code = 200
        parts = data.split(b" ", 2)
        if len(parts) > 1 and parts[1].startswith(b"/status/"):
            try:
                code = int(parts[1][len(b"/status/"):])
            except ValueError:
                code = 400
            if not 200 <= code <= 599:
                code = 400
        body = ("pyapp %d listeners %s\n" % (os.getpid(), names)).encode()
        head = ("HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n"
                "X-Molt-Worker-Pid: %d\r\nX-Molt-App: python\r\n\r\n" % (code, len(body), os.getpid()))
        cls = code // 100 - 2
        try:
            conn.sendall(head.encode() + body)
        except OSError:
            cls = 5  # cut
        record(cls, time.monotonic() - start)


if __name__ == "__main__":
    main()
