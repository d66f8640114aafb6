"""Who a kernel request is for: uid, gid, pid and supplementary groups.

The FUSE header carries the caller's fsuid, fsgid and thread id, but not its
supplementary groups; they are read from /proc/<tid>/status (as libfuse's
fuse_req_getgroups does).  A request from the kernel itself (pid 0: a
writeback, a RELEASE after the process went) or of a process already gone
has none.  The host carries every request out with these credentials
(host/linux/credentials.py), so its own kernel checks permissions, owns new
files and clears setuid/setgid as the caller.
"""

from __future__ import annotations

MAX_GROUPS = 65536


def groups_of(pid: int) -> tuple[int, ...]:
    """The supplementary groups of thread `pid`, or () if it cannot be read."""
    if pid <= 0:
        return ()
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return tuple(int(g) for g in line.split()[1:MAX_GROUPS + 1])
    except (OSError, ValueError):
        pass
    return ()


def caller_of(header) -> tuple[int, int, int, tuple[int, ...]]:
    """(uid, gid, pid, groups) of the FUSE request `header`."""
    return header.uid, header.gid, header.pid, groups_of(header.pid)
