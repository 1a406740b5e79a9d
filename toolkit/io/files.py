"""What the toolkit may write, replace and delete, and how it writes so that a crash never leaves a lie behind.

The rules, in one place:
- A directory the toolkit makes (a run, a merged model) carries a marker file, `.toolkit.json`, that says what it
  is and whether it is complete. `--overwrite` removes only directories with that marker, and never the current
  directory, one of its parents, the home directory or `/`, whatever the marker says.
- A directory is marked incomplete when work starts and complete only after its last file is in place; readers
  (eval, extract, merge, generate) refuse an incomplete one.
- One writer at a time: an operating-system lock on a lock file refuses a second process; it ends with the process
  that holds it, so a lock file left by a crash or kill is taken over.
- Single files are written to a temporary sibling and renamed into place, so a reader sees the old file or the new
  one, never half of one, with the permissions a plain write would give. Without --overwrite, a file that another
  process creates meanwhile is not replaced either.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from toolkit.errors import ToolkitError

MARKER = ".toolkit.json"
LOCK = ".toolkit.lock"
FULL_BELOW = 16 * 2**20  # bytes free under which a failed write is put down to a full disk


def expand(path: str | Path) -> Path:
    """A user-given path with `~` expanded, so every writer (ours and the Trainer's) means the same place."""
    return Path(os.path.expanduser(str(path)))


def protected(path: Path) -> str | None:
    """Why `path` may never be removed or replaced wholesale (None when it may be, marker permitting)."""
    target = path.resolve()
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor):
        return "it is the filesystem root"
    if target == Path.home().resolve():
        return "it is the home directory"
    if target == cwd:
        return "it is the current directory"
    if target in cwd.parents:
        return "it contains the current directory"
    return None


def read_marker(folder: Path) -> dict | None:
    """The toolkit's marker in `folder`: None when there is none, or when it is another program's JSON file (no
    `made_by: toolkit`). A marker that cannot be read, is not JSON (cut short by a crash, say), or says it is the
    toolkit's without a `kind` and a true/false `complete` is damaged: every reader refuses the folder with the same
    one line, so a damaged run is never taken for a finished one, nor for someone else's folder."""
    path = folder / MARKER
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise damaged_marker(folder, "not UTF-8 text") from None
    except OSError as err:
        raise damaged_marker(folder, f"unreadable: {err.strerror or err}") from None
    try:
        marker = json.loads(text)
    except ValueError:
        raise damaged_marker(folder, "not valid JSON, perhaps cut short") from None
    if not isinstance(marker, dict):
        raise damaged_marker(folder, "not a JSON object")
    if marker.get("made_by") != "toolkit":
        return None
    if not isinstance(marker.get("kind"), str) or not marker["kind"]:
        raise damaged_marker(folder, "it names no kind")
    if not isinstance(marker.get("complete"), bool):
        raise damaged_marker(folder, "its 'complete' is not true or false")
    return marker


def damaged_marker(folder: Path, why: str) -> ToolkitError:
    return ToolkitError(f"{folder / MARKER} is damaged ({why}): the toolkit cannot tell what {folder} holds or "
                        "whether it is finished, so it neither uses nor replaces it; write to a new directory (train "
                        f"again, for a run) and remove {folder} yourself once it is no longer needed")


def write_marker(folder: Path, kind: str, complete: bool, **extra) -> None:
    from toolkit import __version__

    marker = {"made_by": "toolkit", "kind": kind, "complete": complete, "version": __version__,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    write_text_atomic(folder / MARKER, json.dumps(marker, indent=2) + "\n")


def is_complete(folder: Path, kind: str) -> bool:
    marker = read_marker(folder)
    return bool(marker and marker.get("kind") == kind and marker.get("complete") is True)


def entries(folder: Path) -> list[Path]:
    """What a directory holds besides the toolkit's own lock."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name != LOCK]


def check_replaceable(folder: Path, kind: str, option: str) -> None:
    """Refuse to empty `folder` unless the toolkit made it as a `kind` and it is not a protected place."""
    why = protected(folder)
    if why:
        raise ToolkitError(f"{option} {folder}: refusing to replace it, {why}; choose a new directory")
    if not entries(folder):
        return
    marker = read_marker(folder)
    if marker is None or marker.get("kind") != kind:
        made = f"a toolkit {marker['kind']} directory" if marker else "not made by toolkit (no .toolkit.json)"
        raise ToolkitError(f"{option} {folder} is {made}; --overwrite only replaces a {kind} directory the toolkit "
                           "made. Remove it yourself or choose another directory")


def empty_owned(folder: Path, kind: str, option: str) -> None:
    """Remove everything in a directory the toolkit made (checked again here, right before removal)."""
    check_replaceable(folder, kind, option)
    for entry in entries(folder):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def usual_mode(directory: bool = False) -> int:
    """The permissions a plain `open` or `mkdir` would give (0o644 / 0o755 under the usual umask); temporary files
    are created private (0o600), and renaming one into place must not make a result unreadable to others."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def share_like_plain_files(folder: Path) -> None:
    """Give the files directly in a folder the toolkit just filled the usual permissions: safetensors (0.8) creates
    its files private (0o600), which would leave an adapter or merged model unreadable to a serving account."""
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(usual_mode())


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename: readers never see a partial file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, usual_mode())
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def staged_file(path: Path, replace: bool = True):
    """Yield a temporary sibling path to write; on success it is renamed to `path`, on failure removed.

    With `replace=False` a file that appeared at `path` meanwhile (another process) is never replaced: the new one
    is linked into place, which fails when the name is taken.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(handle, usual_mode())
    os.close(handle)
    try:
        yield Path(temporary)
        if replace:
            os.replace(temporary, path)
        else:
            place_new(Path(temporary), path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def place_new(temporary: Path, path: Path) -> None:
    """Give `temporary` the name `path` only if nothing has that name (a hard link is created or fails at once)."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise ToolkitError(f"{path} appeared while this command wrote it (another process?); it was left as it is"
                           ) from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise ToolkitError(f"{path} appeared while this command wrote it (another process?); it was left as "
                               "it is") from None
        os.replace(temporary, path)


