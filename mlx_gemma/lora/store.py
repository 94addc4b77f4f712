"""Known adapters and the resident ones: an LRU of at most `max_resident` in the model.

Contract: `add(name, path)` reads and validates the adapter first (an `AdapterError` leaves
everything as it was), then makes it resident, or, when every resident adapter is in use,
leaves it known to be loaded on demand. `acquire(name)` returns the adapter's slot for a
request, loading it from its path if it is not resident; `release(name)` ends that use.
When an adapter needs room, the least recently used adapter that no request is using is
evicted (it stays known and reloads on demand); if every resident adapter is in use,
`acquire` raises `AdapterBusyError` naming the limit and how to raise it (the engine keeps
such a request waiting until a running one releases its adapter).
`remove(name)` forgets an adapter; `retire(name)` does it now, or, while requests use the adapter,
when the last of them releases it (no new request acquires it meanwhile, and `names()` leaves it
out): a re-uploaded or deleted fine-tune's old version never stays loaded.
Switching between resident adapters copies nothing: each request just carries a slot.

`FinetuneStore(data_dir)` keeps fine-tunes on local disk, as Workers AI's fine-tunes API does:
a row per fine-tune in `<data_dir>/finetunes.sqlite3` (table `finetunes`, unique names) and its
PEFT files (`ASSET_NAMES`) in `<data_dir>/finetunes/<id>/`; uploads stream into `<data_dir>/tmp/`.
- `create` makes the directory, then inserts the row; `delete` removes the row, then the
  directory; so a crash leaves at most an orphan directory, never a row without its directory.
- `add_asset` streams the upload (refused over `max_file_bytes`), validates it together with the
  fine-tune's other file (the `validate` callable, else `check_adapter_files` with no base), then
  fsyncs it and `os.replace`s it into place: readers see the old file or the new one, never half.
  Any exception, including one from the upload's `read()`, leaves the store as it was.
- Opening a store recovers from a killed process: it empties `tmp/`, deletes directories that have
  no row and files that are not assets. It never deletes a row. Only the process that owns the
  data directory recovers: the first to hold the advisory lock on `<data_dir>/owner.lock` while it
  runs (a server). Another process opening the same store meanwhile (`mlx-gemma finetune ...`
  beside a running server) leaves `tmp/` and the directories alone, so uploads in progress
  survive. `check()` lists what is inconsistent (empty when all is well); an upload in progress
  shows there as a `tmp/` entry.
- Symbolic links are never followed: a linked asset or fine-tune directory counts as absent (an
  upload to a linked directory is refused) and opening the store removes the link, never its
  target; a linked `tmp/` is replaced by a real directory; a linked `finetunes/` is refused.
Every refusal is a `FinetuneError` (a ValueError) whose message names the bad value and the fix.
Names are 1 to 128 characters among letters, digits, `-`, `_` and `.` (not first), unique, not
shaped like an id (lookups try ids first), and not one of `RESERVED_NAMES` (`public`:
`GET finetunes/public` is the public listing).
`is_disk_full(exc)` tells a full disk (or quota) apart from other errors; the store is unchanged then.
Threads within a process may share the store; processes may share it too (SQLite and `os.replace`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # no advisory file locks on this platform
    fcntl = None

import mlx.nn as nn

from . import layers
from .adapters import (SHAPE_MISMATCH, Adapter, AdapterError, AdapterLimits, BaseInfo, check_adapter_files,
                       read_adapter)


class AdapterBusyError(RuntimeError):
    """Every resident adapter is in use and none can be evicted to make room."""


class AdapterRegistry:
    def __init__(self, model: nn.Module, family: str, max_resident: int = 8,
                 limits: AdapterLimits = AdapterLimits()):
        self.model = model
        self.family = family
        self.max_resident = max_resident
        self.limits = limits
        self._paths: dict[str, Path] = {}
        self._resident: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()
        self._in_use: Counter[str] = Counter()
        self._retiring: set[str] = set()  # removed when their last request releases them
        self._lock = threading.RLock()

    def base_info(self) -> BaseInfo:
        return BaseInfo(self.family, layers.linear_dims(self.model))

    def read(self, name: str, path: str | Path) -> Adapter:
        return read_adapter(path, self.base_info(), name=name, limits=self.limits)

    def add(self, name: str, path: str | Path) -> Adapter:
        _check_name(name)
        adapter = self.read(name, path)  # validate before touching anything
        with self._lock:
            if self._in_use[name]:
                raise AdapterBusyError(f"adapter {name!r} is in use by a running request: replace it when it finishes")
            if name in self._resident:
                self._evict(name)
            self._paths[name] = Path(path)
            if self._has_room():  # else the first request that needs it loads it, once a slot is free
                self._make_room()
                self._install(adapter)
        return adapter

    def _has_room(self) -> bool:
        return len(self._resident) < self.max_resident or any(not self._in_use[n] for n in self._resident)

    def _install(self, adapter: Adapter) -> int:
        used = {slot for _, slot in self._resident.values()}
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        layers.install(self.model, adapter, slot)
        self._resident[adapter.name] = (adapter, slot)
        return slot

    def _evict(self, name: str) -> None:
        _, slot = self._resident.pop(name)
        layers.uninstall(self.model, slot)

    def _make_room(self) -> None:
        while len(self._resident) >= self.max_resident:
            idle = [n for n in self._resident if not self._in_use[n]]
            if not idle:
                raise AdapterBusyError(f"all {self.max_resident} resident adapters are in use: retry when a "
                                       "request finishes, or raise the limit (--max-resident-adapters, "
                                       "max_resident_adapters= in Python)")
            self._evict(idle[0])  # OrderedDict order: least recently used first

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._paths:
                raise KeyError(name)
            if self._in_use[name]:
                raise AdapterBusyError(f"adapter {name!r} is in use by a running request: remove it when it finishes")
            if name in self._resident:
                self._evict(name)
            del self._paths[name]
            self._retiring.discard(name)

    def retire(self, name: str) -> None:
        """Remove the adapter now, or when the last request using it releases it."""
        with self._lock:
            if self._in_use[name]:
                self._retiring.add(name)
            elif name in self._paths:
                self.remove(name)

    def acquire(self, name: str) -> int:
        with self._lock:
            if name not in self._paths or name in self._retiring:
                raise KeyError(name)
            if name not in self._resident:
                self._make_room()
                self._install(self.read(name, self._paths[name]))
            self._resident.move_to_end(name)
            self._in_use[name] += 1
            return self._resident[name][1]

    def release(self, name: str) -> None:
        with self._lock:
            self._in_use[name] -= 1
            if not self._in_use[name] and name in self._retiring:
                self.remove(name)

    @property
    def resident_count(self) -> int:
        """How many adapters are resident; read without the lock, which a load holds while it reads files."""
        return len(self._resident)

    def get(self, name: str) -> Adapter | None:
        entry = self._resident.get(name)
        return entry[0] if entry else None

    def names(self) -> list[str]:
        """The adapters requests may name (not those retiring). Read from any thread: copies are taken
        first (atomic under the GIL), since the engine thread adds and removes adapters meanwhile."""
        paths, retiring = list(self._paths), set(self._retiring)
        return [name for name in paths if name not in retiring]

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = []
            for name, path in self._paths.items():
                adapter = self.get(name)
                info = adapter.describe() if adapter else {"name": name, "path": str(path)}
                rows.append({**info, "resident": adapter is not None, "in_use": self._in_use[name]})
            return rows


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"adapter name {name!r} must be a non-empty string")


class FinetuneError(ValueError):
    """A fine-tune request is refused; the message names the bad value and the fix."""


class FinetuneNotFound(FinetuneError):
    """No fine-tune has that id or name."""


class FinetuneExists(FinetuneError):
    """The name is taken: names are unique."""


class AssetError(FinetuneError):
    """An upload is refused: wrong file_name, invalid content, or an adapter the validator refused."""


class AssetTooLarge(AssetError):
    """An upload is bigger than the store's limit."""


