#!/usr/bin/env python3
"""A unix-socket relay that records what NBD clients send to the server.

    capture-proxy.py LISTEN_SOCKET UPSTREAM_SOCKET OUT_DIR

Every accepted connection is relayed to UPSTREAM_SOCKET both ways; the
bytes the client sends are written to OUT_DIR/<client>-<n>.bin, where
<client> is the contents of OUT_DIR/client when the connection was
accepted (capture-seeds.sh writes the name of the client it is about to
run there). Runs until killed (SIGTERM).
"""
import os
import socket
import sys
import threading


def pump(src, dst, record):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if record is not None:
                record.write(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if record is not None:
            record.close()


def main():
    listen, upstream, out = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen)
    server.listen(16)
    n = 0
    while True:
        client, _ = server.accept()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(upstream)
        n += 1
        try:
            with open(os.path.join(out, "client")) as f:
                name = f.read().strip() or "conn"
        except OSError:
            name = "conn"
        record = open(os.path.join(out, f"{name}-{n:02}.bin"), "wb", buffering=0)
        threading.Thread(target=pump, args=(client, up, record), daemon=True).start()
        threading.Thread(target=pump, args=(up, client, None), daemon=True).start()


if __name__ == "__main__":
    main()
