#!/usr/bin/env python3
"""Memory a client can make the local server hold with unfinished request heads.

Opens N connections to a running payfence-local, sends each BYTES of header lines
but never the blank line that ends the head, and prints the server's RSS before and
after. The server answers a head that fills its 64 KiB buffer with 431 at once.

    python3 bench/slow_heads.py --port 8787 --pid "$(pgrep -f payfence-local)" \
        --connections 2000 --bytes 60000
"""
import argparse
import socket
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8787)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--bytes", type=int, default=60000)
    a = p.parse_args()
    line = b"X-Fill-%d: " + b"a" * 3000 + b"\r\n"
    head = b"GET /api/health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        line % i for i in range(max(1, a.bytes // 3000))
    )
    before = rss_kb(a.pid)
    held = []
    for _ in range(a.connections):
        s = socket.create_connection(("127.0.0.1", a.port))
        try:
            s.sendall(head)
        except OSError as e:
            print("send failed:", e)
            break
        held.append(s)
    time.sleep(2)
    print(f"{len(held)} connections, {len(head)} bytes of head each: "
          f"RSS {before} kB before, {rss_kb(a.pid)} kB after")


if __name__ == "__main__":
    main()