ASSET_NAMES = ("adapter_config.json", "adapter_model.safetensors")
MAX_NAME_CHARS = 128
RESERVED_NAMES = frozenset({"public"})  # a route of its own under finetunes/
MAX_DESCRIPTION_CHARS = 1024
UPLOAD_CHUNK_BYTES = 1024 * 1024
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_ID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_COLUMNS = ("id", "name", "model", "description", "public", "created_at", "modified_at")
_SCHEMA = """CREATE TABLE IF NOT EXISTS finetunes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    model TEXT NOT NULL,
    description TEXT NOT NULL,
    public INTEGER NOT NULL CHECK (public IN (0, 1)),
    created_at TEXT NOT NULL,
    modified_at TEXT NOT NULL)"""


@dataclass(frozen=True)
class Finetune:
    id: str  # uuid4
    name: str
    model: str  # the base model name given at creation, e.g. "@cf/google/gemma-2b-it-lora"
    description: str
    public: bool
    created_at: str  # ISO 8601 UTC ending in "Z"
    modified_at: str
    path: Path  # <data_dir>/finetunes/<id>
    files: tuple[str, ...]  # the ASSET_NAMES present, in ASSET_NAMES order

    @property
    def complete(self) -> bool:
        return not self.missing()

    def missing(self) -> list[str]:
        return [name for name in ASSET_NAMES if name not in self.files]

    def to_dict(self) -> dict[str, Any]:
        return {column: getattr(self, column) for column in _COLUMNS}


