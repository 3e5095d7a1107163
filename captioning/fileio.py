"""Small file helpers that every stage shares: atomic writes, JSON with clear
errors, and paths that cannot escape their folder.

A learner's kernel can die at any moment (a restart, Ctrl-C, a full disk), so
nothing in this project writes a final file in place: we write a temporary
file beside it and rename it over the final name, which is atomic on POSIX and
Windows. A reader therefore sees either the old file or the new one, never half.
A write that fails (a full disk, a file-size limit) raises an OSError that
names the final file, even where the operating system's error names none.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

_UMASK = os.umask(0)  # read the process umask once (setting it is the only way to read it)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path, suffix=".tmp"):
    """Yield a temporary path beside `path`; rename it to `path` on success.

    On an exception the temporary file is removed and `path` is untouched. An
    OSError from write() or fsync() carries no file name ("[Errno 28] No space
    left on device"), and one from the temporary file names a file the user
    never asked for: both are raised again naming `path`.
    `suffix` is the temporary name's ending (Keras insists on ".keras").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    # mkstemp makes the file private (0600); give it the permissions an ordinary
    # open() would, so caches and bundles can be shared with classmates.
    os.chmod(temp_name, 0o666 & ~_UMASK)
    try:
        yield Path(temp_name)
        os.replace(temp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp_name)
        if isinstance(error, OSError) and error.filename in (None, temp_name) and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def write_text_atomic(path, text):
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def write_json_atomic(path, obj):
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A file name made of arbitrary bytes (os.fsdecode) holds lone surrogates, which UTF-8
        # cannot encode; JSON's own \u escapes can, and read_json gives the same string back.
        text = json.dumps(obj, indent=2, ensure_ascii=True) + "\n"
    write_text_atomic(path, text)


def printable(name):
    """A file name (or text quoting one) that any terminal and any UTF-8 file can take.

    Names on disk are bytes; Python turns the bytes that are not UTF-8 into lone
    surrogates (os.fsdecode), and printing those raises UnicodeEncodeError. We
    show such bytes as \\xNN escapes instead; every other name is unchanged.
    """
    name = str(name)
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte made: show its code point
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def read_json(path, what="JSON file", kind=None):
    """Read a JSON file, turning every failure into a ValueError that names the file. With
    kind=dict (or list), valid JSON of another shape (`[]`, `"text"`, `3`) is refused too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: {what} is not valid UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: {what} is not valid JSON: {error}") from None
    if kind is not None and not isinstance(data, kind):
        shape = {dict: "an object {...}", list: "a list [...]"}.get(kind, kind.__name__)
        raise ValueError(f"{path}: {what} must be {shape}, not {type(data).__name__} JSON: restore the file, "
                         "or make it again")
    return data


def safe_join(root, name, *, source="file name"):
    """Join `name` under `root`, refusing absolute names and `..` escapes.

    File names and URLs come from annotation files that anyone can edit, so a
    name such as `../../.bashrc` must never make us read or write outside the
    data folder.
    """
    root = Path(root)
    name = str(name)
    candidate = Path(name)
    if not name or candidate.is_absolute() or ".." in candidate.parts or "\\" in name or "\x00" in name:
        raise ValueError(f"refusing unsafe {source} {name!r}: it must be a plain relative name inside {root}")
    # The name is checked, not where links lead: a link the user put in their own
    # data folder (a photo collection kept elsewhere) is theirs to follow.
    return root / candidate


def sha256_of(path):
    """Hex sha256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def writable_folder(path, what="output folder"):
    """Create `path` if needed and prove that files can be written in it, before any long work
    starts: a path that is a file, a read-only folder or a full disk is reported now, not after
    an hour of training. Returns the Path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder: choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as probe:
            probe.write(b"x")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise OSError(error.errno, f"cannot write in {what} {path} ({error.strerror}): choose a folder you can "
                                   "write to, or free some space") from None
    return path


def left_out_rows(report):
    """The rows a captions file of your own lost, one line per kind (own_data.BAD_ROW_KINDS), from
    a prepared report: "left out, not utf8: 2 row(s), lines 4, 9". `prepare` and `train` print
    the same lines, so that a user who only ever runs `train` still learns that rows were dropped."""
    return [f"left out, {kind.replace('_', ' ')}: {entry['count']} row(s), lines "
            f"{', '.join(map(str, entry['lines']))}{' ...' if entry['count'] > len(entry['lines']) else ''}"
            for kind, entry in report.get("bad_rows", {}).items()]


def lock_path(folder):
    """The lock file of `folder`: beside it, not in it, because the folder may not exist yet and
    replace_folder renames it while the lock is held."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.captioning-lock")


