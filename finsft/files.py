"""The two gates: every file a user names goes in through one function, every file finsft writes goes out
through one function.

Reading (:func:`check_readable`, :func:`read_text`, :func:`read_bytes`, :func:`open_readable`): a regular file
(or, where a folder is expected, a folder) is checked with ``os.stat`` before it is opened, so a FIFO, a device or
a socket is refused at once (opening a FIFO blocks until a writer comes; a device never ends); a size limit where
one makes sense; a file that is not UTF-8 is named with the line and byte offset of the first bad byte; any file
name works (spaces, unicode, a leading dash: paths are never handed to a shell or an option parser).

Writing (:func:`write_file` and its JSON/JSON Lines forms): never replaces what finsft did not make (a link, a
folder, or a file the caller does not vouch for: ``replace``), writes whole or not at all (a temporary file in the
same folder, fsync, then ``os.replace``, or ``os.link`` for a file that must be new; the temporary file is removed
on failure), and turns a full disk, a quota, a permission error or a read-only file system into one
:class:`WriteError` that names the path, says what was kept and what to do. :func:`write_errors` gives the same
message for what libraries write (``save_pretrained``, ``torch.save``, safetensors, matplotlib).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from finsft.errors import FinsftError, OutputDirError


def cache_dir() -> Path:
    """finsft's cache (converted GGUF models, tokenized data): $FINSFT_CACHE, else $XDG_CACHE_HOME/finsft."""
    root = os.environ.get("FINSFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "finsft")
    return Path(root)


# A recipe is a few KiB of JSON; the largest in recipes/ is under 10 KiB. 10 MiB is far above any real recipe and far
# below what hurts a machine (a device such as /dev/zero or a mistyped data file would otherwise be read whole).
MAX_RECIPE_BYTES = 10 * 2**20


class NotASmallFile(ValueError):
    """A path that is not a regular file, or one larger than the limit, where a small text file is expected."""


def _describe_mode(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def read_small_text(path: str | Path, limit: int = MAX_RECIPE_BYTES) -> str:
    """The text of a recipe: a regular file of at most ``limit`` bytes (UTF-8, a byte-order mark tolerated), read
    through the gate. Raises FileNotFoundError, OSError, UnicodeDecodeError or NotASmallFile (the reason in words,
    for the recipe's Problem)."""
    try:
        return read_text(path, "recipe", limit=limit, limit_note="a recipe may have: this is not a recipe (a data "
                                                                   "file?)")
    except UnreadableFile as exc:
        if exc.cause is not None:
            raise exc.cause from None
        if exc.kind_problem is not None:
            raise NotASmallFile(f"{exc.kind_problem}, not a JSON file") from None
        raise NotASmallFile(exc.reason.removeprefix("is ")) from None


# ------------------------------------------------------------------------------------------ the reading gate


class UnreadableFile(FinsftError):
    """A path a user named that finsft cannot read as what it should be (missing, a FIFO or device where a file is
    expected, too large, not UTF-8...). ``reason`` is the part after the path; ``cause`` the OSError or
    UnicodeDecodeError behind it, if any."""

    def __init__(self, what: str, path: str | os.PathLike[str], reason: str, fix: str = "", *,
                 cause: BaseException | None = None, kind_problem: str | None = None):
        self.what, self.path, self.reason, self.fix = what, str(path), reason, fix
        self.cause, self.kind_problem = cause, kind_problem
        super().__init__(f"{what} '{path}' {reason}" + (f": {fix}" if fix else ""))


def _mib(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n:,} bytes"


def check_readable(path: str | os.PathLike[str], what: str = "file", *, folder: bool = False, limit: int | None = None,
                   limit_note: str = "") -> Path:
    """THE reading gate: ``path`` exists and is a regular file (``folder``: a folder) of at most ``limit`` bytes.
    A symbolic link is followed to its target, which must be of the right kind too. Nothing is opened, so a FIFO
    never blocks. Raises UnreadableFile naming ``what`` and the path."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise UnreadableFile(what, path, "does not exist", cause=exc) from None
    except NotADirectoryError as exc:
        raise UnreadableFile(what, path, "does not exist (a part of the path is a file, not a folder)",
                             cause=exc) from None
    except PermissionError as exc:
        raise UnreadableFile(what, path, "cannot be read: permission denied", "check its permissions",
                             cause=exc) from None
    except OSError as exc:  # a name too long, a loop of links...
        raise UnreadableFile(what, path, f"cannot be read: {exc.strerror or exc}", cause=exc) from None
    if folder:
        if not stat.S_ISDIR(st.st_mode):
            kind = _describe_mode(st.st_mode) if not stat.S_ISREG(st.st_mode) else "a file"
            raise UnreadableFile(what, path, f"is {kind}, not a folder", kind_problem=kind)
        return Path(path)
    if not stat.S_ISREG(st.st_mode):
        kind = _describe_mode(st.st_mode)
        raise UnreadableFile(what, path, f"is {kind}, not a regular file", "name a regular file",
                             kind_problem=kind)
    if limit is not None and st.st_size > limit:
        raise UnreadableFile(what, path, f"is {st.st_size:,} bytes, more than the {_mib(limit)} "
                             + (limit_note or f"a {what} may have"))
    return Path(path)


@contextmanager
def _read_errors(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    try:
        yield
    except UnreadableFile:
        raise
    except OSError as exc:
        raise UnreadableFile(what, path, f"cannot be read: {exc.strerror or exc}", cause=exc) from None


def open_readable(path: str | os.PathLike[str], what: str = "file", *, limit: int | None = None) -> IO[bytes]:
    """The file opened for reading in binary mode, after the gate's checks (the caller closes it)."""
    check_readable(path, what, limit=limit)
    with _read_errors(path, what):
        return open(path, "rb")  # returned to the caller, who closes it


def read_bytes(path: str | Path, what: str = "file", *, limit: int | None = None, limit_note: str = "") -> bytes:
    """The whole file, through the gate, never read past ``limit`` bytes (it may grow after the check)."""
    check_readable(path, what, limit=limit, limit_note=limit_note)
    with _read_errors(path, what), open(path, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise UnreadableFile(what, path, f"is more than the {_mib(limit)} " + (limit_note or f"a {what} may have"))
    return data


def utf8_error(data: bytes, exc: UnicodeDecodeError, offset: int = 0, lines: int = 0) -> str:
    """'is not UTF-8 text: byte 0xe9 at line 2 (byte offset 75)' for the first bad byte of ``data``."""
    pos = exc.start
    line = lines + data.count(b"\n", 0, pos) + 1
    return f"is not UTF-8 text: byte 0x{data[pos]:02x} at line {line} (byte offset {offset + pos}) is not valid UTF-8"


def read_text(path: str | Path, what: str = "file", *, limit: int | None = None, limit_note: str = "") -> str:
    """The text of a UTF-8 file (a byte-order mark tolerated), through the gate; a bad byte is named with its line
    and byte offset."""
    data = read_bytes(path, what, limit=limit, limit_note=limit_note)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(what, path, utf8_error(data, exc), "save it with UTF-8 encoding (e.g. `iconv -f latin1 "
                             "-t utf-8 in > out`)", cause=exc) from None


def read_json(path: str | Path, what: str = "file", *, limit: int | None = MAX_RECIPE_BYTES) -> Any:
    """A small JSON file through the gate; invalid JSON is named with its line and column."""
    text = read_text(path, what, limit=limit)
    try:
        return json.loads(text)
    except ValueError as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise UnreadableFile(what, path, f"is not valid JSON{where} ({getattr(exc, 'msg', exc)})",
                             cause=exc) from None


# ------------------------------------------------------------------------------------------ the writing gate


class WriteError(FinsftError):
    """finsft could not write a file or folder (a full disk, a quota, a permission, a read-only file system), or
    refused to replace something it did not make. The message names the path, what was kept and what to do."""


# The errors of the file system that a person can fix, in words, each with what to do.
FIXABLE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free some space (or choose a folder on another disk)"),
    errno.EDQUOT: ("disk quota exceeded", "free some space within your quota (or choose a folder on another disk)"),
    errno.EFBIG: ("file too large (a file-size limit: ulimit -f, or the file system's)",
                  "raise the limit or choose a folder on another file system"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
    errno.EROFS: ("read-only file system", "choose a folder on a writable file system"),
}


def _errno_of(exc: BaseException) -> int | None:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FIXABLE:
            return e.errno
        e = e.__cause__ or e.__context__
    text = str(exc)
    for code, needle in ((errno.ENOSPC, "No space left"), (errno.ENOSPC, "StorageFull"), (errno.EDQUOT, "quota"),
                         (errno.EFBIG, "File too large"), (errno.EFBIG, "FileTooLarge"),
                         (errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")):
        if needle in text:
            return code
    return None


# What torch.save's zip writer (caffe2's inline_container.cc) says when a write fails: it names no errno.
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "inline_container.cc")


def io_problem(exc: BaseException) -> str | None:
    """The file-system error behind ``exc`` (a full disk, a file-size limit, a read-only folder...), in words; None
    when ``exc`` is something else. safetensors, torch.save and matplotlib report such errors in their own
    exception types (SafetensorError "I/O error: ...", RuntimeError "PytorchStreamWriter failed ...")."""
    if isinstance(exc, FinsftError):
        return None
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and ("I/O error" in text or "IoError" in text):
        return text.split("I/O error:", 1)[-1].strip()
    if isinstance(exc, RuntimeError) and any(s in text for s in TORCH_WRITE_FAILURES):
        # torch.save's zip writer names no errno: on a full disk it reports a short write ("unexpected pos 64 vs 0")
        code = _errno_of(exc)
        return (f"torch could not write the file ({text.splitlines()[0].strip()}): "
                + (FIXABLE[code][0] if code else "the disk is full, or a file-size limit was reached"))
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError) and cause.errno in FIXABLE:
        return io_problem(cause)
    return None


def fix_for(exc: BaseException) -> str:
    """What to do about the file-system error behind ``exc``."""
    code = _errno_of(exc)
    if code is None and any(s in str(exc) for s in TORCH_WRITE_FAILURES):
        code = errno.ENOSPC  # torch names no cause; a full disk is by far the most common one
    return FIXABLE[code][1] if code is not None else "fix the cause"


@contextmanager
def write_errors(path: str | Path, kept: str, then: str = "") -> Iterator[None]:
    """Turn a file-system error while writing ``path`` (by finsft or by a library: save_pretrained, torch.save,
    safetensors, savefig) into one WriteError: the path, the error in words, ``kept`` (what is safe) and what to
    do (``then``: the command that continues, if any). Other errors pass."""
    try:
        yield
    except (FinsftError, KeyboardInterrupt):
        raise
    except Exception as exc:
        problem = io_problem(exc)
        if problem is None:
            raise
        raise WriteError(f"cannot write {path}: {problem}. {kept[:1].upper() + kept[1:]}. Then {fix_for(exc)}"
                         + (f" and {then}" if then else "") + ".") from exc


def _refuse(path: Path, replace: bool | Callable[[Path], bool]) -> str | None:
    """Why ``path`` must not be written (None: it may)."""
    if path.is_symlink():
        return f"{path} is a symbolic link (to {os.path.realpath(path)}); finsft does not write through links"
    if not path.exists():
        return None
    if path.is_dir():
        return f"{path} is a folder; finsft does not replace it"
    if not stat.S_ISREG(path.stat().st_mode):
        return f"{path} is {_describe_mode(path.stat().st_mode)}; finsft writes only regular files"
    if replace is True or (callable(replace) and replace(path)):
        return None
    return f"{path} already exists and finsft did not make it; finsft never replaces such a file"


def write_file(path: str | Path, data: str | bytes, *, replace: bool | Callable[[Path], bool] = False,
               kept: str = "nothing else was changed", then: str = "") -> Path:
    """THE writing gate: ``data`` into ``path``, whole or not at all.

    ``replace``: whether an existing regular file at ``path`` may be replaced: False (the file must be new: a file
    made meanwhile is not replaced either), True (the caller vouches that it is finsft's: a file in a folder finsft
    made and checked), or a test of the file (e.g. "a JSON report of this tool"). A link, a folder or a device is
    never replaced. The data goes to a temporary file in the same folder (so the final rename cannot cross file
    systems), is flushed and fsynced, then renamed into place (``os.replace``) or, for a new file, hard-linked
    (``os.link`` fails if a file appeared); the temporary file is removed on any failure. A full disk or a
    permission error becomes a WriteError naming the path, ``kept`` and what to do (``then``)."""
    path = Path(path)
    why = _refuse(path, replace)
    if why:
        raise WriteError(f"{why}: {kept}; name a new file")
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with write_errors(path, kept, then):
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:80]}.", suffix=".finsft-tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            if replace is False:
                _place_new(tmp, path, kept)
            else:
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def _place_new(tmp: Path, path: Path, kept: str) -> None:
    """Put the finished temporary file ``tmp`` in place as the NEW file ``path``: hard-linked, so a file that
    appeared meanwhile is never replaced (where the file system has no hard links: checked, then renamed)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise WriteError(f"{path} appeared while finsft was writing it; finsft never replaces a file it "
                         f"did not make: {kept}; name a new file") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists() or path.is_symlink():  # no hard links here: check, then rename
            raise WriteError(f"{path} appeared while finsft was writing it: {kept}") from None
        os.replace(tmp, path)


@contextmanager
def streamed_file(path: str | Path, *, kept: str = "nothing else was changed", then: str = "") -> Iterator[Path]:
    """The writing gate for a file too large to hold in memory (a GGUF export): yields a temporary path in the same
    folder for the caller to stream into; when the block ends without an error the file is fsynced and put in
    place as a NEW file (hard-linked, so a file that appeared meanwhile is never replaced), and the temporary file
    is removed on any failure. Disk full and permission errors become a WriteError as in :func:`write_file`."""
    path = Path(path)
    why = _refuse(path, False)
    if why:
        raise WriteError(f"{why}: {kept}; name a new file")
    with write_errors(path, kept, then):
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:80]}.", suffix=".finsft-tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            _place_new(tmp, path, kept)
        finally:
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any, *, replace: bool | Callable[[Path], bool] = True,
               kept: str = "nothing else was changed", then: str = "") -> Path:
    """``data`` as indented JSON through the gate (by default into a folder finsft made: ``replace=True``)."""
    return write_file(path, json.dumps(data, indent=2, default=str) + "\n", replace=replace, kept=kept, then=then)


def write_jsonl(path: Path, records: Iterable[dict[str, Any]], *, replace: bool | Callable[[Path], bool] = True,
                kept: str = "nothing else was changed", then: str = "") -> Path:
    """One JSON object per line through the gate."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return write_file(path, text, replace=replace, kept=kept, then=then)


def append_jsonl(path: Path, record: dict[str, Any], *, kept: str = "the lines before it are kept",
                 then: str = "") -> None:
    """One JSON line appended to a log finsft keeps in a folder it made (metrics.jsonl): appending is what a log is
    for (a line cut short by a kill is skipped by its readers); a full disk becomes a WriteError."""
    if path.is_symlink():
        raise WriteError(f"{path} is a symbolic link; finsft does not write through links")
    with write_errors(path, kept, then), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def json_with_keys(*keys: str) -> Callable[[Path], bool]:
    """A ``replace`` test for :func:`write_file`: the file is a JSON object holding ``keys`` (a record the same
    tool wrote before, so writing it again loses nothing); anything else is the user's."""

    def test(path: Path) -> bool:
        try:
            record = read_json(path, "record", limit=64 * 2**20)
        except UnreadableFile:
            return False
        return isinstance(record, dict) and set(keys) <= record.keys()

    return test


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Refuse, before any heavy work, a folder finsft will write into that cannot be written: the nearest existing
    part of the path must be a writable folder (a read-only file system counts: ``os.access`` asks the kernel).
    ``fix``: what is lost otherwise and what to do."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is a file" if probe.exists() and not probe.is_dir() else "is not writable (read-only, or not yours)"
        raise WriteError(f"{what} {folder} cannot be written: {probe} {why}; {fix}")


@contextmanager
def new_folder(path: Path, kept: str = "nothing was written", then: str = "") -> Iterator[Path]:
    """A temporary folder beside ``path`` for a library to save into (save_pretrained), renamed to ``path`` when
    the block succeeds; removed on any failure, and a file-system error becomes a WriteError. ``path`` must be
    absent or an empty folder (checked by the caller before the heavy work, and again here)."""
    import shutil

    with write_errors(path, kept, then):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name[:80]}.", suffix=".finsft-tmp"))
    try:
        with write_errors(path, kept, then):
            yield tmp
            if path.is_symlink() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
                raise WriteError(f"{path} appeared or filled while finsft was writing it; finsft never replaces "
                                 f"it: {kept}; name a new folder")
            if path.exists():
                path.rmdir()  # empty (checked just above)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename


