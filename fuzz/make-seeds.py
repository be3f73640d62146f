#!/usr/bin/env python3
"""Writes the seed inputs of the NBD fuzz targets: one valid session each,
so that the fuzzer starts past the magic numbers. Run from fuzz/."""
import os
import struct

IHAVEOPT = 0x49484156454F5054


def opt(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def s32(s):
    return struct.pack(">I", len(s)) + s


def req(cmd, cookie, offset, length, flags=0):
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# What a client sends to the server target.
queries = [b"base:allocation", b"qemu:dirty-bitmap:b", b"qemu:allocation-depth"]
meta = s32(b"") + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries)
session = struct.pack(">I", 3) + opt(8) + opt(10, meta) + opt(6, s32(b"ro") + struct.pack(">HH", 1, 3))
session += opt(7, s32(b"") + struct.pack(">HH", 1, 3))
session += req(0, 1, 0, 4096) + req(1, 2, 512, 512) + b"\xab" * 512
session += req(7, 3, 0, 65536) + req(6, 4, 0, 4096, 2) + req(4, 5, 8192, 4096)
session += req(3, 6, 0, 0) + req(5, 7, 0, 4096) + req(2, 8, 0, 0)
write("seeds/nbd_server/session", session)
write("seeds/nbd_server/list", struct.pack(">I", 3) + opt(3) + opt(9, s32(b"") + struct.pack(">I", 0)) + opt(1, b"ro") + req(0, 1, 0, 512))

# The same with extended headers (32-byte requests).
def xreq(cmd, cookie, offset, length, flags=0):
    return struct.pack(">IHHQQQ", 0x21E41C71, flags, cmd, cookie, offset, length)


ext = struct.pack(">I", 3) + opt(11) + opt(10, meta) + opt(7, s32(b"") + struct.pack(">HH", 1, 3))
ext += xreq(0, 1, 0, 4096) + xreq(1, 2, 512, 512, 0x20) + b"\xcd" * 512
ext += xreq(7, 3, 0, 1 << 40) + xreq(6, 4, 0, 4096, 2) + xreq(3, 5, 0, 16, 0x20) + b"\0" * 16
ext += xreq(2, 6, 0, 0)
write("seeds/nbd_server/extended", ext)

# What a server sends to the client target.
def rep(code, kind, data=b""):
    return struct.pack(">QIII", 0x3E889045565A9, code, kind, len(data)) + data


hello = b"NBDMAGIC" + struct.pack(">QH", IHAVEOPT, 3)
hello += rep(8, 1)
hello += rep(10, 4, struct.pack(">I", 0) + b"base:allocation")
hello += rep(10, 4, struct.pack(">I", 2) + b"qemu:dirty-bitmap:b")
hello += rep(10, 1)
hello += rep(7, 3, struct.pack(">HQH", 0, 4096, 0x1DED))
hello += rep(7, 3, struct.pack(">HIII", 3, 1, 4096, 32 << 20))
hello += rep(7, 1)
replies = struct.pack(">IHHQI", 0x668E33EF, 0, 1, 1, 8 + 2048) + struct.pack(">Q", 0) + b"\x11" * 2048
replies += struct.pack(">IHHQIQI", 0x668E33EF, 1, 2, 1, 12, 2048, 2048)
bs = struct.pack(">I", 0) + struct.pack(">II", 4096, 3)
replies += struct.pack(">IHHQI", 0x668E33EF, 0, 5, 2, len(bs)) + bs
bs = struct.pack(">I", 2) + struct.pack(">IIII", 2048, 1, 2048, 0)
replies += struct.pack(">IHHQI", 0x668E33EF, 1, 5, 2, len(bs)) + bs
replies += struct.pack(">IIQ", 0x67446698, 0, 3)
write("seeds/nbd_client/session", hello + replies)
