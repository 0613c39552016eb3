#!/usr/bin/env python3
"""Cut a btrfs image made by mkfs.btrfs down to a fuzz seed of under 100 KiB.

btrfs allocates nothing in a device's first MiB, so even the smallest file system is far
larger than the fuzzers' inputs. This keeps the superblock, the root tree, the trees of the
subvolumes and the file data they point at, packs those blocks into the free first 64 KiB
(and after the superblock if they do not fit), and writes a new chunk tree (one leaf, one
single-profile chunk per packed range) and system chunk array that map the blocks' logical
addresses to their new places. Checksums (CRC32C) are recomputed. Logical addresses stay
as they were, so every tree block is kept byte for byte.

    btrfs-seed.py IMAGE SEED     (IMAGE: single metadata, 4 KiB nodes, crc32c)
"""
import struct
import sys

SUPER = 0x10000
HEADER = 0x65


def crc32c(data, crc=0xFFFFFFFF):
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def main(src, dst):
    img = open(src, "rb").read()
    sb = bytearray(img[SUPER:SUPER + 4096])
    assert sb[0x40:0x48] == b"_BHRfS_M" and struct.unpack_from("<H", sb, 0xC4)[0] == 0
    nodesize = struct.unpack_from("<I", sb, 0x94)[0]
    devid = struct.unpack_from("<Q", sb, 0xC9)[0]

    chunks = []  # (logical, length, physical)

    def add_chunk(logical, c):
        length = struct.unpack_from("<Q", c, 0)[0]
        physical = struct.unpack_from("<Q", c, 56)[0]
        chunks.append((logical, length, physical))

    arr = sb[0x32B:0x32B + struct.unpack_from("<I", sb, 0xA0)[0]]
    at = 0
    while at < len(arr):
        logical = struct.unpack_from("<Q", arr, at + 9)[0]
        stripes = struct.unpack_from("<H", arr, at + 17 + 44)[0]
        add_chunk(logical, arr[at + 17:])
        at += 17 + 48 + 32 * stripes

    def physical(logical):
        for lo, n, p in chunks:
            if lo <= logical < lo + n:
                return p + logical - lo
        raise KeyError(logical)

    def block(logical):
        p = physical(logical)
        return img[p:p + nodesize]

    def items(logical):
        """Every leaf item under the block at `logical`: (key, data)."""
        b = block(logical)
        n, level = struct.unpack_from("<IB", b, 0x60)
        if level == 0:
            for i in range(n):
                at = HEADER + 25 * i
                key = struct.unpack_from("<QBQ", b, at)
                off, size = struct.unpack_from("<II", b, at + 17)
                yield key, b[HEADER + off:HEADER + off + size]
        else:
            for i in range(n):
                child = struct.unpack_from("<Q", b, HEADER + 33 * i + 17)[0]
                yield from items(child)

    def blocks(logical):
        b = block(logical)
        n, level = struct.unpack_from("<IB", b, 0x60)
        yield logical
        if level > 0:
            for i in range(n):
                yield from blocks(struct.unpack_from("<Q", b, HEADER + 33 * i + 17)[0])

    chunk_root = struct.unpack_from("<Q", sb, 0x58)[0]
    for key, data in list(items(chunk_root)):
        if key[1] == 228:
            add_chunk(key[2], data)

    # What to keep: the root tree, every subvolume's tree, their files' data.
    root = struct.unpack_from("<Q", sb, 0x50)[0]
    keep = set(blocks(root))
    data = []
    for key, item in items(root):
        if key[1] == 132 and (key[0] == 5 or key[0] >= 256):
            tree = struct.unpack_from("<Q", item, 176)[0]
            keep |= set(blocks(tree))
            for k, e in items(tree):
                if k[1] == 108 and e[20] == 1:
                    disk, num = struct.unpack_from("<QQ", e, 21)
                    if disk:
                        data.append((disk, num))
    ranges = sorted([(b, nodesize, "meta") for b in keep]
                    + [(d, n, "data") for d, n in data]
                    + [(chunk_root, nodesize, "system")])
    # Pack: below the superblock first, then after it.
    out = bytearray(SUPER + 4096)
    placed = []  # (logical, length, new physical, kind)
    below = 0
    for logical, n, kind in ranges:
        if below + n <= SUPER:
            p, below = below, below + n
        else:
            p = len(out)
            out += bytes(n)
        placed.append((logical, n, p, kind))
        if kind != "system":
            out[p:p + n] = img[physical(logical):physical(logical) + n]

    def chunk_item(n, p, kind):
        ty = {"data": 1, "system": 2, "meta": 4}[kind]
        return (struct.pack("<QQQQIIIHH", n, 2, 65536, ty, 65536, 65536, 4096, 1, 1)
                + struct.pack("<QQ", devid, p) + bytes(16))

    # The new chunk tree: one leaf where the old root was.
    old = bytearray(block(chunk_root))
    leaf = bytearray(nodesize)
    leaf[:HEADER] = old[:HEADER]
    end = nodesize - HEADER
    entries = sorted(placed)
    for i, (logical, n, p, kind) in enumerate(entries):
        body = chunk_item(n, p, kind)
        end -= len(body)
        leaf[HEADER + end:HEADER + end + len(body)] = body
        struct.pack_into("<QBQII", leaf, HEADER + 25 * i, 256, 228, logical, end, len(body))
    assert HEADER + 25 * len(entries) <= HEADER + end, "too many ranges for one leaf"
    struct.pack_into("<IB", leaf, 0x60, len(entries), 0)
    struct.pack_into("<I", leaf, 0, crc32c(leaf[0x20:]))
    p = next(p for lo, _, p, kind in placed if kind == "system")
    out[p:p + nodesize] = leaf

    # The superblock: the chunk root is a leaf, mapped by the system chunk array.
    array = struct.pack("<QBQ", 256, 228, chunk_root) + chunk_item(nodesize, p, "system")
    sb[0x32B:0x32B + 2048] = bytes(2048)
    sb[0x32B:0x32B + len(array)] = array
    struct.pack_into("<I", sb, 0xA0, len(array))
    sb[0xC7] = 0
    sb[0:32] = bytes(32)
    struct.pack_into("<I", sb, 0, crc32c(sb[0x20:]))
    out[SUPER:SUPER + 4096] = sb
    open(dst, "wb").write(out)
    print(f"{dst}: {len(out)} bytes, {len(placed)} ranges")


if __name__ == "__main__":
    main(*sys.argv[1:])
