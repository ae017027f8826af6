"""A FUSE file system that loses, on command, what was not made durable: a power cut for tests.

    python tests/powercut_fs.py DIR MOUNTPOINT

serves DIR's tree at MOUNTPOINT. Every call is carried out at once, as on a disk with a volatile write cache;
what the disk would keep after a power loss is tracked beside it:

- a file's data (writes, truncations) is durable once the file is fsync'd or fdatasync'd;
- a directory's entries (creations, links, renames, removals) are durable once the directory is fsync'd; a
  rename between two directories is durable once either of them is (a journalling file system commits a
  rename as one transaction, so no power loss shows the file in both or in neither);
- syncfs(2) makes everything durable. FUSE does not pass syncfs on to its file systems (only virtiofs has it),
  so a process under test forwards it as the extended attribute ``user.powercut.syncfs`` on any path of the
  mount (tests/powercut_syncfs.c does that for every syncfs call, through LD_PRELOAD);
- modes, owners, times and extended attributes are kept as they are set (no test needs them to be lost).

Signals drive it: SIGUSR1 *cuts the power*. From that instant every call fails with EIO (a process blocked on
a call that is never answered could not even be killed), and DIR is rewritten to hold exactly what a disk would
after the power loss; then ``cut`` is printed. SIGTERM unmounts and exits; without a cut before, it is a clean
shutdown (everything is kept, as an unmount flushes it). ``ready`` is printed once the mount serves.

While mounted, DIR holds only ``.powercut-stash/``: one file (or directory, for its attributes) per inode,
named by inode number, which the mount reads and writes; the tree itself is kept in memory. Writes keep the
bytes they overwrite of the durable content (an undo log) until the next fsync, so a cut restores them.
Every call runs to its end on the event loop without awaiting: calls never interleave, and a cut falls
between two of them.

Written for the tests rather than taken from LazyFS: LazyFS builds with CMake from source (no Debian or PyPI
package), while pyfuse3 comes from PyPI and runs on Trio like the launcher.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pyfuse3
import trio

STASH = ".powercut-stash"
SYNCFS_XATTR = b"user.powercut.syncfs"

T = TypeVar("T")


@attrs.define(eq=False)
class Node:
    """One inode: its live state is in the stash (data, attributes) and `entries`; its durable state here."""

    ino: int
    kind: int  # stat.S_IFMT of the inode
    links: int = 1  # live directory entries naming it (for st_nlink of files)
    entries: dict[bytes, int] = attrs.Factory(dict)  # a directory's live entries
    durable_entries: dict[bytes, int] = attrs.Factory(dict)  # ... as a power loss would leave them
    durable_size: int = 0  # a file's length after a power loss
    undo: list[tuple[int, bytes]] = attrs.Factory(list)  # (offset, durable bytes) overwritten since the fsync

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR


@attrs.define(eq=False)
class CrossRename:
    """A rename between two directories, durable once either of them is fsync'd."""

    source: int
    source_name: bytes
    target: int
    target_name: bytes
    ino: int


