"""Crash-safe JSONL storage of trajectories.

A trajectory file holds one JSON record per line (format: :mod:`w2s_agents.types`). The writer,
:class:`TrajectoryStore`, appends each episode as one ``write`` of a whole line, then flushes and fsyncs, so a
killed process loses at most the episode it was writing and never a finished one. On opening, the store
validates the file, collects the keys of the episodes already finished (a resumed rollout runs only the
others) and repairs a torn last line (an interrupted write) with a warning. Readers validate every record and
name ``file:line`` on a bad one.

Only one process may write a store at a time (an advisory lock on POSIX); any number may read it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from w2s_agents.errors import DataFormatError, DuplicateEpisodeError, W2SError
from w2s_agents.types import EpisodeKey, Trajectory

try:  # POSIX advisory locks; elsewhere a second writer is not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "StoreScan",
    "TrajectoryStore",
    "encode_trajectory",
    "iter_trajectories",
    "read_trajectories",
    "scan_store",
]

logger = logging.getLogger(__name__)


def encode_trajectory(traj: Trajectory) -> bytes:
    """One line of the file format (UTF-8 JSON, newline-terminated) for ``traj``."""
    text = json.dumps(traj.to_dict(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text + "\n").encode("utf-8")


def _parse_line(raw: bytes, path: Path, lineno: int) -> Trajectory:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if b"\\ud" in raw or b"\\uD" in raw:  # a \uXXXX escape of a surrogate: only a pair makes a character
        where = _lone_surrogate(record, "")
        if where is not None:
            raise DataFormatError(
                f"{path}:{lineno}: invalid trajectory record: field '{where}' holds a lone surrogate "
                "(\\ud800-\\udfff escape without its pair), which is not Unicode text"
            )
    try:
        return Trajectory.from_dict(record)
    except ValueError as exc:
        raise DataFormatError(f"{path}:{lineno}: invalid trajectory record: {exc}") from None


def _lone_surrogate(value: object, where: str) -> str | None:
    """The dotted path of the first string in ``value`` that is not valid Unicode (a lone surrogate), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "(record)"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _lone_surrogate(key, where) or _lone_surrogate(item, f"{where}.{key}" if where else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class StoreScan:
    """What a pass over a trajectory file found."""

    keys: frozenset[EpisodeKey]
    """Keys of the complete records."""
    records: int
    """Number of complete records."""
    good_bytes: int
    """Length of the file's valid prefix (everything up to the last complete record)."""
    torn_bytes: int
    """Bytes after the last complete record that do not form one (a torn write), 0 when none."""
    missing_newline: bool
    """The last record is complete but lacks its newline (the file was edited by hand)."""
    duplicates: tuple[EpisodeKey, ...]
    """Keys that occur more than once (a store never writes these; a concatenated file may have them)."""


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (line number, line bytes without newline, terminated) for every line of ``path``."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.endswith(b"\n"):
                yield lineno, raw[:-1], True
            else:
                yield lineno, raw, False


def scan_store(path: str | os.PathLike[str]) -> StoreScan:
    """Validate every record of a trajectory file and report its keys and any torn tail.

    Blank lines are allowed and ignored. An unterminated last line that is not a valid record is a torn write
    (reported, not raised); any other bad line raises.

    Raises:
        DataFormatError: a complete line is not a valid record (message names ``file:line``).
    """
    p = Path(path)
    keys: set[EpisodeKey] = set()
    dups: list[EpisodeKey] = []
    records = good = torn = 0
    missing_newline = False
    if not p.exists():
        return StoreScan(frozenset(), 0, 0, 0, False, ())
    offset = 0
    for lineno, raw, terminated in _iter_lines(p):
        length = len(raw) + (1 if terminated else 0)
        if not terminated:
            try:
                traj = _parse_line(raw, p, lineno) if raw.strip() else None
            except DataFormatError:
                torn = length
                break
            if traj is None:
                torn = length  # trailing blanks without newline: harmless, dropped on repair
                break
            missing_newline = True
        elif not raw.strip():
            offset += length
            good = offset
            continue
        else:
            traj = _parse_line(raw, p, lineno)
        if traj.key in keys:
            dups.append(traj.key)
        keys.add(traj.key)
        records += 1
        offset += length
        good = offset
    return StoreScan(frozenset(keys), records, good, torn, missing_newline, tuple(dups))


def read_trajectories(path: str | os.PathLike[str]) -> Iterator[Trajectory]:
    """Yield every trajectory of a JSONL file, validating each record.

    A torn last line left by an interrupted writer is skipped with a warning (readers never modify the file;
    opening a :class:`TrajectoryStore` on it repairs it).

    Raises:
        DataFormatError: the file is missing or a record is invalid (message names ``file:line``).
    """
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"trajectory file not found: {p}")
    for lineno, raw, terminated in _iter_lines(p):
        if not raw.strip():
            continue
        try:
            yield _parse_line(raw, p, lineno)
        except DataFormatError:
            if terminated:
                raise
            logger.warning(
                "%s:%d: skipping a torn last record (%d bytes, interrupted write)", p, lineno, len(raw)
            )


