#!/usr/bin/env python3
"""vu-proxy: a logging vhost-user man-in-the-middle (python3 stdlib only).

    vu-proxy.py --listen FRONT_SOCK --connect BACK_SOCK --log LOGFILE [--multi]

Listens on FRONT_SOCK (the front-end, e.g. QEMU's `-chardev socket,path=`,
connects there). For each accepted connection it connects to BACK_SOCK (the
back-end, e.g. qemu-storage-daemon) and forwards every vhost-user message in
both directions unchanged, including SCM_RIGHTS file descriptors.

A message is the 12-byte header (u32 request, u32 flags, u32 size, little
endian) followed by `size` payload bytes; fds arrive with the header's
recvmsg (any that arrive with the payload are kept too). Each message is
forwarded with one sendmsg carrying all its fds.

Every message on the main socket is logged to LOGFILE, one line each, flushed
per line:

    <dir> <request id> <flags as 0x..> <size> <nfds> <payload hex>

dir is `F>B` (front-end to back-end) or `B>F` (back-end replies). An empty
payload is logged as `-`. With --multi several connections may be served
one after another; each new connection is announced by a `# connection N`
line. SET_BACKEND_REQ_FD (21) is forwarded like any other message: its fd
goes straight to the back-end, so the back-end channel bypasses the proxy
and is not logged.

Without --multi the proxy serves one connection and exits 0 once both sides
have closed (a side's EOF is passed on as shutdown(SHUT_WR) to the other).
The listening socket is removed on exit. The connection to BACK_SOCK is
retried for --connect-timeout seconds (default 10) so the back-end may still
be starting. SIGTERM/SIGINT end the proxy cleanly.
"""

import argparse
import array
import os
import signal
import socket
import struct
import sys
import threading
import time

HDR = struct.Struct("<III")
MAX_FDS = 64  # vhost-user needs at most 8 (SET_MEM_TABLE); be generous.
CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1, encoding="ascii")
        self.lock = threading.Lock()

    def line(self, text):
        with self.lock:
            self.f.write(text + "\n")
            self.f.flush()

    def close(self):
        with self.lock:
            self.f.close()


def fds_from_ancdata(ancdata):
    fds = []
    for level, ctype, data in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(data) - (len(data) % arr.itemsize)
            arr.frombytes(data[:usable])
            fds.extend(arr)
    return fds


def recv_exact(sock, n, fds):
    """Read exactly n bytes with recvmsg, appending received fds to `fds`.
    Returns the bytes, or None on EOF before any byte (b"" if n == 0)."""
    buf = bytearray()
    while len(buf) < n:
        data, anc, flags, _ = sock.recvmsg(n - len(buf), CMSG_SPACE,
                                           getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        fds.extend(fds_from_ancdata(anc))
        if flags & socket.MSG_CTRUNC:
            sys.stderr.write("vu-proxy: warning: control data truncated (fds lost)\n")
        if not data:
            if not buf:
                return None
            raise EOFError("EOF in the middle of a message (%d of %d bytes)" % (len(buf), n))
        buf += data
    return bytes(buf)


def pump(src, dst, tag, log, done):
    """Forward messages src -> dst until EOF on src."""
    try:
        while True:
            fds = []
            hdr = recv_exact(src, HDR.size, fds)
            if hdr is None:
                break
            req, flags, size = HDR.unpack(hdr)
            payload = recv_exact(src, size, fds) if size else b""
            if payload is None:
                raise EOFError("EOF before payload of request %d" % req)
            log.line("%s %d 0x%x %d %d %s" % (tag, req, flags, size, len(fds),
                                                payload.hex() if payload else "-"))
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        array.array("i", fds).tobytes())] if fds else []
                msg = hdr + payload
                sent = dst.sendmsg([msg], anc)
                if sent < len(msg):
                    dst.sendall(msg[sent:])
            finally:
                for fd in fds:
                    os.close(fd)
    except (OSError, EOFError) as e:
        log.line("# %s ended: %s" % (tag, e))
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done.set()


def connect_backend(path, timeout):
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def serve(front, args, log):
    back = connect_backend(args.connect, args.connect_timeout)
    done_fb, done_bf = threading.Event(), threading.Event()
    t1 = threading.Thread(target=pump, args=(front, back, "F>B", log, done_fb), daemon=True)
    t2 = threading.Thread(target=pump, args=(back, front, "B>F", log, done_bf), daemon=True)
    t1.start()
    t2.start()
    t1.join()
    t2.join()
    front.close()
    back.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", required=True, help="socket path for the front-end")
    ap.add_argument("--connect", required=True, help="back-end socket path")
    ap.add_argument("--log", required=True, help="message log file (appended)")
    ap.add_argument("--multi", action="store_true", help="serve connections until killed")
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    args = ap.parse_args()

    log = Log(args.log)
    if os.path.exists(args.listen):
        os.unlink(args.listen)
    # Bind to a temporary name and rename once listening, so whoever waits
    # for the path to appear never sees a socket that refuses connections.
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp_path = "%s.%d.tmp" % (args.listen, os.getpid())
    lsock.bind(tmp_path)
    lsock.listen(4)
    os.rename(tmp_path, args.listen)

    def stop(signum, _frame):
        try:
            os.unlink(args.listen)
        except OSError:
            pass
        log.line("# stopped by signal %d" % signum)
        log.close()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    n = 0
    rc = 0
    try:
        while True:
            front, _ = lsock.accept()
            n += 1
            if args.multi:
                log.line("# connection %d" % n)
            try:
                serve(front, args, log)
            except OSError as e:
                sys.stderr.write("vu-proxy: connection %d: %s\n" % (n, e))
                log.line("# connection %d failed: %s" % (n, e))
                front.close()
                rc = 1
            if not args.multi:
                break
    finally:
        lsock.close()
        try:
            os.unlink(args.listen)
        except OSError:
            pass
        log.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