_held: dict[str, int] = {}  # lock file -> the open descriptor that holds its lock, for this process


def _lock_owner(path: Path) -> dict | None:
    """Who holds a lock, as its holder wrote it (None when unreadable or not yet written)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _still_there(handle: int, path: Path) -> bool:
    """Whether `path` still names the file `handle` has open: a holder that finished removes its lock file, and a
    lock taken on the removed file would guard nothing."""
    try:
        return os.stat(path).st_ino == os.fstat(handle).st_ino
    except FileNotFoundError:
        return False


def _busy_error(folder: Path, path: Path) -> ToolkitError:
    owner = _lock_owner(path) or {}
    who = f"pid {owner['pid']} on {owner.get('host', '?')}" if "pid" in owner else "starting up"
    return ToolkitError(f"{folder} is being written by another toolkit process ({who}); wait for it to finish or "
                        "choose another directory")


def acquire_lock(folder: Path) -> Path:
    """Take `folder`'s lock for this process, or raise if another process holds it.

    The lock is the operating system's (`flock`) on the lock file, so it is released whenever its process ends,
    crash or kill included: a lock file left by a process that is gone is simply taken over. The file also names
    the holder (pid, host) for the message a second process gets.
    """
    path = folder / LOCK
    key = str(path.resolve())
    if key in _held:
        return path
    for _ in range(3):
        try:
            # never through a symbolic link: the lock file is truncated and rewritten below
            handle = os.open(path, os.O_NOFOLLOW | os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ToolkitError(f"{path} is a symbolic link, not the toolkit's lock file; remove it") from None
            raise ToolkitError(f"cannot write the lock file {path} ({err.strerror}); the directory must be "
                               "writable: check the disk and its permissions, or choose another directory") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise _busy_error(folder, path) from None
        except OSError as err:
            os.close(handle)
            raise ToolkitError(f"cannot lock {path} ({err.strerror}); the file system does not support locks, "
                               "choose a directory on a local disk") from None
        if not _still_there(handle, path):
            os.close(handle)
            continue
        _write_owner(handle, path)
        _held[key] = handle
        return path
    raise ToolkitError(f"could not take the lock {path}; other processes keep taking it")


def _write_owner(handle: int, path: Path) -> None:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        os.ftruncate(handle, 0)
        os.write(handle, json.dumps(me).encode("utf-8"))
    except OSError as err:
        os.close(handle)
        raise ToolkitError(f"cannot write the lock file {path} ({err.strerror}); free space on that disk or choose "
                           "another directory") from None


def lock_holder(folder: Path) -> dict | None:
    """Who holds `folder`'s lock right now (pid and host as the holder wrote them), or None when nobody does."""
    try:
        handle = os.open(folder / LOCK, os.O_NOFOLLOW | os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _lock_owner(folder / LOCK) or {}
    finally:
        os.close(handle)  # closing also gives up the shared lock just taken
    return None


def release_lock(folder: Path) -> None:
    """Give the lock up; the file goes first, so a process waiting on the old file sees it is gone."""
    path = folder / LOCK
    handle = _held.pop(str(path.resolve()), None)
    if handle is None:
        return
    if _still_there(handle, path):
        path.unlink(missing_ok=True)
    os.close(handle)


def says_disk_full(err: BaseException) -> bool:
    """Whether an error, or one it came from, is the system reporting a full disk (bitsandbytes, safetensors and
    torch wrap it in their own error types)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failure while writing into `folder` came from a full disk: the error says so, or it names no cause
    (torch's archive writer) and there is no space left there."""
    if says_disk_full(err):
        return True
    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free < FULL_BELOW
    except OSError:
        return False


def writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