def _lock_holder(lock):
    """{"pid", "host"} written in a lock file, or None when it cannot be read (being written)."""
    try:
        holder = json.loads(Path(lock).read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder, what="output folder", log=None):
    """Hold `folder` for this process while the block runs: a second process asking for the same
    folder is refused with a ValueError naming the folder and the holder's process id.

    Two `train` runs into one --out would otherwise both train into OUT.partial, delete each
    other's work and both say "written". The lock is a file made with O_CREAT | O_EXCL (only one
    process can create it), holding the process id and host name. A lock left by a process
    that died (a kill -9, a power cut) must not block the folder for ever: one whose process is
    gone from this host is taken over, with a note through `log`. One of another host cannot be
    checked from here, so it is refused, saying which file to delete if that run is over.
    """
    lock = lock_path(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_UMASK)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is None or holder.get("host") != mine["host"] or _alive(holder["pid"]):
                who = (f"process {holder['pid']} on {holder.get('host')}" if holder else "another process")
                raise ValueError(f"{what} {folder} is in use by {who}: wait for that run to finish, or choose "
                                 f"another folder (if no run is using it any more, delete {lock})") from None
            # Stale: take it over by renaming it aside, which only one process can do; if what we
            # renamed is not the stale lock we judged (another process took it over first), put it back.
            aside = lock.with_name(f"{lock.name}.{os.getpid()}")
            try:
                os.rename(lock, aside)
            except FileNotFoundError:
                continue
            if _lock_holder(aside) != holder:
                with contextlib.suppress(OSError):
                    os.link(aside, lock)
                os.remove(aside)
                continue
            os.remove(aside)
            if log:
                log(f"note: took over the lock of {folder} left by process {holder['pid']}, which is gone")
            continue
        except OSError as error:  # a read-only or full parent: name the folder asked for, not our file
            raise OSError(error.errno, f"cannot write beside {what} {folder} ({error.strerror}): choose a "
                                       "folder you can write to, or free some space") from None
        try:
            os.write(handle, json.dumps(mine).encode())
        except OSError:
            os.close(handle)
            os.remove(lock)
            raise
        os.close(handle)
        break
    try:
        yield lock
    finally:
        if _lock_holder(lock) == mine:  # never remove a lock another process holds now
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)


BACKUP_MARKER = ".captioning-replaced"  # inside a folder replace_folder set aside: ours to delete or put back


def _aside(final):
    """Where replace_folder keeps FINAL while its replacement moves in: a hidden name no user
    picks, recognised as ours by the marker file inside (a user's own FINAL.old is never touched)."""
    return final.with_name(f".{final.name}.captioning-replaced")


def replace_folder(new, final):
    """Move the complete folder `new` to `final`, replacing what is there only now that the
    replacement exists: the old folder is renamed aside, the new one into place, then the old
    one is deleted. (Renames within one file system are atomic; a crash between the two leaves
    the old folder aside, which `restore_folder` puts back.)"""
    new, final = Path(new), Path(final)
    aside = _aside(final)
    if aside.exists():
        if not (aside / BACKUP_MARKER).is_file():
            raise ValueError(f"{aside} is in the way and was not made by this program: move it, then run again")
        shutil.rmtree(aside)
    if final.exists():
        (final / BACKUP_MARKER).write_text("set aside while a new version replaced this folder\n")
        os.rename(final, aside)
    os.rename(new, final)
    shutil.rmtree(aside, ignore_errors=True)


def restore_folder(final, replacement_done=None):
    """Put back the folder a replace_folder set aside, if it was cut between its two renames.

    `replacement_done`: a file that exists only while the complete replacement waits to move in
    (its bundle.json). Without it, the cut came after the second rename: the folder aside is a
    stale old version, and FINAL is missing because the user moved it away since (keep ->
    keep.old). Putting the old version back under FINAL would undo the user's rename: it is
    deleted instead, as replace_folder would have."""
    final = Path(final)
    aside = _aside(final)
    if not (aside.is_dir() and (aside / BACKUP_MARKER).is_file()) or final.exists():
        return
    if replacement_done is not None and not Path(replacement_done).exists():
        shutil.rmtree(aside)
        return
    os.rename(aside, final)
    (final / BACKUP_MARKER).unlink(missing_ok=True)


def work_paths(work_dir, dataset, encoder=None, pooling="avg", arch=None):
    """Where each stage keeps its output under one work folder (default data/work).

    The notebooks, the CLI and the tests all use this one layout, so that
    notebook 02 finds what notebook 01 wrote, and `train` reuses both.
    """
    work_dir = Path(work_dir)
    paths = {"prepared": work_dir / "prepared" / dataset}
    if encoder is not None:
        paths["features"] = work_dir / "features" / f"{dataset}-{encoder}-{pooling}"
        paths["teacher_forced"] = work_dir / "teacher-forced"  # runs.teacher_forced_folder names each model
    if arch is not None:  # a bundle is named by what it is: its data, its encoder and its architecture
        paths["bundle"] = work_dir / "bundles" / "-".join(part for part in (dataset, encoder, arch) if part)
    return paths


def _close_hdf5(path):
    """Close every HDF5 handle h5py still holds on `path`. A weights file whose write failed
    (a full disk) is left open by Keras; h5py would flush it again at exit, print tracebacks
    and, with the disk still full, crash the process after our one-line message."""
    import h5py
    for file_id in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        try:
            if os.fsdecode(file_id.name) == os.fspath(path):
                h5py.File(file_id).close()
        except Exception:  # closing what a full disk broke may fail too; the file is deleted next
            pass


def save_atomically(final, save, suffix):
    """Write `final` by calling save(temporary path), then rename it into place: a write cut
    short (a full disk, a kill) leaves the earlier complete file, never half of a new one under
    the final name. Does nothing if `save` wrote nothing (a checkpoint that was not better).
    An OSError is raised again naming `final`; h5py's own carry the errno only in their text."""
    final = Path(final)
    temp = final.with_name(f".{final.name}.{os.getpid()}.partial{suffix}")  # Keras insists on the suffix
    try:
        save(temp)
    except BaseException as error:
        _close_hdf5(temp)
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            code = error.errno or next((int(found) for found in re.findall(r"errno = (\d+)", str(error))), None)
            raise OSError(code or errno.EIO, os.strerror(code) if code else str(error), str(final)) from error
        raise
    if temp.exists():
        os.replace(temp, final)
