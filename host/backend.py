"""Guest file-system operations passed through onto the export, confined to it.

``ExportFS`` is the host's file system as the guests see it: the daemon decodes
a request, calls one method here with the guest's session id as ``owner``, and
encodes the result or the ``OSError``'s errno.  Nodeids come from
``host.inodes.InodeStore``; file handles (``fh``) are numbered here.

Invariants:

1. No operation ever resolves a path outside the export.  A guest supplies
   names only, and every name is exactly ONE component, checked before use
   (non-empty, no ``b'/'``, no NUL, not ``b'.'`` or ``b'..'``: ``EINVAL``;
   longer than 255 bytes: ``ENAMETOOLONG``).  Every name is resolved with
   ``*at()`` relative to the ``O_PATH`` fd of a directory inside the export,
   with ``O_NOFOLLOW``.  Symlinks are never followed: a symlink can be looked
   up and stat-ed, opening it for data gives ``ELOOP``, and using it as a
   parent directory gives ``ENOTDIR``.  Files are opened for data only
   through the ``O_PATH`` fd the store holds (via ``/proc/self/fd/N``), so
   whatever was renamed over a name after the lookup, the guest reaches the
   inode it looked up and nothing else.
2. File handles belong to one owner.  A handle number used by another owner,
   never issued, or already released raises ``OSError(EBADF)``.  A nodeid the
   owner does not hold raises ``OSError(ESTALE)`` (see ``host.inodes``).
3. Every error is an ``OSError`` with a real errno, never another exception
   type: arguments a guest controls are checked here (``EINVAL``) before they
   reach ``os``, where a wrong type or range would raise ``TypeError``,
   ``ValueError`` or ``OverflowError``.

Only regular files are opened for data.  A FIFO, socket or device node in the
export is never opened (``EINVAL``): opening a FIFO blocks the daemon, and
opening a device node is not something a guest should be able to make the
host do.

Modes given to ``create`` and ``mkdir`` are subject to the daemon process's
umask, as in virtiofsd: the guest kernel has already applied the guest's
umask, so the daemon should run with ``umask(0)``.

Known limit (shared with virtiofsd): if a host-local process moves a directory
the guests know from inside the export to outside it, the guests keep reaching
that directory through its held fd.

``ExportFS`` is not thread-safe: the caller serialises calls.
"""

from __future__ import annotations

import errno
import os
import stat as _stat
from collections.abc import Callable
from dataclasses import dataclass

from host.exportfs.confined import NAME_MAX
from host.exportfs.confined import OFF_MAX as _OFF_MAX
from host.exportfs.confined import OPATH as _OPATH
from host.exportfs.confined import check_int as _check_int
from host.exportfs.confined import check_name as _check_name
from host.exportfs.confined import err as _err
from host.exportfs.confined import open_flags as _open_flags
from host.exportfs.confined import proc_path as _proc_path
from host.exportfs.confined import renameat2 as _renameat2
from host.exportfs.confined import reopen as _reopen
from host.exportfs.extents import ExtentOps
from host.exportfs.links import LinkOps
from host.exportfs.locks import LockOps
from host.exportfs.xattrs import XattrOps
from host.inodes import ROOT_NODEID, InodeStore
from host.linux.fileat import UTIME_NOW, UTIME_OMIT, chown_fd, set_times

__all__ = [
    "DT_DIR",
    "DT_LNK",
    "DT_REG",
    "DT_UNKNOWN",
    "NAME_MAX",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "ROOT_NODEID",
    "TIME_NOW",
    "ExportFS",
]


DT_UNKNOWN = 0
DT_DIR = 4
DT_REG = 8
DT_LNK = 10

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_CREATE_TRIES = 8
TIME_NOW = "now"  # setattr: set this time to the current time (UTIME_NOW)


@dataclass(eq=False)
class _Handle:
    owner: int
    nodeid: int
    fd: int


