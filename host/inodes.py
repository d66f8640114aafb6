"""The host's inode store: which host inodes the guests know, and by what nodeid.

A guest names files by nodeid, never by path.  This module maps nodeids to host
inodes the way virtiofsd does:

* An inode is identified by ``(st_dev, st_ino)``.  A hard link, or a file that
  was renamed, is the same inode and therefore the same nodeid.
* Every known inode keeps one ``O_PATH | O_NOFOLLOW`` file descriptor.  Holding
  it pins the inode, so its ``(st_dev, st_ino)`` cannot be reused by a new file
  while a guest may still name it, and every later operation reaches exactly
  this inode no matter what is renamed over its old name.
* Nodeids come from a counter and are never reused within a run, so a nodeid a
  guest kept past its forget can only be stale, never point at another file.

Lookup counts are kept per *owner* (an ``int`` session id of one guest), the
way the FUSE kernel counts them: each successful lookup/create/mkdir adds one,
``forget`` subtracts.  An owner may use a nodeid only while its own count is
positive; the root (``ROOT_NODEID``) is visible to every owner and never
dropped.  Using a nodeid the owner does not hold raises ``OSError(ESTALE)``:
that is what the nodeid is to that owner, and it is the errno the FUSE kernel
already knows how to recover from (it re-looks the name up).

Besides the owners' counts an inode can be *pinned* by the daemon (an open file
handle pins its inode), so a guest that forgets a nodeid while it still has the
file open cannot make the daemon lose track of the inode behind the handle.

The store is not thread-safe: the caller serialises calls.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ROOT_NODEID", "InodeStore"]

ROOT_NODEID = 1

_OPATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _stale() -> OSError:
    return OSError(errno.ESTALE, os.strerror(errno.ESTALE))


@dataclass(eq=False)
class _Inode:
    nodeid: int
    key: tuple[int, int]
    fd: int
    holders: dict[int, int] = field(default_factory=dict)  # owner -> nlookup
    pins: int = 0


class InodeStore:
    """Nodeids, per-owner lookup counts and one ``O_PATH`` fd per known inode.

    Args:
      root_path: the export directory.  Symlinks in the path itself are
        resolved once, here; from then on the export is the directory that
        path named at construction time.
      on_drop: called with the nodeid just before an inode is forgotten by
        everyone and its fd is closed, so the owner of per-inode resources
        (the backend's writable fds) can release them.
      max_nodeids: inodes known at once (each holds an fd), the root
        included; a lookup of one more gets ``ENFILE`` (host/limits.py).
      max_nodeids_per_owner: node ids one owner may hold at once; one more
        gets ``EMFILE``.

    Raises:
      OSError: the root cannot be opened as a directory (``ENOENT``,
        ``ENOTDIR``, ``EACCES``...).
    """

    def __init__(
        self,
        root_path: str | os.PathLike[str],
        *,
        on_drop: Callable[[int], None] | None = None,
        max_nodeids: int | None = None,
        max_nodeids_per_owner: int | None = None,
    ) -> None:
        self._max_nodeids = max_nodeids
        self._max_per_owner = max_nodeids_per_owner
        real = os.path.realpath(root_path)
        fd = os.open(real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.root_path: str = real
        self._on_drop = on_drop
        key = (st.st_dev, st.st_ino)
        self._root = _Inode(ROOT_NODEID, key, fd)
        self._by_nodeid: dict[int, _Inode] = {ROOT_NODEID: self._root}
        self._by_key: dict[tuple[int, int], _Inode] = {key: self._root}
        self._owned: dict[int, set[int]] = {}  # owner -> nodeids it holds
        self._next_nodeid = ROOT_NODEID + 1
        self._closed = False

    # -- issuing and forgetting ---------------------------------------------

    def adopt(self, owner: int, fd: int) -> tuple[int, os.stat_result]:
        """Take ownership of an ``O_PATH`` fd just opened for ``owner``.

        Counts one lookup of the inode for ``owner``.  If the inode is already
        known (a hard link, a rename, another owner's lookup) the known nodeid
        is returned and ``fd`` is closed, so each inode keeps exactly one fd.

        Returns:
          ``(nodeid, stat)`` with the stat of ``fd``.

        Raises:
          OSError: ``fstat`` failed; ``ENFILE`` (the store holds
            ``max_nodeids`` already and this inode is new), ``EMFILE``
            (``owner`` holds ``max_nodeids_per_owner`` and this one is new to
            it); ``fd`` is closed in every case.
        """
        try:
            st = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is not self._root:
            self._check_room(owner, inode, fd)
        if inode is not None:
            os.close(fd)
        else:
            inode = _Inode(self._next_nodeid, key, fd)
            self._next_nodeid += 1
            self._by_nodeid[inode.nodeid] = inode
            self._by_key[key] = inode
        if inode is not self._root:
            inode.holders[owner] = inode.holders.get(owner, 0) + 1
            self._owned.setdefault(owner, set()).add(inode.nodeid)
        return inode.nodeid, st

    def _check_room(self, owner: int, inode: "_Inode | None", fd: int) -> None:
        """Refuse (closing `fd`) a node id beyond the budgets (host/limits.py)."""
        if inode is None and self._max_nodeids is not None \
                and len(self._by_nodeid) >= self._max_nodeids:
            os.close(fd)
            raise OSError(errno.ENFILE, "the daemon holds as many node ids as its file "
                                        "descriptor budget allows")
        if (self._max_per_owner is not None and (inode is None or owner not in inode.holders)
                and len(self._owned.get(owner, ())) >= self._max_per_owner):
            os.close(fd)
            raise OSError(errno.EMFILE, "this guest holds as many node ids as one guest may "
                                        "(FORGET some)")

    def held_by(self, owner: int) -> int:
        """How many node ids ``owner`` holds."""
        return len(self._owned.get(owner, ()))

    def forget(self, owner: int, nodeid: int, nlookup: int) -> None:
        """Subtract ``nlookup`` from ``owner``'s lookup count of ``nodeid``.

        A count that reaches zero hides the nodeid from ``owner``; an inode no
        owner holds and nothing pins has its fd closed.  Forgetting more than
        was looked up clamps to zero: a confused guest must not be able to
        take a count below what another session relies on.  Forgetting the
        root does nothing (the root is never dropped).

        Raises:
          OSError: ``EINVAL`` if ``nlookup`` is not a non-negative int;
            ``ESTALE`` if ``owner`` does not hold ``nodeid``.
        """
        if type(nlookup) is not int or nlookup < 0:
            raise OSError(errno.EINVAL, "nlookup must be a non-negative int")
        if nodeid == ROOT_NODEID:
            return
        inode = self._held(owner, nodeid)
        left = inode.holders[owner] - nlookup
        if left > 0:
            inode.holders[owner] = left
            return
        del inode.holders[owner]
        owned = self._owned[owner]
        owned.discard(nodeid)
        if not owned:
            del self._owned[owner]
        self._maybe_drop(inode)

    def drop_owner(self, owner: int) -> None:
        """Forget every nodeid ``owner`` holds, as if it sent all its forgets.

        Used when a guest session ends.  Never raises for an unknown owner.
        """
        for nodeid in self._owned.pop(owner, ()):
            inode = self._by_nodeid[nodeid]
            del inode.holders[owner]
            self._maybe_drop(inode)

    # -- pins (daemon-side references) ---------------------------------------

    def pin(self, nodeid: int) -> None:
        """Keep ``nodeid`` alive until a matching ``unpin``, whoever forgets it.

        Raises:
          OSError: ``ESTALE`` if the nodeid is not live.
        """
        self._live(nodeid).pins += 1

    def unpin(self, nodeid: int) -> None:
        """Release one ``pin``; the inode is dropped if nothing else holds it.

        Raises:
          OSError: ``ESTALE`` if the nodeid is not live or not pinned.
        """
        inode = self._live(nodeid)
        if inode.pins <= 0:
            raise _stale()
        inode.pins -= 1
        self._maybe_drop(inode)

    # -- queries ---------------------------------------------------------------

    def fd_of(self, owner: int, nodeid: int) -> int:
        """The ``O_PATH`` fd of ``nodeid``, checked against ``owner``'s counts.

        The fd stays owned by the store: do not close it.

        Raises:
          OSError: ``ESTALE`` if ``owner`` does not hold ``nodeid`` (never
            issued, issued only to other owners, or forgotten).
        """
        if nodeid == ROOT_NODEID:
            return self._live(ROOT_NODEID).fd
        return self._held(owner, nodeid).fd

    def host_fd(self, nodeid: int) -> int:
        """The ``O_PATH`` fd of a live ``nodeid``, for the daemon's own use.

        No owner check: the daemon acts on an inode any guest holds (to flush
        it, to invalidate it).  The fd stays owned by the store.

        Raises:
          OSError: ``ESTALE`` if no owner holds the nodeid and nothing pins it.
        """
        return self._live(nodeid).fd

    def key_of(self, nodeid: int) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of a live ``nodeid``.

        Raises:
          OSError: ``ESTALE`` if the nodeid is not live.
        """
        return self._live(nodeid).key

    def lookup_key(self, dev: int, ino: int) -> int | None:
        """The nodeid of inode ``(dev, ino)`` if any guest knows it, else None.

        The daemon calls this when the kernel reports an event on an fd: it
        ``fstat``s the event's fd and asks which nodeid that inode is.
        """
        inode = self._by_key.get((dev, ino))
        return None if inode is None else inode.nodeid

    def lookup_count(self, owner: int, nodeid: int) -> int:
        """``owner``'s current lookup count of ``nodeid`` (0 if none).

        The root reports 1 for every owner: it is always visible.
        """
        if nodeid == ROOT_NODEID:
            return 1
        inode = self._by_nodeid.get(nodeid)
        return 0 if inode is None else inode.holders.get(owner, 0)

    def __len__(self) -> int:
        """Number of live inodes, the root included."""
        return len(self._by_nodeid)

    def close(self) -> None:
        """Close every fd, the root's included.  Idempotent.

        ``on_drop`` is called for each inode still live, root excepted.
        """
        if self._closed:
            return
        self._closed = True
        for inode in list(self._by_nodeid.values()):
            if inode is not self._root and self._on_drop is not None:
                self._on_drop(inode.nodeid)
            os.close(inode.fd)
        self._by_nodeid.clear()
        self._by_key.clear()
        self._owned.clear()

    # -- internals -------------------------------------------------------------

    def _live(self, nodeid: int) -> _Inode:
        inode = self._by_nodeid.get(nodeid) if type(nodeid) is int else None
        if inode is None:
            raise _stale()
        return inode

    def _held(self, owner: int, nodeid: int) -> _Inode:
        inode = self._live(nodeid)
        if inode.holders.get(owner, 0) <= 0:
            raise _stale()
        return inode

    def _maybe_drop(self, inode: _Inode) -> None:
        if inode is self._root or inode.holders or inode.pins:
            return
        del self._by_nodeid[inode.nodeid]
        del self._by_key[inode.key]
        try:
            if self._on_drop is not None:
                self._on_drop(inode.nodeid)
        finally:
            os.close(inode.fd)
