"""Writing an output directory so that nothing is lost: the one path every command that writes a directory takes
(`wemoe-convert`, `wemoe-tta`, `save_artifact`, the benchmarks).

- Checked before any work: the output is not a file, not the working directory or one of its parents, not an input
  or a parent of one; an existing output is replaced only with `overwrite`; its parent is writable.
- Locked for the whole run: an exclusive lock on the output's name (`.NAME.lock` beside it), so a second run writing
  the same output fails at once, naming the first.
- Staged beside the output (`.NAME.partial-...`), so the rename into place never crosses file systems. Staging
  directories left by killed runs are removed, with a warning, by the next run that takes the lock.
- Committed by renames only. A new output is renamed into place, failing if something appeared there meanwhile.
  An existing one is swapped with the staged one in a single atomic rename (Linux `renameat2(RENAME_EXCHANGE)`),
  then removed, so at every instant the name holds the old or the new complete output. Where the system has no such
  exchange, the old output is renamed aside just before the new one is renamed in.
- Permissions follow the umask, as for any file the user creates.
"""

import ctypes
import errno
import fcntl
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi

logger = logging.getLogger(__name__)


class OutputError(ValueError):
    """An output directory that cannot be written as asked; the message names it and says why."""


class OutputExistsError(OutputError):
    """An existing output that was not to be replaced. The message says how to allow it in the caller's terms:
    `overwrite=True` from Python; a command line names its flag with `message("--overwrite")`."""

    def __init__(self, target: str | os.PathLike):
        self.target = str(target)
        super().__init__(self.message("overwrite=True"))

    def message(self, option: str) -> str:
        return f"Output directory {self.target!r} already exists; pass {option} to replace it."


class OutputLockedError(OutputError):
    """Another run holds the lock on this output's name."""


def resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


def check_output_target(target: Path, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Every check that needs nothing but paths: made before a command loads anything."""
    real = resolved(target)
    if real.exists() and not real.is_dir():
        raise OutputError(f"Output {str(target)!r} exists and is not a directory; give the path of a directory.")
    if real.exists() and not overwrite:
        raise OutputExistsError(target)
    if real == real.parent:
        raise OutputError(f"Output {str(target)!r} is the file system's root.")
    cwd = resolved(os.getcwd())
    if cwd == real or cwd.is_relative_to(real):
        raise OutputError(
            f"Output {str(target)!r} is the working directory or contains it; replacing it would delete what you "
            "work in. Write the output somewhere else."
        )
    for source in inputs:
        if source is None:
            continue
        source_path = resolved(source)
        if source_path == real or source_path.is_relative_to(real):
            raise OutputError(
                f"Output {str(target)!r} is, or contains, the input {str(source)!r}; writing it would destroy what "
                "it is built from. Write the output somewhere else."
            )
        if source_path.is_dir() and real.is_relative_to(source_path):
            raise OutputError(
                f"Output {str(target)!r} is inside the input {str(source)!r}; a run must not write into the "
                "checkpoints and data it reads. Write the output somewhere else."
            )
    parent = nearest_existing_parent(real)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write output {str(target)!r}: directory {str(parent)!r} is not writable.")


def nearest_existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file_atomically(path: Path, data: bytes) -> None:
    """Replace one file by a rename, with the modes the umask gives (not the 0600 of a temporary file)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(data)
    try:
        os.chmod(handle.name, 0o666 & ~current_umask())
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def apply_umask(root: Path) -> None:
    """Give `root` and everything in it the modes a user's own new files get (safetensors and mkdtemp write 0600 /
    0700, which other users cannot read)."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            os.chmod(os.path.join(directory, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """Linux `renameat2`; False where the system or file system has no such call (the caller falls back)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(source), None, str(destination))


def rename_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`, which must not exist: fails, rather than merging, if something appeared."""
    if _renameat2(staging, target, _RENAME_NOREPLACE):
        return
    if target.exists():
        raise FileExistsError(errno.EEXIST, "appeared while this run was writing", str(target))
    os.rename(staging, target)


def swap_into_place(staging: Path, target: Path) -> Path:
    """Replace the directory `target` by `staging`; returns where the old directory now is (to be removed)."""
    if _renameat2(staging, target, _RENAME_EXCHANGE):
        return staging
    aside = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, aside)
    os.rename(staging, target)
    return aside


class OutputLock:
    """An exclusive `flock` on `.NAME.lock` beside an output, holding who holds it. Released (and the file removed)
    when the run ends; a killed run's lock is released by the kernel."""

    def __init__(self, target: Path):
        self.path = target.with_name(f".{target.name}.lock")
        self.handle = None

    def acquire(self, target: Path) -> None:
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise OutputLockedError(
                    f"Output {str(target)!r} is being written by another run ({holder}); its lock is "
                    f"{str(self.path)!r}. Wait for that run to finish, or write elsewhere."
                ) from None
            # The lock file may have been removed by the previous holder after we opened it: lock the live one.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        command = " ".join(os.path.basename(arg) if i == 0 else arg for i, arg in enumerate(sys.argv))
        handle.write(
            f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}"
        )
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            self.handle.close()
            self.handle = None


def remove_stale_staging(target: Path) -> None:
    """Remove what runs killed while writing `target` left beside it (only ever called under `target`'s lock)."""
    for pattern in (f".{target.name}.partial-*", f".{target.name}.old-*"):
        for stale in target.parent.glob(pattern):
            logger.warning("Removing %s, left by an interrupted run writing %s.", stale, target)
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def staged_output(
    target: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Lock `target`, yield an empty staging directory beside it, and, when the block ends without an error, put
    the staged directory in place of `target` by renames only. On an error the staging directory is removed and
    `target` is left as it was."""
    target = Path(target)
    check_output_target(target, overwrite, inputs)
    target = resolved(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(target)
    lock.acquire(target)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        remove_stale_staging(target)
        staging.mkdir()
        yield staging
        apply_umask(staging)
        if target.exists():
            if not overwrite:
                raise OutputError(f"Output directory {str(target)!r} appeared while this run was writing it.")
            if not target.is_dir():
                raise OutputError(f"Output {str(target)!r} is no longer a directory; nothing was replaced.")
            shutil.rmtree(swap_into_place(staging, target))
        else:
            rename_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.release()


def push_folder(folder: Path, repo_id: str, commit_message: str, *, private: bool = False) -> str:
    """Publish a finished output directory as the Hub model repo `repo_id` (created, `private` if asked, when it does
    not exist) in one commit: what `--push-to-hub` does in every command. Returns the commit's URL."""
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message)
    logger.info("Pushed %s to %s", folder, repo_id)
    return commit.commit_url


__all__ = [
    "OutputError",
    "OutputExistsError",
    "OutputLockedError",
    "check_output_target",
    "push_folder",
    "staged_output",
    "write_file_atomically",
]
