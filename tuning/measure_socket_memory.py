#!/usr/bin/env python3
"""Measure the kernel memory of idle and of stalled loopback TCP sockets.

Used for tuning/GUIDE.md ("How much kernel memory a connection costs"). Run as
root (reading /proc/slabinfo needs it):

    python3 tuning/measure_socket_memory.py

What it does, bounded in count and time, loopback only:

1. Idle: opens PAIRS loopback TCP connection pairs. The accepting ends live in a
   forked child and the connecting ends in the parent, so each process holds
   PAIRS descriptors (fits under a 20,000 open-file limit with the default).
   It reads /proc/slabinfo, /proc/meminfo and /proc/net/sockstat before and
   after, and prints the growth per socket (an idle connection on a server is
   one socket; a loopback pair is two).
2. Stalled: opens STALLED more pairs whose reading end never reads (its receive
   buffer pinned small), and fills each writing end until EAGAIN: once with
   the kernel's autotuned send buffer, once with SO_SNDBUF = 128 KiB (Plenum's
   --socket-send-buffer-bytes default). It prints the tcp_mem pages
   (/proc/net/sockstat "TCP ... mem") held per stalled socket.

Numbers include both ends' slab objects but exclude the one page per socket of
user-space memory a program may hold; Plenum's own memory is measured elsewhere.
"""

import argparse
import os
import socket
import sys
import time

SLAB_CACHES = (
    "TCP",
    "sock_inode_cache",
    "filp",
    "dentry",
    "request_sock_TCP",
    "tw_sock_TCP",
    "kmalloc-64",
    "kmalloc-96",
    "kmalloc-128",
    "kmalloc-192",
    "kmalloc-256",
    "kmalloc-512",
    "kmalloc-1k",
    "kmalloc-cg-64",
    "kmalloc-cg-192",
    "kmalloc-cg-512",
    "kmalloc-cg-1k",
    "skbuff_head_cache",
    "ebitmap_node",
    "selinux_file_security",
    "lsm_file_cache",
    "anon_vma",
    "pid",
)
PAGE = os.sysconf("SC_PAGE_SIZE")


def slab_bytes():
    """Bytes held by each interesting slab cache: active objects x object size."""
    held = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in SLAB_CACHES:
                    held[parts[0]] = (int(parts[1]), int(parts[3]))
    except PermissionError:
        sys.exit("reading /proc/slabinfo needs root")
    return held


def meminfo():
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            values[key] = int(rest.split()[0]) * 1024
    return values


def sockstat_tcp():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                return {parts[i]: int(parts[i + 1]) for i in range(1, len(parts), 2)}
    return {}


def snapshot():
    time.sleep(1.0)  # let deferred frees (RCU) settle
    return slab_bytes(), meminfo(), sockstat_tcp()


def open_pairs(count, setup_reader=None, setup_listener=None):
    """Opens `count` loopback pairs; the accepted ends live in a forked child.

    Returns (listener, client sockets, child pid, pipe to release the child).
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    if setup_listener:
        setup_listener(listener)
    listener.listen(4096)
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: accept `count`, hold them, wait for release
        os.close(ready_r)
        os.close(release_w)
        held = []
        listener.settimeout(30)
        for _ in range(count):
            conn, _ = listener.accept()
            held.append(conn)
        os.write(ready_w, b"r")
        os.read(release_r, 1)  # the parent closes the pipe or writes: exit
        os._exit(0)
    os.close(ready_w)
    os.close(release_r)
    clients = []
    for _ in range(count):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if setup_reader:
            setup_reader(c)
        c.settimeout(10)
        c.connect(listener.getsockname())
        clients.append(c)
    if os.read(ready_r, 1) != b"r":
        sys.exit("acceptor child failed")
    os.close(ready_r)
    return listener, clients, pid, release_w


def release(listener, clients, pid, release_w):
    os.write(release_w, b"x")
    os.close(release_w)
    os.waitpid(pid, 0)
    for c in clients:
        c.close()
    listener.close()


def idle(pairs):
    slab0, mem0, tcp0 = snapshot()
    handles = open_pairs(pairs)
    slab1, mem1, tcp1 = snapshot()
    release(*handles)
    sockets = 2 * pairs
    print(f"idle: {pairs} loopback pairs = {sockets} sockets")
    total = 0
    for name in SLAB_CACHES:
        if name in slab0 and name in slab1:
            grown = slab1[name][0] * slab1[name][1] - slab0[name][0] * slab0[name][1]
            if grown > 0:
                total += grown
                print(
                    f"  slab {name:<18} +{slab1[name][0] - slab0[name][0]:>7} objects"
                    f" x {slab1[name][1]:>4} B = {grown / sockets:7.0f} B/socket"
                )
    print(f"  slab caches above, total       {total / sockets:7.0f} B/socket")
    for key in ("Slab", "SUnreclaim"):
        print(f"  /proc/meminfo {key:<12} grew {(mem1[key] - mem0[key]) / sockets:7.0f} B/socket")
    print(f"  /proc/net/sockstat TCP mem grew {tcp1.get('mem', 0) - tcp0.get('mem', 0)} pages in total")


def fill(sock, limit_bytes):
    """Writes to a non-blocking socket until EAGAIN; returns bytes queued."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    queued = 0
    for _ in range(limit_bytes // len(chunk) + 1):  # bounded
        try:
            queued += sock.send(chunk)
        except BlockingIOError:
            break
    return queued


def stalled(count, sndbuf):
    # The writer is the connecting end here (it lives in the parent); the reader
    # is the accepted end in the child and never reads. Its receive buffer is
    # pinned to the minimum so the bytes pile up on the writer's side, as they
    # do on a server whose peer is on another host.
    def small_rcvbuf(listener):
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def writer_buf(sock):
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)

    _, _, tcp0 = snapshot()
    handles = open_pairs(count, setup_reader=writer_buf, setup_listener=small_rcvbuf)
    queued = 0
    deadline = time.monotonic() + 60
    for c in handles[1]:
        queued += fill(c, 64 * 1024 * 1024)
        if time.monotonic() > deadline:
            break
    time.sleep(1.0)
    # a second pass: autotuning may have grown the buffer while the first filled
    for c in handles[1]:
        queued += fill(c, 64 * 1024 * 1024)
    _, _, tcp1 = snapshot()
    kernel_sndbuf = handles[1][0].getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    release(*handles)
    pages = tcp1.get("mem", 0) - tcp0.get("mem", 0)
    label = f"SO_SNDBUF={sndbuf}" if sndbuf else "autotuned"
    print(
        f"stalled ({label}, kernel reports sk_sndbuf={kernel_sndbuf}): {count} sockets queued"
        f" {queued / count / 1024:.0f} KiB each; tcp_mem grew {pages} pages ="
        f" {pages * PAGE / count / 1024:.0f} KiB per stalled socket"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10000)
    parser.add_argument("--stalled", type=int, default=200)
    args = parser.parse_args()
    if not 1 <= args.pairs <= 15000 or not 1 <= args.stalled <= 2000:
        sys.exit("--pairs must be 1..15000 and --stalled 1..2000 (open-file limits)")
    print(f"kernel {os.uname().release}, page {PAGE} B")
    idle(args.pairs)
    stalled(args.stalled, 0)
    stalled(args.stalled, 131072)


if __name__ == "__main__":
    main()