class ExportFS(LinkOps, XattrOps, ExtentOps, LockOps):
    """The export, as guests see it: nodeids, file handles, confined passthrough.

    Args:
      root_path: the export directory (see ``InodeStore``).
      max_handles_per_owner: open file handles one owner may hold at once;
        one more raises ``OSError(EMFILE)``.
      max_handles, max_nodeids, max_nodeids_per_owner: the descriptor
        budget (host/limits.py, ``FdBudget``): handles of all owners (one
        more: ``ENFILE``), node ids in all (``ENFILE``) and per owner
        (``EMFILE``); None: unbounded.
      max_io_size: largest ``read`` size or ``write`` length in bytes; more
        raises ``OSError(EINVAL)`` (a guest must not make the host allocate
        what it likes).

    Raises:
      OSError: the root cannot be opened as a directory.
    """

    def __init__(
        self,
        root_path: str | os.PathLike[str],
        *,
        max_handles_per_owner: int = 1024,
        max_io_size: int = 1 << 20,
        on_forget: Callable[[int], None] | None = None,
        max_handles: int | None = None,
        max_nodeids: int | None = None,
        max_nodeids_per_owner: int | None = None,
    ) -> None:
        self._writable: dict[int, int] = {}
        # Called with a nodeid once no owner holds it and no handle pins it: it
        # is gone for good (a later lookup of the same file gets a new one).
        self._on_forget = on_forget
        self._store = InodeStore(root_path, on_drop=self._dropped, max_nodeids=max_nodeids,
                                 max_nodeids_per_owner=max_nodeids_per_owner)
        self._max_handles_total = max_handles
        self._handles: dict[int, _Handle] = {}
        self._lock_fds: dict[int, dict[int, int]] = {}  # fh -> lock owner -> fd (LockOps)
        self._owner_handles: dict[int, set[int]] = {}
        self._next_fh = 1
        self._max_handles = max_handles_per_owner
        self._max_io = max_io_size

    @property
    def root_path(self) -> str:
        """The resolved path of the export directory."""
        return self._store.root_path

    @property
    def inodes(self) -> InodeStore:
        """The inode store, for the daemon's ``lookup_key`` on kernel events."""
        return self._store

    # -- names ---------------------------------------------------------------

    def lookup(self, owner: int, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        """Look ``name`` up in directory ``parent``; count one lookup for ``owner``.

        A symlink is returned as itself (its own nodeid and ``lstat``).

        Returns:
          ``(nodeid, stat)``.

        Raises:
          OSError: ``EINVAL``/``ENAMETOOLONG`` (bad name), ``ESTALE`` (parent
            not held), ``ENOTDIR`` (parent is not a directory, a symlink
            included), ``ENOENT``...
        """
        name = _check_name(name)
        parent_fd = self._store.fd_of(owner, parent)
        fd = os.open(name, _OPATH, dir_fd=parent_fd)
        return self._store.adopt(owner, fd)

    def getattr(self, owner: int, nodeid: int) -> os.stat_result:
        """The attributes of ``nodeid`` (of a symlink itself, not its target).

        Raises:
          OSError: ``ESTALE`` if ``owner`` does not hold ``nodeid``.
        """
        return os.stat(self._store.fd_of(owner, nodeid))

    def setattr(
        self,
        owner: int,
        nodeid: int,
        *,
        size: int | None = None,
        mode: int | None = None,
        atime_ns: int | str | None = None,
        mtime_ns: int | str | None = None,
        fh: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> os.stat_result:
        """Change what is given, in the order owner, mode, size, times; return the new stat.

        ``uid``/``gid`` change the owner and group (of a symlink itself, never
        its target); the kernel clears setuid/setgid as for chown(2).  A time
        may be ``TIME_NOW``: set to the current time with the permission rule
        of utimensat(2)'s UTIME_NOW (the owner, or anyone who may write).

        ``size`` truncates through ``fh`` when given (which must be a handle
        of ``owner`` on ``nodeid``, open for writing), else through a fresh
        ``O_WRONLY`` open of the inode.  Times apply last so that a truncate
        cannot overwrite a requested mtime.  A time not given is left as it
        is (UTIME_OMIT).  Every argument is checked before anything changes; a
        failure part way leaves the earlier changes in place, as on Linux.

        Raises:
          OSError: ``EINVAL`` (bad argument), ``ESTALE``, ``EBADF`` (``fh``
            not ``owner``'s or not on ``nodeid``), ``EOPNOTSUPP`` (mode of a
            symlink: Linux cannot chmod one), ``EISDIR``/``ELOOP``/``EINVAL``
            (size of a non-regular file), ``EACCES``, ``EPERM``...
        """
        if size is not None:
            _check_int(size, "size", 0, _OFF_MAX)
        if mode is not None:
            _check_int(mode, "mode", 0, 0o7777)
        for t in (atime_ns, mtime_ns):
            if t is not None and t != TIME_NOW:
                _check_int(t, "time", -(2**63), 2**63 - 1)
        for i in (uid, gid):
            if i is not None:
                _check_int(i, "uid/gid", 0, 2**32 - 2)
        opath = self._store.fd_of(owner, nodeid)
        handle = None
        if fh is not None:
            handle = self._handle(owner, fh)
            if handle.nodeid != nodeid:
                raise _err(errno.EBADF, "file handle is not on this nodeid")

        if uid is not None or gid is not None:
            chown_fd(opath, -1 if uid is None else uid, -1 if gid is None else gid)
        if mode is not None:
            if _stat.S_ISLNK(os.stat(opath).st_mode):
                # Checked rather than left to the kernel so that no chmod is
                # ever issued through a symlink's magic link.
                raise _err(errno.EOPNOTSUPP, "cannot chmod a symlink")
            os.chmod(_proc_path(opath), mode)
        if size is not None:
            if handle is not None:
                os.ftruncate(handle.fd, size)
            else:
                fd = _reopen(opath, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if atime_ns is not None or mtime_ns is not None:
            # Through the magic link, a symlink gets its own times set, never
            # its target's (tests check this).  A time not given is left alone.
            def spec(t):
                return UTIME_OMIT if t is None else UTIME_NOW if t == TIME_NOW else t
            set_times(_proc_path(opath), spec(atime_ns), spec(mtime_ns))
        return os.stat(opath)

    def readdir(self, owner: int, nodeid: int) -> list[tuple[bytes, int, int]]:
        """The entries of directory ``nodeid``, sorted by name, without . and ..

        Returns:
          ``[(name, d_ino, d_type), ...]`` with ``d_type`` one of the Linux
          ``DT_*`` numbers (``DT_DIR`` 4, ``DT_REG`` 8, ``DT_LNK`` 10, other
          types as the kernel numbers them, ``DT_UNKNOWN`` 0 for an entry
          that vanished while being read).

        Raises:
          OSError: ``ESTALE``, ``ENOTDIR`` (not a directory, symlinks
            included), ``EACCES``...
        """
        opath = self._store.fd_of(owner, nodeid)
        dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=opath)
        try:
            with os.scandir(dfd) as it:
                # scandir on an fd yields str names; fsencode undoes the
                # surrogateescape decoding exactly.
                out = [(os.fsencode(e.name), e.inode(), _dtype(e)) for e in it]
        finally:
            os.close(dfd)
        out.sort()
        return out

    def mkdir(self, owner: int, parent: int, name: bytes, mode: int) -> tuple[int, os.stat_result]:
        """Make directory ``name`` in ``parent``; count one lookup for ``owner``.

        Raises:
          OSError: ``EINVAL``/``ENAMETOOLONG``, ``ESTALE``, ``ENOTDIR``,
            ``EEXIST``, ``EACCES``...
        """
        name = _check_name(name)
        _check_int(mode, "mode", 0, 0o7777)
        parent_fd = self._store.fd_of(owner, parent)
        os.mkdir(name, mode, dir_fd=parent_fd)
        # O_DIRECTORY: if something else was renamed over the new name in
        # between, fail (ENOTDIR) rather than hand out a nodeid for it.
        fd = os.open(name, _OPATH | os.O_DIRECTORY, dir_fd=parent_fd)
        return self._store.adopt(owner, fd)

    def unlink(self, owner: int, parent: int, name: bytes) -> None:
        """Remove non-directory ``name`` from ``parent``.

        The inode stays reachable through nodeids and handles already issued.

        Raises:
          OSError: ``EINVAL``/``ENAMETOOLONG``, ``ESTALE``, ``ENOENT``,
            ``EISDIR``, ``ENOTDIR``...
        """
        name = _check_name(name)
        os.unlink(name, dir_fd=self._store.fd_of(owner, parent))

    def rmdir(self, owner: int, parent: int, name: bytes) -> None:
        """Remove empty directory ``name`` from ``parent``.

        Raises:
          OSError: ``EINVAL``/``ENAMETOOLONG``, ``ESTALE``, ``ENOENT``,
            ``ENOTDIR``, ``ENOTEMPTY``...
        """
        name = _check_name(name)
        os.rmdir(name, dir_fd=self._store.fd_of(owner, parent))

    def rename(
        self,
        owner: int,
        olddir: int,
        oldname: bytes,
        newdir: int,
        newname: bytes,
        flags: int = 0,
    ) -> None:
        """Rename ``olddir/oldname`` to ``newdir/newname``; nodeids are kept.

        ``flags`` is 0, ``RENAME_NOREPLACE`` or ``RENAME_EXCHANGE``
        (``renameat2(2)``).

        Raises:
          OSError: ``EINVAL`` (bad name or flags), ``ENAMETOOLONG``,
            ``ESTALE``, ``ENOENT``, ``EEXIST`` (``RENAME_NOREPLACE``),
            ``ENOTEMPTY``, ``EXDEV``...
        """
        oldname = _check_name(oldname)
        newname = _check_name(newname)
        flags = _check_int(flags, "flags", 0, RENAME_NOREPLACE | RENAME_EXCHANGE)
        old_fd = self._store.fd_of(owner, olddir)
        new_fd = self._store.fd_of(owner, newdir)
        if flags == 0:
            os.rename(oldname, newname, src_dir_fd=old_fd, dst_dir_fd=new_fd)
        else:
            _renameat2(old_fd, oldname, new_fd, newname, flags)

    def forget(self, owner: int, nodeid: int, nlookup: int) -> None:
        """See ``InodeStore.forget``."""
        self._store.forget(owner, nodeid, nlookup)

    # -- file handles ------------------------------------------------------------

    def open(self, owner: int, nodeid: int, flags: int) -> int:
        """Open regular file ``nodeid`` for data; return a handle of ``owner``.

        ``flags`` keeps the access mode and ``O_APPEND``, ``O_TRUNC``,
        ``O_SYNC``, ``O_DSYNC``; everything else is ignored.

        Raises:
          OSError: ``EINVAL`` (bad flags, not a regular file), ``ESTALE``,
            ``EISDIR``, ``ELOOP`` (symlink), ``EMFILE`` (handle limit),
            ``EACCES``...
        """
        oflags = _open_flags(flags)
        opath = self._store.fd_of(owner, nodeid)
        self._check_room(owner)
        return self._new_handle(owner, nodeid, _reopen(opath, oflags))

    def create(
        self, owner: int, parent: int, name: bytes, flags: int, mode: int
    ) -> tuple[int, os.stat_result, int]:
        """Create (or, without ``O_EXCL``, open) regular file ``name`` in ``parent``.

        Counts one lookup for ``owner`` and opens a handle as ``open`` would.
        An existing name is opened only if it is a regular file: a symlink at
        that name is never followed (``ELOOP``), a FIFO or device never opened.

        Returns:
          ``(nodeid, stat, fh)``.

        Raises:
          OSError: ``EINVAL``/``ENAMETOOLONG``, ``ESTALE``, ``ENOTDIR``,
            ``EEXIST`` (``O_EXCL``), ``EISDIR``, ``ELOOP``, ``EMFILE`` (handle
            limit; nothing is created), ``EACCES``...
        """
        name = _check_name(name)
        oflags = _open_flags(flags)
        _check_int(mode, "mode", 0, 0o7777)
        exclusive = bool(flags & os.O_EXCL)
        parent_fd = self._store.fd_of(owner, parent)
        self._check_room(owner)
        for _ in range(_CREATE_TRIES):
            try:
                fd = os.open(
                    name,
                    oflags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    mode,
                    dir_fd=parent_fd,
                )
            except FileExistsError:
                if exclusive:
                    raise
            else:
                try:
                    opath = os.open(_proc_path(fd), os.O_PATH | os.O_CLOEXEC)
                except BaseException:
                    os.close(fd)
                    raise
                break
            # The name exists.  Open it O_PATH and check its type first, so
            # only a regular file is ever opened for data: a plain O_CREAT
            # open would block on a FIFO and open a device node's device.
            try:
                opath = os.open(name, _OPATH, dir_fd=parent_fd)
            except FileNotFoundError:
                continue  # unlinked in between: try creating again
            try:
                fd = _reopen(opath, oflags)
            except BaseException:
                os.close(opath)
                raise
            break
        else:
            raise _err(errno.EAGAIN, "name kept appearing and vanishing")
        try:
            nodeid, st = self._store.adopt(owner, opath)
        except BaseException:
            os.close(fd)
            raise
        return nodeid, st, self._new_handle(owner, nodeid, fd)

    def read(self, owner: int, fh: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer at end of file).

        Raises:
          OSError: ``EBADF`` (not ``owner``'s handle, or not open for
            reading), ``EINVAL`` (negative offset, size beyond
            ``max_io_size``)...
        """
        handle = self._handle(owner, fh)
        _check_int(offset, "offset", 0, _OFF_MAX)
        _check_int(size, "size", 0, self._max_io)
        return os.pread(handle.fd, size, offset)

    def write(self, owner: int, fh: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` at ``offset``; return the number of bytes written.

        On a handle opened with ``O_APPEND`` Linux appends whatever the offset.

        Raises:
          OSError: ``EBADF`` (not ``owner``'s handle, or not open for
            writing), ``EINVAL`` (negative offset, not a contiguous buffer,
            longer than ``max_io_size``), ``ENOSPC``, ``EFBIG``...
        """
        return self.write_call(owner, fh, offset, data)()

    def write_call(self, owner: int, fh: int, offset: int,
                   data: bytes | bytearray | memoryview) -> Callable[[], int]:
        """`write`, in two steps: checks everything now, and returns the call
        that writes (and returns the number of bytes written), which may run on
        another thread.  It writes through its own duplicate of the handle's
        fd, closed when it returns, so a handle closed meanwhile cannot make
        it write to whatever file reuses the fd's number.

        Raises (now): as `write`, but not what the write itself reports; the
        returned call raises that (``ENOSPC``, ``EFBIG``...).
        """
        handle = self._handle(owner, fh)
        _check_int(offset, "offset", 0, _OFF_MAX)
        try:
            view = memoryview(data)
        except TypeError:
            raise _err(errno.EINVAL, "data must be a bytes-like object") from None
        if not view.contiguous:
            raise _err(errno.EINVAL, "data must be contiguous")
        if view.nbytes > self._max_io:
            raise _err(errno.EINVAL, "write longer than max_io_size")
        fd = os.dup(handle.fd)

        def write() -> int:
            try:
                return os.pwrite(fd, view, offset)
            finally:
                os.close(fd)
        return write

    def peek(self, parent: int, name: object) -> int | None:
        """The nodeid some owner knows the inode ``name`` in ``parent`` names now
        by, or None (no such name, an invalid one, an inode nobody knows).  No
        lookup count changes, and the name may change right after.  Never raises."""
        try:
            st = os.stat(_check_name(name), dir_fd=self._store.host_fd(parent),
                         follow_symlinks=False)
        except OSError:
            return None
        return self._store.lookup_key(st.st_dev, st.st_ino)

    def flush(self, owner: int, fh: int, lock_owner: int | None = None) -> None:
        """What a guest ``close()`` of one descriptor means; the handle stays open.

        Raises:
          OSError: ``EBADF``; whatever the file system reports on close.
        """
        handle = self._handle(owner, fh)
        if lock_owner is not None:  # a process closed a descriptor: its POSIX locks go
            self.release_locks(owner, fh, lock_owner)
        # Closing a duplicate gives the file system the close() it would see
        # from a local process (network file systems write back on close,
        # POSIX locks are dropped), without giving up the handle.
        os.close(os.dup(handle.fd))

    def fsync(self, owner: int, fh: int, datasync: bool) -> Callable[[], None]:
        """A call that ``fdatasync``s (if ``datasync``, else ``fsync``s) the
        handle's file, to be run in a worker thread.

        It works on a duplicate of the handle's fd taken now, so a RELEASE of
        the handle (or the inode being dropped) while it runs can neither make
        it fail with ``EBADF`` nor, through a reused fd number, sync another
        file.  The call closes its duplicate.

        Raises:
          OSError: ``EBADF`` now; ``EIO``... from the call.
        """
        return _sync_call(os.dup(self._handle(owner, fh).fd), datasync)

    def flush_inode(self, nodeid: int) -> Callable[[], None]:
        """A call that ``fdatasync``s regular file ``nodeid`` (through the daemon's
        own writable fd, see `writable_fd`), to be run in a worker thread; like
        `fsync`, on a duplicate taken now.

        Raises:
          OSError: as `writable_fd` now; ``EIO``... from the call.
        """
        return _sync_call(os.dup(self.writable_fd(nodeid)), True)

    def release(self, owner: int, fh: int) -> None:
        """Close handle ``fh``; its number is not issued again.

        Raises:
          OSError: ``EBADF`` if ``fh`` is not an open handle of ``owner``
            (nothing is closed then).
        """
        handle = self._handle(owner, fh)
        self._drop_handle(fh, handle)

    def nodeid_of_handle(self, owner: int, fh: int) -> int:
        """The nodeid handle ``fh`` was opened on.

        Raises:
          OSError: ``EBADF`` if ``fh`` is not an open handle of ``owner``.
        """
        return self._handle(owner, fh).nodeid

    def fds_held(self) -> tuple[int, int, int]:
        """(node ids, handles, writable fds) held now: the export's descriptors."""
        return len(self._store), len(self._handles), len(self._writable)

    def handles_of(self, owner: int) -> int:
        """How many handles ``owner`` has open."""
        return len(self._owner_handles.get(owner, ()))

    # -- sessions and the daemon's own access -------------------------------

    def drop_owner(self, owner: int) -> None:
        """End ``owner``'s session: close all its handles, forget all its nodeids.

        Never raises for an unknown owner.
        """
        self.close_handles_of(owner)
        self._store.drop_owner(owner)

    def close_handles_of(self, owner: int) -> None:
        """Close all of ``owner``'s handles; its nodeids stay known (`drop_owner`
        forgets them).  Never raises for an unknown owner."""
        for fh in list(self._owner_handles.get(owner, ())):
            self._drop_handle(fh, self._handles[fh])

    def inode_key(self, nodeid: int) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of a live nodeid, whoever holds it.

        Raises:
          OSError: ``ESTALE`` if no owner holds it and no handle is open on it.
        """
        return self._store.key_of(nodeid)

    def writable_fd(self, nodeid: int) -> int:
        """A writable fd of regular file ``nodeid``, kept for the daemon's own use.

        For ``fdatasync`` and ``cachestat(2)``: ``cachestat`` refuses
        (``EPERM``) an fd not open for writing unless the caller owns the file
        or may write it (seen on Linux 6.18).  Opened ``O_RDWR`` on first
        use (``O_WRONLY`` if that is refused), then reused; closed when the
        inode is dropped.  The fd stays owned by this object: do not close it.

        While it is open the host kernel counts a writer on the inode: a
        host-local ``execve`` of the file fails with ``ETXTBSY`` and a
        ``F_SETLEASE`` ``F_RDLCK`` on it fails with ``EAGAIN``.

        Raises:
          OSError: ``ESTALE`` (not live), ``EISDIR``, ``ELOOP``, ``EINVAL``
            (not a regular file), ``EACCES``, ``EROFS``, ``ETXTBSY``...
        """
        opath = self._store.host_fd(nodeid)
        fd = self._writable.get(nodeid)
        if fd is None:
            try:
                fd = _reopen(opath, os.O_RDWR)
            except PermissionError:
                fd = _reopen(opath, os.O_WRONLY)
            self._writable[nodeid] = fd
        return fd

    def close(self) -> None:
        """Close every handle and fd this object and its store hold.  Idempotent."""
        for fh, handle in list(self._handles.items()):
            self._drop_handle(fh, handle)
        self._store.close()

    # -- internals -------------------------------------------------------------

    def _handle(self, owner: int, fh: object) -> _Handle:
        handle = self._handles.get(fh) if type(fh) is int else None
        if handle is None or handle.owner != owner:
            raise _err(errno.EBADF)
        return handle

    def _check_room(self, owner: int) -> None:
        if self.handles_of(owner) >= self._max_handles:
            raise _err(errno.EMFILE, "too many open file handles for this guest")
        if self._max_handles_total is not None and len(self._handles) >= self._max_handles_total:
            raise _err(errno.ENFILE, "the daemon holds as many file handles as its file "
                                     "descriptor budget allows")

    def _new_handle(self, owner: int, nodeid: int, fd: int) -> int:
        try:
            self._store.pin(nodeid)
        except BaseException:
            os.close(fd)
            raise
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(owner, nodeid, fd)
        self._owner_handles.setdefault(owner, set()).add(fh)
        return fh

    def _drop_handle(self, fh: int, handle: _Handle) -> None:
        self._drop_locks(fh)
        del self._handles[fh]
        mine = self._owner_handles[handle.owner]
        mine.discard(fh)
        if not mine:
            del self._owner_handles[handle.owner]
        try:
            os.close(handle.fd)
        finally:
            self._store.unpin(handle.nodeid)

    def _dropped(self, nodeid: int) -> None:
        fd = self._writable.pop(nodeid, None)
        if fd is not None:
            os.close(fd)
        if self._on_forget is not None:
            self._on_forget(nodeid)


def _sync_call(fd: int, datasync: bool) -> Callable[[], None]:
    """fdatasync/fsync `fd` once, then close it (whatever the outcome)."""
    def sync() -> None:
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            os.close(fd)
    return sync


def _dtype(entry: os.DirEntry[str]) -> int:
    try:
        if entry.is_dir(follow_symlinks=False):
            return DT_DIR
        if entry.is_file(follow_symlinks=False):
            return DT_REG
        if entry.is_symlink():
            return DT_LNK
        # DT_* numbers are the S_IFMT bits shifted down (FIFO 1, CHR 2, BLK 6,
        # SOCK 12), as the kernel defines them.
        return _stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode) >> 12
    except OSError:
        return DT_UNKNOWN