def _fuse_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Run `handler` only while the power is on, and answer its OSError with the same errno."""

    @functools.wraps(handler)
    async def guarded(self: PowerCutFS, *args: Any) -> T:
        if self.power_off:
            raise pyfuse3.FUSEError(errno.EIO)
        try:
            return await handler(self, *args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    return guarded


class PowerCutFS(pyfuse3.Operations):  # type: ignore[misc]
    """The file system of the module doc, over the directory `root`."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.stash = root / STASH
        self.nodes: dict[int, Node] = {}
        self.next_ino = pyfuse3.ROOT_INODE
        self.handles: dict[int, tuple[int, int]] = {}  # fh -> (inode, fd of its stash file, or -1)
        self.listings: dict[int, list[tuple[bytes, int]]] = {}  # fh of an open directory -> its entries
        self.next_fh = 1
        self.cross_renames: list[CrossRename] = []
        self.power_off = False

    # ------------------------------------------------------------------ the tree in DIR, in and out

    def import_tree(self) -> None:
        """Take DIR's tree in, all of it durable: each inode moves into the stash."""
        self.stash.mkdir(mode=0o700)
        root = self._new_node(stat.S_IFDIR)
        shutil.copystat(self.root, self._path(root.ino))
        os.chown(self._path(root.ino), self.root.stat().st_uid, self.root.stat().st_gid)
        seen: dict[tuple[int, int], int] = {}
        self._import_dir(self.root, root, seen, top=True)

    def _import_dir(self, directory: Path, node: Node, seen: dict[tuple[int, int], int], top: bool = False) -> None:
        for entry in os.scandir(directory):
            if top and entry.name == STASH:
                continue
            st = entry.stat(follow_symlinks=False)
            name = os.fsencode(entry.name)
            if (st.st_dev, st.st_ino) in seen and not stat.S_ISDIR(st.st_mode):
                child = self.nodes[seen[(st.st_dev, st.st_ino)]]
                child.links += 1
                os.unlink(entry.path)
            elif stat.S_ISDIR(st.st_mode):
                child = self._new_node(stat.S_IFDIR)
                shutil.copystat(entry.path, self._path(child.ino))  # mode and times
                os.chown(self._path(child.ino), st.st_uid, st.st_gid)
                self._import_dir(Path(entry.path), child, seen)
                os.rmdir(entry.path)
            else:
                child = Node(self._take_ino(), stat.S_IFMT(st.st_mode))
                self.nodes[child.ino] = child
                os.rename(entry.path, self._path(child.ino))
                child.durable_size = st.st_size
                seen[(st.st_dev, st.st_ino)] = child.ino
            node.entries[name] = child.ino
        node.durable_entries = dict(node.entries)

    def write_out(self) -> None:
        """Rebuild DIR from the durable state (what a power loss leaves), and drop the stash."""
        for node in self.nodes.values():
            if node.kind == stat.S_IFREG:
                self._restore_durable_data(node)
        done: set[int] = set()
        self._write_dir(self.nodes[pyfuse3.ROOT_INODE], self.root, done)
        shutil.rmtree(self.stash)

    def _restore_durable_data(self, node: Node) -> None:
        path = self._path(node.ino)
        fd = os.open(path, os.O_WRONLY)
        try:
            for offset, data in reversed(node.undo):
                os.pwrite(fd, data, offset)
            os.ftruncate(fd, node.durable_size)
        finally:
            os.close(fd)

    def _write_dir(self, node: Node, directory: Path, done: set[int]) -> None:
        done.add(node.ino)
        for name, ino in node.durable_entries.items():
            child = self.nodes[ino]
            target = directory / os.fsdecode(name)
            source = self._path(ino)
            if child.is_dir:
                if ino in done:  # cannot happen with a cross rename committed as one; never loop
                    continue
                os.mkdir(target)
                self._write_dir(child, target, done)
                shutil.copystat(source, target)
                os.chown(target, os.stat(source).st_uid, os.stat(source).st_gid)
            elif child.kind == stat.S_IFREG:
                os.link(source, target)
            elif child.kind == stat.S_IFLNK:
                os.symlink(os.readlink(source), target)
                st = os.lstat(source)
                os.lchown(target, st.st_uid, st.st_gid)
            else:
                st = os.lstat(source)
                os.mknod(target, st.st_mode, st.st_rdev)

    def make_all_durable(self) -> None:
        """What syncfs does: every file's data and every directory's entries become durable."""
        for node in self.nodes.values():
            if node.is_dir:
                node.durable_entries = dict(node.entries)
            elif node.kind == stat.S_IFREG:
                self._make_data_durable(node)
        self.cross_renames.clear()

    # ------------------------------------------------------------------ inodes

    def _take_ino(self) -> int:
        ino = self.next_ino
        self.next_ino += 1
        return ino

    def _path(self, ino: int) -> Path:
        return self.stash / str(ino)

    def _new_node(self, kind: int, mode: int = 0o700) -> Node:
        node = Node(self._take_ino(), kind)
        self.nodes[node.ino] = node
        if kind == stat.S_IFDIR:
            os.mkdir(self._path(node.ino), mode)
        return node

    def _attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self.nodes[ino]
        st = os.lstat(self._path(ino))
        attributes = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks",
                      "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(attributes, field, getattr(st, field))
        attributes.st_ino = ino
        attributes.st_nlink = 2 + sum(self.nodes[i].is_dir for i in node.entries.values()) if node.is_dir \
            else node.links
        attributes.generation = 0
        attributes.entry_timeout = 0
        attributes.attr_timeout = 0
        return attributes

    def _child(self, parent: int, name: bytes) -> Node:
        ino = self.nodes[parent].entries.get(name)
        if ino is None:
            raise OSError(errno.ENOENT, "no such entry")
        return self.nodes[ino]

    def _add_entry(self, parent: int, name: bytes, node: Node) -> None:
        entries = self.nodes[parent].entries
        if name in entries:
            raise OSError(errno.EEXIST, "exists")
        entries[name] = node.ino

    def _own(self, ino: int, ctx: pyfuse3.RequestContext) -> None:
        os.lchown(self._path(ino), ctx.uid, ctx.gid)

    def _save_durable_bytes(self, node: Node, fd: int, offset: int, end: int) -> None:
        """Keep the durable bytes of [offset, end) that are still in the file, before they change."""
        end = min(end, node.durable_size, os.fstat(fd).st_size)
        if offset < end:
            node.undo.append((offset, os.pread(fd, end - offset, offset)))

    def _make_data_durable(self, node: Node) -> None:
        node.durable_size = os.lstat(self._path(node.ino)).st_size
        node.undo.clear()

    def _handle(self, ino: int, fd: int = -1) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (ino, fd)
        return fh

    # ------------------------------------------------------------------ FUSE calls

    @_fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self._child(parent_inode, name).ino)

    async def forget(self, inode_list: Any) -> None:
        """Inodes are kept until the file system stops (a cut may need an unlinked inode's data)."""

    @_fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    @_fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        if fields.update_size:
            node = self.nodes[inode]
            fd = os.open(path, os.O_RDWR)
            try:
                self._save_durable_bytes(node, fd, attr.st_size, node.durable_size)
                os.ftruncate(fd, attr.st_size)
            finally:
                os.close(fd)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.lchown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     follow_symlinks=False)
        return self._attributes(inode)

    @_fuse_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    @_fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        self._child_absent(parent_inode, name)
        node = self._new_node(stat.S_IFMT(mode))
        os.mknod(self._path(node.ino), mode, rdev)
        self._own(node.ino, ctx)
        self._add_entry(parent_inode, name, node)
        return self._attributes(node.ino)

    @_fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self._child_absent(parent_inode, name)
        node = self._new_node(stat.S_IFDIR, stat.S_IMODE(mode))
        os.chmod(self._path(node.ino), stat.S_IMODE(mode))
        self._own(node.ino, ctx)
        self._add_entry(parent_inode, name, node)
        return self._attributes(node.ino)

    @_fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        node = self._child(parent_inode, name)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        del self.nodes[parent_inode].entries[name]
        node.links -= 1

    @_fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        node = self._child(parent_inode, name)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if node.entries:
            raise OSError(errno.ENOTEMPTY, "not empty")
        del self.nodes[parent_inode].entries[name]

    @_fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self._child_absent(parent_inode, name)
        node = self._new_node(stat.S_IFLNK)
        os.symlink(target, self._path(node.ino))
        self._own(node.ino, ctx)
        self._add_entry(parent_inode, name, node)
        return self._attributes(node.ino)

    @_fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        moved = self._child(parent_inode_old, name_old)
        old_entries = self.nodes[parent_inode_old].entries
        new_entries = self.nodes[parent_inode_new].entries
        replaced_ino = new_entries.get(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if replaced_ino is None:
                raise OSError(errno.ENOENT, "nothing to exchange with")
            old_entries[name_old], new_entries[name_new] = replaced_ino, moved.ino
            self._note_cross_rename(parent_inode_new, name_new, parent_inode_old, name_old, replaced_ino)
        else:
            if replaced_ino is not None:
                if flags & pyfuse3.RENAME_NOREPLACE:
                    raise OSError(errno.EEXIST, "exists")
                replaced = self.nodes[replaced_ino]
                if replaced_ino == moved.ino:
                    return
                if replaced.is_dir != moved.is_dir:
                    raise OSError(errno.EISDIR if replaced.is_dir else errno.ENOTDIR, "kind differs")
                if replaced.is_dir and replaced.entries:
                    raise OSError(errno.ENOTEMPTY, "not empty")
                replaced.links -= 1
            del old_entries[name_old]
            new_entries[name_new] = moved.ino
        self._note_cross_rename(parent_inode_old, name_old, parent_inode_new, name_new, moved.ino)

    def _note_cross_rename(self, source: int, source_name: bytes, target: int, target_name: bytes,
                           ino: int) -> None:
        if source != target:
            self.cross_renames.append(CrossRename(source, source_name, target, target_name, ino))

    @_fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        node = self.nodes[inode]
        self._add_entry(new_parent_inode, new_name, node)
        node.links += 1
        return self._attributes(inode)

    @_fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.nodes[inode]
        fd = os.open(self._path(inode), os.O_RDWR)
        if flags & os.O_TRUNC:
            self._save_durable_bytes(node, fd, 0, node.durable_size)
            os.ftruncate(fd, 0)
        return pyfuse3.FileInfo(fh=self._handle(inode, fd))

    @_fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._child_absent(parent_inode, name)
        node = self._new_node(stat.S_IFREG)
        fd = os.open(self._path(node.ino), os.O_RDWR | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode))
        os.fchmod(fd, stat.S_IMODE(mode))
        self._own(node.ino, ctx)
        self._add_entry(parent_inode, name, node)
        return pyfuse3.FileInfo(fh=self._handle(node.ino, fd)), self._attributes(node.ino)

    def _child_absent(self, parent: int, name: bytes) -> None:
        if name in self.nodes[parent].entries:
            raise OSError(errno.EEXIST, "exists")

    @_fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.handles[fh][1], size, off)

    @_fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        ino, fd = self.handles[fh]
        self._save_durable_bytes(self.nodes[ino], fd, off, off + len(buf))
        return os.pwrite(fd, buf, off)

    async def flush(self, fh: int) -> None:
        """close(2) makes nothing durable."""

    async def release(self, fh: int) -> None:
        _, fd = self.handles.pop(fh)
        os.close(fd)

    @_fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        self._make_data_durable(self.nodes[self.handles[fh][0]])

    @_fuse_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        fh = self._handle(inode)
        self.listings[fh] = list(self.nodes[inode].entries.items())
        return fh

    @_fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.listings[fh]
        for index in range(start_id, len(listing)):
            name, ino = listing[index]
            if ino not in self.nodes:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attributes(ino), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh)
        self.listings.pop(fh)

    @_fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        ino = self.handles[fh][0]
        node = self.nodes[ino]
        node.durable_entries = dict(node.entries)
        for rename in list(self.cross_renames):
            if ino == rename.source:
                target = self.nodes[rename.target]
                target.durable_entries[rename.target_name] = rename.ino
            elif ino == rename.target:
                source = self.nodes[rename.source]
                if source.durable_entries.get(rename.source_name) == rename.ino:
                    del source.durable_entries[rename.source_name]
            else:
                continue
            self.cross_renames.remove(rename)

    @_fuse_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.root)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
                      "f_favail", "f_namemax"):
            setattr(data, field, getattr(st, field))
        return data

    @_fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        if name == SYNCFS_XATTR:
            self.make_all_durable()
            return
        os.setxattr(self._path(inode), name, value, follow_symlinks=False)

    @_fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_fuse_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(name) for name in os.listxattr(self._path(inode), follow_symlinks=False)]

    @_fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        os.removexattr(self._path(inode), name, follow_symlinks=False)


async def serve(fs: PowerCutFS, mountpoint: Path) -> None:
    """Serve until SIGTERM; SIGUSR1 cuts the power first (module doc)."""
    options = set(pyfuse3.default_options) | {"fsname=powercut", "allow_other"}
    pyfuse3.init(fs, str(mountpoint), options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            print("ready", flush=True)
            with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if signum == signal.SIGUSR1 and not fs.power_off:
                        fs.power_off = True
                        fs.write_out()
                        print("cut", flush=True)
                    elif signum != signal.SIGUSR1:
                        break
            if not fs.power_off:
                fs.power_off = True
                fs.make_all_durable()
                fs.write_out()
            pyfuse3.terminate()
    finally:
        pyfuse3.close(unmount=True)


def main() -> None:
    directory, mountpoint = Path(sys.argv[1]), Path(sys.argv[2])
    os.umask(0)
    fs = PowerCutFS(directory)
    fs.import_tree()
    trio.run(serve, fs, mountpoint)


if __name__ == "__main__":
    main()
