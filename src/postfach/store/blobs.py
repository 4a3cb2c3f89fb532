"""Content-addressed message files: ``<root>/ab/cd/<sha256hex>``.

A blob file is written to ``<root>/tmp/``, renamed into place and made durable (file and folder)
before any metadata points at it (ARCHITECTURE.md invariant 1). The same bytes are stored once,
whoever sends or copies them; the metadata keeps the reference count.

Two ways to make files durable:

* **batch sync** (Linux): writers only write and rename; the metadata writer calls
  :meth:`FileBlobStore.barrier` once per group commit, a ``syncfs(2)`` of the blob filesystem that
  flushes every file and folder written so far (PostgreSQL's ``recovery_init_sync_method=syncfs``
  relies on the same call). One barrier per batch instead of two fsyncs per message: on a
  loaded ext4 this is the difference between ~1,000 and several thousand messages/s.
* **per-file sync** (elsewhere, or ``batch_sync=False``): fsync of the file, rename, fsync of the
  folder, in the writer's own thread.

All functions here are blocking: the SQLite store calls them from worker threads.

*Pins* close the one race of a shared file: a writer that found (or wrote) a file and is about to
commit a reference to it pins the hash; the deleter removes a file only under the pin lock and only
when nobody pins it. A writer therefore either sees the file gone (and writes it again) or keeps it.

Pins hold across processes too (``serve --workers N``, the CLI beside the server): with a pin file
(:meth:`FileBlobStore.prepare`), every pinned hash also holds a shared POSIX record lock on one
byte of that file (the hash's slot of ``PIN_SLOTS``), and the deleter removes a file only while it
holds the exclusive lock of the slot. Record locks belong to the process and die with it; two
hashes that share a slot only keep a dead file a little longer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from postfach.errors import NotFound, StorageFull, StoreError
from postfach.store.base import WIRE_CRLF_ONLY, WIRE_NO_DOT_LINES

#: errno values that mean "try again later" rather than "the store is broken".
TEMPORARY_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, errno.EIO, getattr(errno, "EDQUOT", None), errno.EAGAIN) if e is not None
)

_HEX = frozenset("0123456789abcdef")


# Indirection for fault-injection tests (ENOSPC/EIO on write).
_os_write = os.write

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = os.uname().release.split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def _load_syncfs() -> Callable[[int], int] | None:
    # Linux reports writeback errors (EIO) from syncfs only since 5.8; older kernels would hide a
    # failed write, so they get per-file fsync.
    if not sys.platform.startswith("linux") or not _kernel_at_least(5, 8):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def os_error(exc: OSError, what: str) -> StoreError:
    """Map an OSError to the store's exception tree (ENOSPC/EIO: temporary)."""
    if exc.errno in TEMPORARY_ERRNOS:
        return StorageFull(f"{what}: {os.strerror(exc.errno or 0)}")
    if exc.errno == errno.ENOENT:
        return NotFound(f"{what}: missing")
    return StoreError(f"{what}: {exc.strerror or exc}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wire_flags(data: bytes) -> int:
    """The ``WIRE_*`` bits (store/base.py) of a message: does every LF follow a CR, and does no
    line start with "."? Three C-speed scans, once at ingest, instead of at every POP3 RETR."""
    flags = 0
    if data.count(b"\n") == data.count(b"\r\n"):
        flags |= WIRE_CRLF_ONLY
    if not data.startswith(b".") and b"\n." not in data:
        flags |= WIRE_NO_DOT_LINES
    return flags


def is_blob_name(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX


#: Slots of the pin file (bytes it locks): a hash pins ``int(hash[:8], 16) % PIN_SLOTS``.
PIN_SLOTS = 1 << 20


def _slot(blob_id: str) -> int:
    try:
        return int(blob_id[:8], 16) % PIN_SLOTS
    except ValueError:
        return 0


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore(Protocol):
    """Where message bytes live; the metadata store keeps references and counts."""

    def path_for(self, blob_id: str) -> Path: ...
    def pin(self, blob_id: str) -> None: ...
    def unpin(self, blob_id: str) -> None: ...
    def ensure(self, blob_id: str, data: bytes) -> bool: ...
    def read(self, blob_id: str) -> bytes: ...
    def remove_if_unpinned(self, blob_id: str) -> bool: ...


class FileBlobStore:
    """The filesystem implementation of :class:`BlobStore`."""

    def __init__(self, root: Path, *, batch_sync: bool | None = None) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        # Cross-process pins: the pin file and how many local pins hold each slot's shared lock.
        self._pin_fd: int | None = None
        self._slots: dict[int, int] = {}
        if batch_sync and _syncfs is None:
            raise StoreError("batch sync needs syncfs(2), which this platform lacks")
        self.batch_sync = (_syncfs is not None) if batch_sync is None else batch_sync
        self._root_fd: int | None = None
        self._root_s = os.fspath(root)
        # Folders known to exist (``ab`` and ``ab/cd``): folders are never removed while the store
        # is open, so a hit saves two stat calls per blob. A folder removed behind our back shows
        # up as ENOENT at create time, and is then made again.
        self._dirs: set[str] = set()
        # Temp-file names: unique per process (pid) and per write (counter); no random source.
        self._tmp_tag = f"{os.getpid():x}"
        self._seq = itertools.count()

    # --- setup ------------------------------------------------------------------------------------
    def prepare(self, *, clean_tmp: bool, pin_file: Path | None = None) -> None:
        """Create the folders; with ``clean_tmp`` (only when no other process has the store open)
        empty ``tmp/`` (a spare folder for tools; blob temp files live beside their final names
        and are removed by the store's crash recovery)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(exist_ok=True)
            if clean_tmp:
                for p in self.tmp.iterdir():
                    p.unlink(missing_ok=True)
            if self._root_fd is None:
                self._root_fd = os.open(self.root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            if pin_file is not None and self._pin_fd is None:
                self._pin_fd = os.open(pin_file, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise os_error(exc, f"blob folder {self.root}") from exc

    def close(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
        if self._pin_fd is not None:
            os.close(self._pin_fd)  # releases every record lock of this process on the file
            self._pin_fd = None
            self._slots.clear()

    def barrier(self) -> None:
        """Make every blob file written (and renamed) so far durable. A no-op with per-file sync.
        Raises OSError (the caller maps it)."""
        if not self.batch_sync:
            return
        assert _syncfs is not None and self._root_fd is not None
        if _syncfs(self._root_fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def path_for(self, blob_id: str) -> Path:
        return self.root / blob_id[0:2] / blob_id[2:4] / blob_id

    @staticmethod
    def is_temp(name: str) -> bool:
        return name.startswith(".") and name.endswith(".tmp")

    def iter_files(self) -> Iterator[tuple[str, Path]]:
        """Every file below the blob folders, temp files (``is_temp``) included."""
        for d1 in sorted(self.root.iterdir()):
            if d1.name == "tmp" or not d1.is_dir():
                continue
            for d2 in sorted(d1.iterdir()):
                if not d2.is_dir():
                    yield d2.name, d2
                    continue
                for f in sorted(d2.iterdir()):
                    yield f.name, f

    # --- pins ---------------------------------------------------------------------------------------
    def pin(self, blob_id: str) -> None:
        with self._lock:
            self._pins[blob_id] = self._pins.get(blob_id, 0) + 1
            if self._pin_fd is not None:
                slot = _slot(blob_id)
                held = self._slots.get(slot, 0)
                if held == 0:
                    # Waits only while another process removes a file of this slot (one unlink).
                    fcntl.lockf(self._pin_fd, fcntl.LOCK_SH, 1, slot)
                self._slots[slot] = held + 1

    def unpin(self, blob_id: str) -> None:
        with self._lock:
            n = self._pins.get(blob_id, 0) - 1
            if n <= 0:
                if self._pins.pop(blob_id, None) is None:
                    return
            else:
                self._pins[blob_id] = n
            if self._pin_fd is not None:
                slot = _slot(blob_id)
                held = self._slots.get(slot, 0) - 1
                if held <= 0:
                    self._slots.pop(slot, None)
                    fcntl.lockf(self._pin_fd, fcntl.LOCK_UN, 1, slot)
                else:
                    self._slots[slot] = held

    def pinned(self, blob_id: str) -> bool:
        with self._lock:
            return blob_id in self._pins

    # --- writing ------------------------------------------------------------------------------------
    def ensure(self, blob_id: str, data: bytes) -> bool:
        """Write the file for ``data``; True when it was written now, False when it existed.

        With per-file sync it is durable on return; with batch sync after the next
        :meth:`barrier`. The caller holds a pin on ``blob_id``. Temp files are removed on any failure, so a failed
        write leaves nothing half-present. ENOSPC/EIO become StorageFull.

        Plain ``os`` calls on string paths (no pathlib objects): this runs once per message, and
        the kernel's file creation should be all that it costs."""
        d = f"{self._root_s}/{blob_id[0:2]}/{blob_id[2:4]}"
        final = f"{d}/{blob_id}"
        sync = not self.batch_sync
        try:
            os.stat(final)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise os_error(exc, "blob file") from exc
        else:
            if sync:
                # It may have been renamed into place by a writer that has not fsynced the folder
                # yet; an fsync of a clean folder is cheap, so make sure instead of guessing.
                try:
                    fsync_dir(d)
                except OSError as exc:
                    raise os_error(exc, "blob folder fsync") from exc
            return False  # with batch sync the next barrier covers it, whoever renamed it
        # The temp file lives beside its final name (".<id>.<tag>.tmp"): the rename stays in
        # one folder, and concurrent writers do not contend for one shared temp folder.
        tmp = ""
        try:
            new_dirs = self._make_dirs(d, blob_id) if d not in self._dirs else ()
            fd = -1
            while fd < 0:
                tmp = f"{d}/.{blob_id}.{self._tmp_tag}-{next(self._seq)}.tmp"
                try:
                    fd = os.open(tmp, _CREATE_FLAGS, 0o640)
                except FileExistsError:
                    continue  # a leftover of a crashed process that had our pid: next name
                except FileNotFoundError:
                    if d not in self._dirs:
                        raise
                    self._dirs.discard(d)  # removed behind our back: make it again, once
                    new_dirs = self._make_dirs(d, blob_id)
            try:
                n = _os_write(fd, data)  # one call for all but huge messages
                if n < len(data):
                    view = memoryview(data)[n:]
                    while view:
                        n = _os_write(fd, view)
                        view = view[n:]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            if sync:
                fsync_dir(d)
                for nd in new_dirs:
                    fsync_dir(nd)
            if new_dirs:  # durable now (or covered by the next barrier): skip the checks next time
                self._dirs.add(f"{self._root_s}/{blob_id[0:2]}")
                self._dirs.add(d)
        except OSError as exc:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise os_error(exc, "writing message file") from exc
        return True

    def _make_dirs(self, d: str, blob_id: str) -> tuple[str, ...]:
        """Create ``ab/`` and ``ab/cd/`` as needed; returns the folders whose entries may have
        changed (to fsync in per-file sync mode) — also when another writer made the folder a
        moment ago and may not have made it durable yet. The caller adds the folders to the
        known ones only once they are durable."""
        top = f"{self._root_s}/{blob_id[0:2]}"
        changed: list[str] = []
        if top not in self._dirs:
            with contextlib.suppress(FileExistsError):
                os.mkdir(top)
            changed.append(self._root_s)
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        except FileNotFoundError:  # ``ab/`` itself went behind our back
            self._dirs.discard(top)
            with contextlib.suppress(FileExistsError):
                os.mkdir(top)
            with contextlib.suppress(FileExistsError):
                os.mkdir(d)
            changed.insert(0, self._root_s)
        changed.append(top)
        return tuple(changed)

    # --- reading ------------------------------------------------------------------------------------
    def read(self, blob_id: str) -> bytes:
        if not is_blob_name(blob_id):
            raise NotFound("no such message data")
        try:
            return self.path_for(blob_id).read_bytes()
        except OSError as exc:
            raise os_error(exc, "reading message file") from exc

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        if not is_blob_name(blob_id):
            raise NotFound("no such message data")
        try:
            with self.path_for(blob_id).open("rb") as f:
                f.seek(offset)
                return f.read(length)
        except OSError as exc:
            raise os_error(exc, "reading message file") from exc

    def size(self, blob_id: str) -> int:
        if not is_blob_name(blob_id):
            raise NotFound("no such message data")
        try:
            return self.path_for(blob_id).stat().st_size
        except OSError as exc:
            raise os_error(exc, "reading message file") from exc

    # --- removal --------------------------------------------------------------------------------------
    def remove_if_unpinned(self, blob_id: str) -> bool:
        """Remove the file unless a writer pins it. The caller checked that no row refers to it."""
        with self._lock:
            if blob_id in self._pins:
                return False
            slot = _slot(blob_id)
            if self._pin_fd is not None:
                try:
                    fcntl.lockf(self._pin_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
                except OSError:
                    return False  # pinned by another process (or a neighbour in the slot): keep it
            try:
                self.path_for(blob_id).unlink(missing_ok=True)
            except OSError:
                return False  # left as an orphan; check() reports it, recovery removes it
            finally:
                if self._pin_fd is not None:
                    # Back to what this process holds: shared if a local pin shares the slot.
                    mode = fcntl.LOCK_SH if self._slots.get(slot) else fcntl.LOCK_UN
                    fcntl.lockf(self._pin_fd, mode, 1, slot)
            return True