# ------------------------------------------------------------------------------------------ one owner per run


def lock_path(run: Path) -> Path:
    """The lock file of a run folder: ``.<name>.finsft-lock`` beside it (train, eval --adapter, merge and push of
    that folder all take it)."""
    return run.with_name(f".{run.name}.finsft-lock")


@dataclass
class RunLock:
    """An exclusive lock on a run folder, held by the main process of the command that trains, scores, merges or
    pushes it, for the life of that command.

    ``filelock`` locks with the operating system (flock), so a lock of a process that died is released by the
    kernel and never blocks a later command. Who holds it (command, pid, host, since) is written beside it for the
    message. A second command is refused rather than made to wait: training or scoring takes minutes to hours, a
    command that sits silent looks hung, and the holder's command and pid say exactly what to wait for or stop.
    """

    path: Path
    command: str = "finsft train"
    _lock: Any = field(default=None, repr=False)

    @property
    def info_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def acquire(self, final: Path, what: str = "output.dir") -> None:
        from filelock import FileLock, Timeout

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputDirError(f"cannot create the folder for {what} {final}: {exc.strerror or exc}") from exc
        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise OutputDirError(f"another finsft run is using {final} ({self.holder()}); wait for it to finish, "
                             f"stop it, or choose another {what}") from None
        except OSError as exc:
            raise OutputDirError(f"cannot lock {what} {final}: {exc.strerror or exc}") from exc
        self._lock = lock
        with suppress(WriteError):  # the lock holds without its note; a second command names "a process that is starting"
            write_json(self.info_path, {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                                        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})

    def holder(self) -> str:
        try:
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
            return (f"{info.get('command', 'finsft train')}, pid {info['pid']} on {info['host']}, since "
                    f"{info['since']}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "a process that is starting"

    def release(self) -> None:
        if self._lock is not None:
            self.info_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None


@contextmanager
def run_lock(run: Path, command: str, what: str = "--adapter") -> Iterator[RunLock | None]:
    """Hold ``run``'s lock while ``command`` (eval --adapter, merge, push) reads or writes it: a training of the same
    folder (``--overwrite``, ``--resume``) or another such command is refused while it runs, and this command is
    refused while one of them runs. A run whose parent folder cannot be written (read-only) cannot be replaced by
    anyone either, so it is used without a lock (None)."""
    lock = RunLock(lock_path(run), command)
    if not os.access(run.parent, os.W_OK | os.X_OK):
        yield None
        return
    lock.acquire(run, what)
    try:
        yield lock
    finally:
        lock.release()
