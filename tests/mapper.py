"""An application process that maps one file shared and writable, driven by lines.

`python tests/mapper.py PATH SIZE` opens PATH O_RDWR, maps SIZE bytes of it
MAP_SHARED with PROT_READ|PROT_WRITE, prints `MAPPED`, then answers one line
per command read on stdin:

  store OFF HEX    store the bytes through the mapping (no msync)  -> OK
  load OFF LEN     the bytes at OFF through the mapping            -> HEX
  msync            msync(MS_SYNC) of the whole mapping            -> OK
  pread OFF LEN    pread(2) on the same descriptor                -> HEX
  munmap           unmap (the kernel writes dirty pages back)     -> OK
  close            close the descriptor (after munmap)            -> OK

An error answers `ERR <errno name>`.  Used by tests/test_mount_mmap.py; every
call on the mount happens here, in a child process, so that the test process
never waits on FUSE itself.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys


def main(path: str, size: int) -> int:
    fd = os.open(path, os.O_RDWR)
    mapping: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
    print("MAPPED", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        try:
            match words:
                case ["store", off, data]:
                    raw = bytes.fromhex(data)
                    mapping[int(off):int(off) + len(raw)] = raw
                    answer = "OK"
                case ["load", off, length]:
                    answer = mapping[int(off):int(off) + int(length)].hex()
                case ["msync"]:
                    mapping.flush()
                    answer = "OK"
                case ["pread", off, length]:
                    answer = os.pread(fd, int(length), int(off)).hex()
                case ["munmap"]:
                    mapping.close()
                    mapping = None
                    answer = "OK"
                case ["close"]:
                    os.close(fd)
                    answer = "OK"
                case _:
                    answer = "ERR EINVAL"
        except OSError as exc:
            answer = f"ERR {errno.errorcode.get(exc.errno, exc.errno)}"
        print(answer, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
