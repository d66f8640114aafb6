"""A host-local writer that stays inside write(2) until the test lets it go on.

Run as `python tests/stalled_writer.py PATH buffered|direct SIZE BYTE [first]`.  It opens
PATH for write (O_DIRECT for `direct`) and prints `ready TID`, or `refused WHY`
when userfaultfd(2) is not available.  On the line `go` it calls
`pwrite(fd, buf, SIZE, 0)` where `buf` is SIZE bytes of anonymous memory
registered with userfaultfd and never touched: the kernel's first access to
it, from inside the write (the copy from user memory of a buffered write,
after ext4 took the inode lock; get_user_pages of an O_DIRECT write), faults
and waits for this process's handler thread.  The handler prints `inside`
when that fault arrives, so by then the writing thread is past the
pre-content hook (rw_verify_area) and inside the file system's write, and
nothing of its data has reached the file.  On the next line (any) the handler
fills the buffer with BYTE (UFFDIO_COPY), the write goes on, and the main
thread prints `returned NS N` (CLOCK_MONOTONIC just after pwrite returned, and
its result).  It exits on the next line or EOF.

With `first`, on `go` it first writes SIZE bytes of `p` at offset SIZE from
ordinary (page-aligned) memory, which returns at once, and then makes the
stalled call from the same thread through the same fd.
"""

import ctypes
import fcntl
import mmap
import os
import select
import struct
import sys
import threading
import time

_NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}.get(os.uname().machine)
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api: 24 bytes)
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register: 32 bytes)
UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy: 40 bytes)
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12


def say(*words) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def userfaultfd() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    if _NR_USERFAULTFD is None:
        raise OSError(0, f"no userfaultfd syscall number for {os.uname().machine}")
    uffd = libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if uffd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    fcntl.ioctl(uffd, UFFDIO_API, bytearray(struct.pack("=QQQ", UFFD_API, 0, 0)), True)
    return uffd


def main(path: str, how: str, size: int, byte: bytes, first: bool) -> None:
    fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if how == "direct" else 0))
    try:
        uffd = userfaultfd()
    except OSError as exc:
        say("refused", exc.strerror or exc)
        return
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fcntl.ioctl(uffd, UFFDIO_REGISTER, bytearray(struct.pack(
        "=QQQQ", addr, size, UFFDIO_REGISTER_MODE_MISSING, 0)), True)
    src = mmap.mmap(-1, size)
    src[:] = byte * size
    src_addr = ctypes.addressof(ctypes.c_char.from_buffer(src))

    def handler() -> None:
        while True:
            select.select([uffd], [], [])
            try:
                msg = os.read(uffd, 32)
            except BlockingIOError:
                continue
            if msg[0] == UFFD_EVENT_PAGEFAULT:
                break
        say("inside")
        sys.stdin.readline()
        fcntl.ioctl(uffd, UFFDIO_COPY, bytearray(struct.pack("=QQQQq", addr, src_addr, size,
                                                             0, 0)), True)

    threading.Thread(target=handler, daemon=True).start()
    say("ready", threading.get_native_id())
    plain = mmap.mmap(-1, size)
    plain[:] = b"p" * size
    if sys.stdin.readline().strip() != "go":
        return
    if first:
        os.pwrite(fd, plain, size)
    n = os.pwrite(fd, buf, 0)
    say("returned", time.monotonic_ns(), n)
    sys.stdin.readline()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()[:1],
         sys.argv[5:6] == ["first"])
