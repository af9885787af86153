#!/usr/bin/env python3
"""Records real traffic as a fuzz seed: a TCP proxy that writes every recv() it makes as one
record of the `.conv` layout (tag C = client to server, S = server to client, big-endian u32
length, bytes). One file per connection: OUT_PREFIX-N.conv.

usage: record.py LISTEN_PORT TARGET_PORT OUT_PREFIX   (stops on SIGTERM/SIGINT)
"""
import selectors
import signal
import socket
import struct
import sys

listen_port, target_port, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", listen_port))
srv.listen(64)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ, None)
count = 0
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def close_pair(pair):
    for s in pair["socks"]:
        try:
            sel.unregister(s)
        except (KeyError, ValueError):
            pass
        s.close()
    pair["out"].close()


while True:
    for key, _ in sel.select():
        if key.data is None:
            client, _ = srv.accept()
            upstream = socket.create_connection(("127.0.0.1", target_port))
            count += 1
            pair = {"socks": (client, upstream), "out": open(f"{prefix}-{count}.conv", "wb")}
            sel.register(client, selectors.EVENT_READ, (pair, b"C", upstream))
            sel.register(upstream, selectors.EVENT_READ, (pair, b"S", client))
            continue
        pair, tag, other = key.data
        data = key.fileobj.recv(65536)
        if not data:
            close_pair(pair)
            continue
        pair["out"].write(tag + struct.pack(">I", len(data)) + data)
        other.sendall(data)