OWNER_LOCK = "owner.lock"
_OWNED: dict[Path, int] = {}  # data directories this process owns: their lock files' descriptors, held open
_OWNED_LOCK = threading.Lock()


def _own(data_dir: Path) -> bool:
    """Whether this process owns `data_dir`: it holds (or now takes) the exclusive lock on its lock file,
    which it keeps until it exits. Where file locks do not exist, every process counts as the owner."""
    if fcntl is None:
        return True
    key = data_dir.resolve()
    with _OWNED_LOCK:
        if key not in _OWNED:
            lock_file = key / OWNER_LOCK
            if lock_file.is_symlink():
                lock_file.unlink()  # never lock (or create) a file elsewhere through a link
            descriptor = os.open(lock_file, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another process owns it
                os.close(descriptor)
                return False
            _OWNED[key] = descriptor
        return True


class FinetuneStore:
    def __init__(self, data_dir: str | Path, validate: Callable[[Path], None] | None = None,
                 max_file_bytes: int = 300 * 1024 * 1024):
        self.data_dir = Path(data_dir).expanduser()
        self.db_path = self.data_dir / "finetunes.sqlite3"
        self.finetunes_dir = self.data_dir / "finetunes"
        self.tmp_dir = self.data_dir / "tmp"
        self.max_file_bytes = max_file_bytes
        limits = AdapterLimits(max_file_bytes=max_file_bytes)
        self._validate = validate or (lambda staging: check_adapter_files(staging, None, limits))
        self._lock = threading.Lock()
        if self.finetunes_dir.is_symlink():
            raise FinetuneError(f"{self.finetunes_dir} is a symbolic link: the store deletes what it does not "
                                "know in that directory, so it must be a real one (link the data directory instead)")
        if self.tmp_dir.is_symlink():
            self.tmp_dir.unlink()  # scratch space: emptied on open, never through a link
        for directory in (self.data_dir, self.finetunes_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        try:
            with self._db() as conn:
                conn.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise FinetuneError(f"{self.db_path} cannot be used as the fine-tune database ({exc}): move it aside "
                                "(the fine-tunes' files under finetunes/ stay), or use another data directory") from exc
        if _own(self.data_dir):
            self._recover()

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection for one operation: one transaction, committed or rolled back, then closed."""
        conn = sqlite3.connect(self.db_path, timeout=30)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def _recover(self) -> None:
        """Undo what a killed process left half done; rows are never deleted."""
        with self._lock:
            for entry in self.tmp_dir.iterdir():
                _remove(entry)
            ids = self._ids()
            for entry in self.finetunes_dir.iterdir():
                if not _is_finetune_dir(entry, ids):
                    _remove(entry)
                    continue
                for stray in entry.iterdir():
                    if not _is_asset(stray):
                        _remove(stray)

    def _ids(self) -> set[str]:
        with self._db() as conn:
            return {row[0] for row in conn.execute("SELECT id FROM finetunes")}

    def create(self, model: str, name: str, description: str = "", public: bool = False) -> Finetune:
        _check_fields(model, name, description, public)
        finetune_id, now = str(uuid.uuid4()), _now()
        directory = self.finetunes_dir / finetune_id
        with self._lock:
            directory.mkdir()  # first: a crash before the insert leaves only an empty orphan directory
            try:
                with self._db() as conn:
                    conn.execute(f"INSERT INTO finetunes ({', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (finetune_id, name, model, description, int(public), now, now))
            except BaseException as exc:
                directory.rmdir()
                if isinstance(exc, sqlite3.IntegrityError) and _taken(exc):
                    raise FinetuneExists(f"a fine-tune named {name!r} already exists: pick another name, "
                                         "delete that one first (mlx-gemma finetune delete NAME), or upload new "
                                         "files to it (POST .../ai/finetunes/NAME/finetune-assets)") from exc
                raise
        return self.get(finetune_id)

    def get(self, id_or_name: str) -> Finetune:
        """By id first, then by name."""
        row = None
        if isinstance(id_or_name, str):
            with self._db() as conn:
                for column in ("id", "name"):
                    row = row or conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM finetunes WHERE {column} = ?",
                                              (id_or_name,)).fetchone()
        if row is None:
            raise FinetuneNotFound(f"no fine-tune with id or name {id_or_name!r}: "
                                   "create it first, or use an id or name from the listing")
        return self._finetune(row)

    def list(self, public_only: bool = False) -> list[Finetune]:
        where = " WHERE public = 1" if public_only else ""
        with self._db() as conn:
            rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM finetunes{where} "
                                "ORDER BY created_at, rowid").fetchall()
        return [self._finetune(row) for row in rows]

    def _finetune(self, row: tuple) -> Finetune:
        values = dict(zip(_COLUMNS, row))
        path = self.finetunes_dir / values["id"]
        files = () if path.is_symlink() else tuple(name for name in ASSET_NAMES if _is_asset(path / name))
        return Finetune(**{**values, "public": bool(values["public"])}, path=path, files=files)

    def add_asset(self, id_or_name: str, file_name: str, source: BinaryIO | bytes) -> Finetune:
        if file_name not in ASSET_NAMES:
            raise AssetError(f"file_name {file_name!r} is not an asset of a fine-tune: "
                             f"upload {ASSET_NAMES[0]!r} or {ASSET_NAMES[1]!r}")
        finetune_id = self.get(id_or_name).id  # refuse an unknown fine-tune before reading the upload
        upload = self.tmp_dir / f"{uuid.uuid4()}.upload"
        try:
            self._receive(source, upload, file_name)  # outside the lock: a slow client blocks no one
            with self._lock:
                finetune = self.get(finetune_id)
                self._check_asset(finetune, file_name, upload)
                self._install(finetune, file_name, upload)
        finally:
            upload.unlink(missing_ok=True)
        return self.get(finetune_id)

    def _receive(self, source: BinaryIO | bytes, upload: Path, file_name: str) -> None:
        """Stream `source` into `upload`, fsynced; refuse it when empty or over the limit."""
        size = 0
        with upload.open("wb") as out:
            for chunk in _chunks(source):
                size += len(chunk)
                if size > self.max_file_bytes:
                    raise AssetTooLarge(f"{file_name} is over the limit of {self.max_file_bytes} bytes: "
                                        "upload a smaller adapter (a lower rank), or raise the limit "
                                        "(mlx-gemma serve --max-upload-mb, max_file_bytes= in Python)")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size == 0:
            raise AssetError(f"{file_name} is empty: upload the file's contents")

    def _check_asset(self, finetune: Finetune, file_name: str, upload: Path) -> None:
        """Validate the upload together with the fine-tune's other asset, if it has one; when only the
        pair is wrong (the upload is valid alone), say so and how to change both files."""
        others = {other: finetune.path / other for other in finetune.files if other != file_name}
        try:
            self._validate_staged({file_name: upload, **others})
        except AdapterError as exc:
            refused = f"{file_name} for fine-tune {finetune.name!r} refused: {exc.summary}"
            mismatched = any(SHAPE_MISMATCH in problem for problem in exc.problems)  # config r vs weights
            if others and mismatched and self._valid({file_name: upload}):
                if self._valid({file_name: upload, **others}, self._files_alone):
                    raise AssetError(f"{refused}. The files agree with each other: the adapter was trained for "
                                     "another base model than the one this server runs") from exc
                raise AssetError(f"{refused}. The file is valid alone but does not match the fine-tune's "
                                 f"{' and '.join(others)}: to change the rank or the target modules, create a "
                                 "new fine-tune with both new files (or delete this one first)") from exc
            raise AssetError(refused) from exc

    def _files_alone(self, staging: Path) -> None:
        """The checks that need no base model: each file, and the pair's ranks (whatever their size:
        the rank limit is the validator's)."""
        check_adapter_files(staging, None, AdapterLimits(max_file_bytes=self.max_file_bytes, max_rank=2**31))

    def _valid(self, files: dict[str, Path], validate: Callable[[Path], None] | None = None) -> bool:
        try:
            self._validate_staged(files, validate)
        except AdapterError:
            return False
        return True

    def _validate_staged(self, files: dict[str, Path], validate: Callable[[Path], None] | None = None) -> None:
        """Run the validator (default: the store's) on a staging directory holding these files (linked, or copied)."""
        staging = self.tmp_dir / f"{uuid.uuid4()}.staging"
        try:
            staging.mkdir()
            for name, source in files.items():
                _link_or_copy(source, staging / name)
            (validate or self._validate)(staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _install(self, finetune: Finetune, file_name: str, upload: Path) -> None:
        """Swap the upload in and bump modified_at together: if either fails, the old file comes back."""
        if finetune.path.is_symlink():
            raise AssetError(f"fine-tune {finetune.name!r} refused {file_name}: its directory "
                             f"finetunes/{finetune.id} is a symbolic link, which the store does not follow; "
                             "remove the link (restarting the server does) and upload again")
        target = finetune.path / file_name
        backup = self.tmp_dir / f"{uuid.uuid4()}.previous"
        had_previous = target.is_file()
        if had_previous:
            _link_or_copy(target, backup)
        finetune.path.mkdir(exist_ok=True)  # repairs a fine-tune whose directory went missing
        swapped = False
        try:
            with self._db() as conn:
                conn.execute("UPDATE finetunes SET modified_at = ? WHERE id = ?",
                             (_now_after(finetune.modified_at), finetune.id))
                os.replace(upload, target)
                swapped = True
                _fsync_dir(finetune.path)
        except BaseException:
            if swapped and had_previous:
                os.replace(backup, target)
            elif swapped:
                target.unlink(missing_ok=True)
            raise
        finally:
            backup.unlink(missing_ok=True)

    def delete(self, id_or_name: str) -> Finetune:
        with self._lock:
            finetune = self.get(id_or_name)
            with self._db() as conn:
                conn.execute("DELETE FROM finetunes WHERE id = ?", (finetune.id,))
            _remove(finetune.path, ignore_errors=True)  # after the row: a crash leaves an orphan dir
        return finetune

    def check(self) -> list[str]:
        """Every inconsistency between the database, the fine-tune directories and tmp/; empty if none."""
        with self._lock:
            with self._db() as conn:
                integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
            problems = [f"database: {line}" for line in integrity if line != "ok"]
            ids = self._ids()
            problems += [f"fine-tune {i} has no directory {self.finetunes_dir / i}"
                         for i in sorted(ids) if not (self.finetunes_dir / i).is_dir()]
            for entry in sorted(self.finetunes_dir.iterdir()):
                if not _is_finetune_dir(entry, ids):
                    kind = "is a symbolic link" if entry.is_symlink() else "belongs to no fine-tune"
                    problems.append(f"{entry} {kind}")
                    continue
                problems += [f"{stray} is not an asset ({', '.join(ASSET_NAMES)})"
                             for stray in sorted(entry.iterdir()) if not _is_asset(stray)]
            problems += [f"{entry} is left over in tmp/" for entry in sorted(self.tmp_dir.iterdir())]
            return problems


def _check_fields(model: Any, name: Any, description: Any, public: Any) -> None:
    if not (isinstance(name, str) and len(name) <= MAX_NAME_CHARS and _NAME_RE.fullmatch(name)):
        raise FinetuneError(f"fine-tune name {name!r} is refused: use 1 to {MAX_NAME_CHARS} characters among "
                            "letters, digits, '-', '_' and '.', not starting with '.'")
    if _ID_RE.fullmatch(name):
        raise FinetuneError(f"fine-tune name {name!r} is refused: it has the form of a fine-tune id, and lookups "
                            "try ids before names, so it could hide another fine-tune; pick a name that is not a UUID")
    if name in RESERVED_NAMES:
        raise FinetuneError(f"fine-tune name {name!r} is reserved: GET .../ai/finetunes/{name} lists the public "
                            "fine-tunes, so this one could not be fetched by name; pick another name")
    if not isinstance(model, str) or not model.strip():
        raise FinetuneError(f"model {model!r} is refused: give the base model's name, "
                            "e.g. '@cf/google/gemma-2b-it-lora'")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        shown = f"of {len(description)} characters" if isinstance(description, str) else repr(description)
        raise FinetuneError(f"description {shown} is refused: "
                            f"use a string of at most {MAX_DESCRIPTION_CHARS} characters")
    if not isinstance(public, bool):
        raise FinetuneError(f"public {public!r} is refused: use true or false")


def _taken(exc: sqlite3.IntegrityError) -> bool:
    return "finetunes.name" in str(exc)


TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def _now() -> str:
    return datetime.now(timezone.utc).strftime(TIME_FORMAT)


def _now_after(previous: str) -> str:
    """The time now, or a microsecond past `previous` if the clock reads earlier (it was set back):
    each upload's modified_at sorts after the last, and the server serves the newest files by it."""
    now = _now()
    if now > previous:
        return now
    try:
        last = datetime.strptime(previous, TIME_FORMAT)
    except ValueError:  # written by another tool: keep the clock's time
        return now
    return (last + timedelta(microseconds=1)).strftime(TIME_FORMAT)


def _chunks(source: BinaryIO | bytes) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for start in range(0, len(view), UPLOAD_CHUNK_BYTES):
            yield bytes(view[start:start + UPLOAD_CHUNK_BYTES])
        return
    while chunk := source.read(UPLOAD_CHUNK_BYTES):
        if not isinstance(chunk, (bytes, bytearray)):
            raise AssetError(f"the upload yielded {type(chunk).__name__}, not bytes: open the file in binary mode")
        yield chunk


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(source, target)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_asset(entry: Path) -> bool:
    return entry.name in ASSET_NAMES and entry.is_file() and not entry.is_symlink()


def _is_finetune_dir(entry: Path, ids: set[str]) -> bool:
    return entry.name in ids and entry.is_dir() and not entry.is_symlink()


def _remove(entry: Path, ignore_errors: bool = False) -> None:
    """Delete a file or a directory tree; a symbolic link is unlinked, its target left alone."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=ignore_errors)
    else:
        entry.unlink(missing_ok=True)


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error raised by the store means its disk, or the user's quota, is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