def iter_trajectories(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Trajectory]:
    """Yield the trajectories of several files in order (see :func:`read_trajectories`)."""
    for path in paths:
        yield from read_trajectories(path)


class TrajectoryStore:
    """Append-only trajectory file that survives being killed at any moment.

    Use as a context manager::

        with TrajectoryStore(run_dir / "trajectories.jsonl") as store:
            for key in wanted_keys - store.keys:
                store.append(run_episode(key))

    Opening validates the existing file (raising :class:`DataFormatError` with ``file:line`` on a bad record),
    repairs a torn last line (logged as a warning; no complete record is lost) and takes the write lock.

    Args:
        path: the ``.jsonl`` file; created (with its folder) if missing.
        fsync: fsync after every record (durable against power loss as well as process death).
        allow_duplicates: accept a key that is already stored instead of raising.

    Raises:
        W2SError: another process holds the write lock on ``path``.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = True, allow_duplicates: bool = False
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.allow_duplicates = allow_duplicates
        self._fd: int | None = None
        self._count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._lock()
            if created and fsync:
                _fsync_dir(self.path.parent)
            scan = scan_store(self.path)
            self._repair(scan)
        except BaseException:
            self.close()
            raise
        if scan.duplicates:
            logger.warning("%s: %d episode keys occur more than once", self.path, len(scan.duplicates))
        self._keys: set[EpisodeKey] = set(scan.keys)
        self._count = scan.records

    # -- set-up -------------------------------------------------------------------------------------------

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise W2SError(f"{self.path}: another process is writing this trajectory store") from None

    def _repair(self, scan: StoreScan) -> None:
        assert self._fd is not None
        if scan.torn_bytes:
            logger.warning(
                "%s: removed a torn last record (%d bytes) left by an interrupted writer; %d complete records kept",
                self.path,
                scan.torn_bytes,
                scan.records,
            )
            os.ftruncate(self._fd, scan.good_bytes)
            os.fsync(self._fd)
        elif scan.missing_newline:
            self._write(b"\n")

    # -- writing ------------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            raise W2SError(f"{self.path}: the trajectory store is closed")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(self._fd)

    def append(self, traj: Trajectory) -> None:
        """Write one finished episode durably (one line, flushed and fsynced before returning).

        Raises:
            DuplicateEpisodeError: the episode's key is already stored (unless ``allow_duplicates``).
        """
        key = traj.key
        if key in self._keys and not self.allow_duplicates:
            raise DuplicateEpisodeError(f"{self.path}: episode {key} is already stored")
        self._write(encode_trajectory(traj))
        self._keys.add(key)
        self._count += 1

    # -- queries ------------------------------------------------------------------------------------------

    @property
    def keys(self) -> frozenset[EpisodeKey]:
        """Keys of every stored episode (what a resumed run must skip)."""
        return frozenset(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Trajectory]:
        return read_trajectories(self.path)

    # -- closing ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock and close the file (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # also releases the flock

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrajectoryStore({str(self.path)!r}, records={self._count})"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
