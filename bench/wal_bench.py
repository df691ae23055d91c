"""WAL parse+verify throughput: ``python -m bench.wal_bench [--quick]`` from the repo root.

Builds synthetic WALs with valid checksum chains (random pages, a commit every
`FRAMES_PER_TRANSACTION` frames) and times, per page size and checksum byte order:

* ``frame_checksums``: the checksum core alone, over the whole WAL;
* ``scan``: ``parse_wal_header`` + ``scan_frames`` over the whole WAL in one buffer,
  including building the transaction and frame objects;
* ``scan 4 MiB``: what the daemon does, scanning 4 MiB chunks and resuming from ``scan.end``.

Throughput is MB (10**6 bytes) of WAL per second, best of several runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import struct
import time
from collections.abc import Callable

import numpy as np

from replicad.wal import (
    FRAME_HEADER_SIZE,
    WAL_FORMAT_VERSION,
    WAL_HEADER_SIZE,
    WAL_MAGIC_BE,
    WAL_MAGIC_LE,
    frame_checksums,
    parse_wal_header,
    scan_frames,
)

PAGE_SIZES = (1024, 4096, 16384, 65536)
FRAMES_PER_TRANSACTION = 8
CHUNK_BYTES = 4 * 1024 * 1024
SALTS = (0x1234_5678, 0x9ABC_DEF0)


def synthetic_wal(page_size: int, *, big_endian: bool, size: int, seed: int = 0) -> bytes:
    """A WAL of about `size` bytes whose frames all verify, committing every few frames."""
    header = _header(page_size, big_endian=big_endian)
    frame_size = FRAME_HEADER_SIZE + page_size
    count = max(1, size // frame_size)
    frames = np.random.default_rng(seed).integers(0, 256, (count, frame_size), dtype=np.uint8)
    fields = frames.view(">u4")[:, :6]
    index = np.arange(count)
    fields[:, 0] = 1 + index % 1000
    is_commit = (index + 1) % FRAMES_PER_TRANSACTION == 0
    fields[:, 1] = np.where(is_commit, 1000, 0)
    fields[:, 2:4] = SALTS
    checksum = struct.unpack(">2I", header[24:32])
    fields[:, 4:6] = frame_checksums(
        frames.tobytes(), page_size=page_size, big_endian=big_endian, initial=checksum, count=count
    )
    return header + frames.tobytes()


def _header(page_size: int, *, big_endian: bool) -> bytes:
    magic = WAL_MAGIC_BE if big_endian else WAL_MAGIC_LE
    first = struct.pack(">6I", magic, WAL_FORMAT_VERSION, page_size, 0, *SALTS)
    words = struct.unpack(">6I" if big_endian else "<6I", first)
    s0 = s1 = 0
    for a, b in zip(words[0::2], words[1::2], strict=True):
        s0 = (s0 + a + s1) & 0xFFFFFFFF
        s1 = (s1 + b + s0) & 0xFFFFFFFF
    return first + struct.pack(">2I", s0, s1)


def checksum_only(wal: bytes) -> None:
    """Run the checksum core over every frame."""
    header = parse_wal_header(wal)
    body = memoryview(wal)[WAL_HEADER_SIZE:]
    frame_checksums(
        body,
        page_size=header.page_size,
        big_endian=header.big_endian_checksum,
        initial=(header.checksum1, header.checksum2),
        count=len(body) // header.frame_size,
    )


def scan_whole(wal: bytes) -> None:
    """Parse the header and scan the whole WAL as one buffer."""
    header = parse_wal_header(wal)
    start = header.initial_position()
    scan_frames(header, memoryview(wal)[start.offset :], start)


def scan_chunked(wal: bytes) -> None:
    """Scan in fixed-size chunks, resuming from each scan's end, as the daemon does."""
    header = parse_wal_header(wal)
    position = header.initial_position()
    view = memoryview(wal)
    while True:
        scan = scan_frames(header, view[position.offset : position.offset + CHUNK_BYTES], position)
        if scan.end == position:
            return
        position = scan.end


def check(wal: bytes) -> None:
    """Refuse to time a WAL that does not verify: a fast wrong answer is no benchmark."""
    header = parse_wal_header(wal)
    start = header.initial_position()
    scan = scan_frames(header, memoryview(wal)[start.offset :], start)
    frames = (len(wal) - WAL_HEADER_SIZE) // header.frame_size
    if len(scan.transactions) != frames // FRAMES_PER_TRANSACTION:
        raise SystemExit(f"synthetic WAL did not verify: {scan.stop_reason}")


def best_mb_per_s(run: Callable[[bytes], None], wal: bytes, repeats: int) -> float:
    """Best throughput of `repeats` runs, in MB of WAL per second."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run(wal)
        best = min(best, time.perf_counter() - started)
    return len(wal) / best / 1e6


def machine() -> str:
    """CPU model, core count, Python and numpy versions: what the numbers depend on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            cpu = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    cpus = len(os.sched_getaffinity(0))
    return f"{cpu}, {cpus} CPUs, Python {platform.python_version()}, numpy {np.__version__}"


def main() -> None:
    """Print the throughput table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB WALs, 2 runs each")
    args = parser.parse_args()
    size, repeats = (8 << 20, 2) if args.quick else (64 << 20, 7)
    print(machine())
    print(f"WAL size {size >> 20} MiB, best of {repeats} runs, MB/s of WAL")
    print(f"| page size | checksum order | frame_checksums | scan | scan {CHUNK_BYTES >> 20} MiB |")
    print("|---:|---|---:|---:|---:|")
    for page_size in PAGE_SIZES:
        for big_endian in (False, True):
            wal = synthetic_wal(page_size, big_endian=big_endian, size=size)
            check(wal)
            results = [
                best_mb_per_s(run, wal, repeats)
                for run in (checksum_only, scan_whole, scan_chunked)
            ]
            order = "big-endian" if big_endian else "little-endian"
            cells = " | ".join(f"{mb:,.0f}" for mb in results)
            print(f"| {page_size} | {order} | {cells} |")


if __name__ == "__main__":
    main()
