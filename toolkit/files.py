"""What the toolkit may write, replace and delete, and how it writes so that a crash never leaves a lie behind.

The rules, in one place:
- A directory the toolkit makes (a run, a merged model) carries a marker file, `.toolkit.json`, that says what it
  is and whether it is complete. `--overwrite` removes only directories with that marker, and never the current
  directory, one of its parents, the home directory or `/`, whatever the marker says.
- A directory is marked incomplete when work starts and complete only after its last file is in place; readers
  (eval, extract, merge, generate) refuse an incomplete one.
- One writer at a time: a lock file holding the owner's pid refuses a second process (a lock whose process is gone
  on this machine is taken over).
- Single files are written to a temporary sibling and renamed into place, so a reader sees the old file or the new
  one, never half of one.
"""

from __future__ import annotations

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
    """The toolkit's marker in `folder`, or None when there is none (or it is not ours: unreadable, not a dict)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("made_by") == "toolkit" else None


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
        made = f"a toolkit {marker.get('kind')} directory" if marker else "not made by toolkit (no .toolkit.json)"
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


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary sibling and a rename: readers never see a partial file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def staged_file(path: Path):
    """Yield a temporary sibling path to write; on success it is renamed to `path`, on failure removed."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _stale(owner: dict | None) -> bool:
    """A lock is stale when it names a process of this machine that no longer runs (or it is unreadable)."""
    if owner is None:
        return True
    if owner.get("host") != socket.gethostname():
        return False  # another machine's process: cannot tell, so it is respected
    pid = owner.get("pid")
    return not (isinstance(pid, int) and _pid_alive(pid))


def acquire_lock(folder: Path) -> Path:
    """Take `folder`'s lock for this process or raise; a stale lock (its process is gone) is taken over."""
    path = folder / LOCK
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                return path
            if not _stale(owner):
                raise ToolkitError(f"{folder} is being written by another toolkit process (pid {owner.get('pid')} "
                                   f"on {owner.get('host')}); wait for it to finish or choose another directory")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(me)
        return path
    raise ToolkitError(f"could not take the lock {path}; another process keeps taking it")


def release_lock(folder: Path) -> None:
    path = folder / LOCK
    owner = _lock_owner(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
