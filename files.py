"""Files that a crash, a second process or a planted link cannot damage: atomic writes, appends, the clean-up of what
a killed writer left behind, and locks. Nothing here writes through a symbolic link: a link where gptjax writes (in an
out_dir unpacked from someone else's archive, say) is refused with an error, never followed to its target.

    with atomic_write(path) as f:   # f writes to a temporary file beside path; path is replaced only when f is whole
        f.write(data)
    remove_stale_temporaries(folder)  # the temporary files of writers that died (kill -9, power cut)
    with locked(folder / ".lock", waiting="..."):   # one process at a time; a dead holder releases it at once
    with appending(path) as f:      # a log's new lines

A temporary file is named `.{name}.{pid}.part` after its writer's process id, so that a later process can tell a
file that is still being written from one whose writer is gone.
"""
import contextlib
import errno
import fcntl
import os
import re
import sys
from pathlib import Path

TEMPORARY = re.compile(r"^\..+\.(\d+)\.part$")


def temporary_path(path):
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.part")


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside path for writing; when the block ends without an error, flush it to the disk and
    rename it over path (then the rename itself). After an error path is as it was and the temporary file is gone. A
    failed write (a full disk, say) raises an OSError that names path."""
    path = Path(path)
    tmp = temporary_path(path)
    refuse_link(path)  # os.replace would not follow it, but a link there stands for someone else's file
    try:
        tmp.unlink(missing_ok=True)  # whatever a dead process of our pid, or anyone, left at this name
        with os.fdopen(open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise cannot_write(path, e, " (its previous version is intact)" if path.exists() else "") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def appending(path):
    """Open path (created if absent) to append text to it, never through a symbolic link; a failed write raises an
    OSError that names path."""
    path = Path(path)
    try:
        with os.fdopen(open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "a") as f:
            yield f
    except OSError as e:
        raise cannot_write(path, e) from None


def open_fd(path, flags):  # os.open that refuses a symbolic link at path (O_NOFOLLOW) with a message saying so
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_error(path) from None
        raise


def refuse_link(path):
    if Path(path).is_symlink():
        raise link_error(path)


def link_error(path):
    error = OSError(f"{path} is a symbolic link, which gptjax never writes through: remove it, or choose another "
                    f"folder")
    error.errno = errno.ELOOP
    return error


def cannot_write(path, error, note=""):  # an OSError whose one-line message names path and the system's reason
    out = OSError(f"cannot write {path}: {error.strerror or error}{note}")
    out.errno = error.errno  # kept for callers, but not in the message (OSError(errno, text) prints "[Errno N]")
    return out


def fsync_dir(folder):  # make a rename in folder durable; some file systems cannot, which is no error
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder):
    """Delete folder's temporary files (see atomic_write) whose writer process no longer runs."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        found = TEMPORARY.match(name)
        if found and not process_runs(int(found.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def process_runs(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def locked(path, waiting=None, busy=None):
    """Hold an exclusive lock on the file path (created if absent) for the block. The operating system releases it
    when its holder exits, however it exits. If another process holds it: with busy (a message), raise BlockingIOError
    with it at once; else print waiting (if given) to stderr and wait for it."""
    path = Path(path)
    with os.fdopen(open_fd(path, os.O_RDWR | os.O_CREAT), "r+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy is not None:
                f.seek(0)
                holder = f.read().strip()
                raise BlockingIOError(busy + (f" (process {holder})" if holder else "")) from None
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()


class Damaged(ValueError):
    """A file that fails its checks. The advice that ends the message depends on where the file came from: a
    downloaded release can be fetched again (load_encoder_hparams_and_params says so), a user's own file cannot."""
    def __init__(self, path, problem, advice="put back a good copy"):
        super().__init__(f"{path} is damaged ({problem}): {advice}")
        self.path, self.problem = path, problem
