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
"""
import os
import select
import signal
import socket
import subprocess
import sys

stopping = False


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
    while not stopping:
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
        conn.setblocking(True)  # the accepted socket is this process's alone
        conn.settimeout(10)
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            body = ("pyapp %d listeners %s\n" % (os.getpid(), names)).encode()
            head = ("HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n"
                    "X-Molt-Worker-Pid: %d\r\nX-Molt-App: python\r\n\r\n" % (len(body), os.getpid()))
            conn.sendall(head.encode() + body)
    notify("STOPPING=1")


if __name__ == "__main__":
    main()
