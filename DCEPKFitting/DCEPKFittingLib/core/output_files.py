"""The one way the core writes files: staged, verified, then published atomically, all or none.

``OutputSet`` stages each output under a unique temporary name in its target's folder (created
exclusively, ``tempfile.mkstemp``), writes it, flushes it to disk (``fsync``, where a full disk
shows up at the latest) and verifies it: the size on disk against the bytes written and a
read-back checksum for files written here, or a check of the header against the data (and the
expected voxel count) for files a library writes by name (SimpleITK). Only when every output of
the set is staged and verified does ``commit`` publish them: ``os.link`` when nothing may be
overwritten (so a file that appeared meanwhile is never clobbered), ``os.replace`` otherwise, with
a hard-linked backup of each replaced file so that a failure half-way puts the earlier files back.
On any failure the temporary files are removed and the earlier outputs are left byte-identical;
an ``OSError`` (no space left, read-only folder, no permission) becomes a
:class:`DCEPKOutputError` that names the folder and what to do (``dcepk`` exits with status 2).

Temporary files are hidden and named ``.dcepk-tmp-<pid>-...``; those of a process that was killed
(SIGKILL cannot be caught) are removed by the next write into the same folder.

``check_targets`` runs before any computation: existing files, folders in the way and folders
that cannot be written into are refused before the user waits for a fit.
"""

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from .errors import DCEPKOutputError, setting

TEMP_PREFIX = ".dcepk-tmp-"
_TEMP_PATTERN = re.compile(r"^\.dcepk-tmp-(\d+)-")
_CHUNK = 1 << 22


class IncompleteWrite(OSError):
    """A staged file that reads back shorter or other than what was written: a writer that does not
    report its failures (SimpleITK's NIfTI writer on a full disk) wrote only part of it."""


def _free_space(folder: Path) -> str:
    probe = Path(os.path.abspath(folder))
    while not probe.exists() and probe.parent != probe:  # a folder this set created may be gone again
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:,.0f} MiB free"
    except OSError:
        return "free space unknown"


_FREE_SPACE = "free some space or choose another output folder"
_ELSEWHERE = "choose another output folder"
# errno: (what went wrong, what to do); {folder}, {name} and {free} are filled in
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the disk holding {folder} ({free}) while writing {name}", _FREE_SPACE),
    errno.EDQUOT: ("the disk quota of {folder} is used up ({free}) while writing {name}", _FREE_SPACE),
    errno.EFBIG: ("{name} would exceed the file size limit of {folder}", _ELSEWHERE + " (another file system)"),
    errno.EROFS: ("{folder} is on a read-only file system", _ELSEWHERE),
    errno.EACCES: ("no permission to write in {folder}", _ELSEWHERE + " or change its permissions"),
    errno.EPERM: ("no permission to write in {folder}", _ELSEWHERE + " or change its permissions"),
    errno.ENOENT: ("the folder {folder} does not exist", "create it or " + _ELSEWHERE),
    errno.ENAMETOOLONG: ("the file name {name} is too long for {folder}", "choose a shorter name or folder"),
}


def output_error(error: OSError, target: Path) -> DCEPKOutputError:
    """A clear message for an OSError met while writing ``target``."""
    folder, name = Path(target).parent, Path(target).name
    if isinstance(error, IncompleteWrite):
        what, advice = ("{name} was written incomplete ({detail}): the disk holding {folder} may be full ({free}) or "
                        "a file size limit reached", _FREE_SPACE)
    else:
        what, advice = _OS_ERRORS.get(getattr(error, "errno", None),
                                      ("cannot write {target} ({detail})", "check the disk and the output folder"))
    free = _free_space(folder) if "{free}" in what else ""
    what = what.format(folder=folder, name=name, free=free, target=target, detail=error.strerror or error)
    return DCEPKOutputError(f"{what}: {advice}; nothing was changed")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: alive
    return True


def remove_stale_temporaries(folder: Path) -> None:
    """Remove temporary files that killed DCEPK processes left in ``folder`` (POSIX only: on
    Windows os.kill cannot test a process without signalling it)."""
    if os.name != "posix":
        return
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMP_PATTERN.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            try:
                os.unlink(folder / name)
            except OSError:
                pass


def _writable_ancestor(folder: Path) -> Path:
    """The nearest existing ancestor of ``folder``, checked to be a folder we can create files in."""
    probe_in = folder
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise DCEPKOutputError(f"{probe_in} is a file, not a folder: choose another output folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=probe_in)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise output_error(error, probe_in / "output") from None
    return probe_in


def check_targets(targets: Iterable, overwrite: bool = False) -> List[Path]:
    """Refuse, before any work, targets that exist (unless ``overwrite``), are folders, or lie in a
    folder that cannot be written into. Returns the targets as Paths."""
    targets = [Path(t) for t in targets]
    for target in targets:
        if target.is_dir():
            raise DCEPKOutputError(f"{target} is a folder: give a file name")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        listed = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        raise DCEPKOutputError(
            f"{len(existing)} output file(s) already exist ({listed}): choose another output or pass "
            f"{setting('--overwrite', 'overwrite=True')} to replace them")
    for folder in sorted({t.parent for t in targets}):
        _writable_ancestor(folder)
    return targets


class StagedFile:
    """The file object a stream writer writes into: counts and hashes the bytes on their way out
    (the seam where tests inject a full disk)."""

    def __init__(self, raw, path: Path):
        self._raw = raw
        self.path = path
        self.bytes_written = 0
        self._digest = hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self._raw.write(view)
        if written is not None and written != len(view):
            raise OSError(errno.EIO, f"short write ({written} of {len(view)} bytes)")
        self.bytes_written += len(view)
        self._digest.update(view)
        return len(view)

    def digest(self) -> str:
        return self._digest.hexdigest()

    def flush(self) -> None:
        self._raw.flush()

    def tell(self) -> int:
        return self.bytes_written

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._raw.closed


def _fsync(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def sha256_of(path: Path) -> str:
    """The SHA-256 (hex) of a file's bytes, read in steps."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputSet:
    """Outputs of one command: ``add_stream`` / ``add_file`` stage and verify each, ``commit``
    publishes them all. Use as a context manager: leaving the block without ``commit`` (an error,
    Ctrl-C) discards what was staged and the folders the set created."""

    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite
        self._staged: List[tuple] = []       # (temporary, target)
        self._created_dirs: List[Path] = []
        self._swept: set = set()
        self.committed = False

    # -- staging
    def _folder(self, target: Path) -> None:
        folder = target.parent
        if not folder.exists():
            missing = []
            probe = folder
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise output_error(error, target) from None
            self._created_dirs.extend(reversed(missing))
        elif not folder.is_dir():
            raise DCEPKOutputError(f"{folder} is a file, not a folder: choose another output folder")
        if folder not in self._swept:
            remove_stale_temporaries(folder)
            self._swept.add(folder)

    def _temporary(self, target: Path):
        if target.is_dir():
            raise DCEPKOutputError(f"{target} is a folder: give a file name")
        if target.exists() and not self.overwrite:
            raise DCEPKOutputError(f"{target} already exists: choose another name or pass "
                                   f"{setting('--overwrite', 'overwrite=True')} to replace it")
        if any(staged_target == target for _, staged_target in self._staged):
            raise DCEPKOutputError(f"{target} is written twice by one command: give the outputs distinct names")
        self._folder(target)
        try:
            handle, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=f"-{target.name}",
                                            dir=target.parent)
        except OSError as error:
            raise output_error(error, target) from None
        temporary = Path(name)
        self._staged.append((temporary, target))
        _match_umask(handle)
        return handle, temporary

    def add_stream(self, target, write: Callable[[StagedFile], None],
                   verify: Optional[Callable[[Path], None]] = None) -> Path:
        """Stage ``target``: ``write(file)`` writes its bytes; verified by size and a read-back
        checksum, then by ``verify(temporary_path)`` if given."""
        target = Path(target)
        handle, temporary = self._temporary(target)
        with self._all_or_none(target):
            with open(handle, "wb") as raw:
                staged = StagedFile(raw, temporary)
                write(staged)
                _fsync(raw)
            size = temporary.stat().st_size
            if size != staged.bytes_written:
                raise IncompleteWrite(errno.EIO, f"{size:,} of {staged.bytes_written:,} bytes reached the disk")
            if sha256_of(temporary) != staged.digest():
                raise DCEPKOutputError(f"{target.name} read back differently from what was written: the disk "
                                       f"holding {target.parent} may be failing; nothing was changed")
            if verify is not None:
                verify(temporary)
        return target

    def add_file(self, target, write: Callable[[Path], None], verify: Callable[[Path], None]) -> Path:
        """Stage ``target`` for a library that writes by file name: ``write(temporary_path)``, then
        ``verify(temporary_path)`` (e.g. header against data size), which must raise if it is wrong.
        The temporary name ends with the target's name, so writers that pick the format by the
        extension (SimpleITK) write the right one."""
        target = Path(target)
        handle, temporary = self._temporary(target)
        os.close(handle)
        with self._all_or_none(target):
            write(temporary)
            with open(temporary, "rb+") as raw:
                os.fsync(raw.fileno())
            if temporary.stat().st_size == 0:
                raise IncompleteWrite(errno.EIO, "the file is empty")
            verify(temporary)
        return target

    @contextlib.contextmanager
    def _all_or_none(self, target: Path):
        """Any failure while staging ``target`` discards the whole set; an OSError is named."""
        try:
            yield
        except OSError as error:
            self.discard()
            raise output_error(error, target) from None
        except BaseException:
            self.discard()
            raise

    def add_text(self, target, text: str) -> Path:
        data = text.encode("utf-8")
        return self.add_stream(target, lambda handle: handle.write(data))

    # -- publishing
    def commit(self) -> List[Path]:
        """Publish every staged file (all or none); returns the targets."""
        published = []   # (target, backup or None, whether it existed before)
        try:
            for temporary, target in self._staged:
                existed = target.exists()
                published.append((target, self._publish(temporary, target), existed))
        except BaseException as error:
            _roll_back(published)
            self.discard()
            if isinstance(error, OSError):
                raise output_error(error, target) from None
            raise
        for target, backup, _ in published:
            if backup is not None:
                _unlink_quietly(backup)
        for folder in {target.parent for _, target in self._staged}:
            _fsync_folder(folder)
        self.committed = True
        targets = [target for _, target in self._staged]
        self._staged = []
        return targets

    def _publish(self, temporary: Path, target: Path) -> Optional[Path]:
        if self.overwrite:
            backup = _hard_link_backup(target)
            os.replace(temporary, target)
            return backup
        try:
            os.link(temporary, target)  # fails if the target appeared meanwhile: nothing is clobbered
        except FileExistsError:
            raise DCEPKOutputError(f"{target} appeared while writing: it was left as it is; choose another "
                                   "name") from None
        except OSError:
            if target.exists():
                raise DCEPKOutputError(f"{target} already exists: choose another name or pass "
                                       f"{setting('--overwrite', 'overwrite=True')}") from None
            os.replace(temporary, target)  # a file system without hard links
            return None
        os.unlink(temporary)
        return None

    def discard(self) -> None:
        """Remove what was staged and the folders this set created (when empty)."""
        for temporary, _ in self._staged:
            _unlink_quietly(temporary)
        self._staged = []
        for folder in reversed(self._created_dirs):
            try:
                folder.rmdir()
            except OSError:
                pass
        self._created_dirs = []

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if not self.committed:
            self.discard()


def _process_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _process_umask()  # read once, at import: os.umask is process-wide and not thread-safe


def _match_umask(handle: int) -> None:
    # mkstemp creates 0600; outputs get the permissions an ordinary new file would.
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)
    except (AttributeError, OSError):
        pass


def _hard_link_backup(target: Path) -> Optional[Path]:
    """A hidden hard link to the file about to be replaced, to put it back if publishing fails."""
    if not target.exists():
        return None
    for _ in range(5):
        backup = target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-old-{target.name}")
        try:
            os.link(target, backup)
            return backup
        except FileExistsError:
            continue
        except OSError:
            return None  # no hard links here: replaced without a way back
    return None


def _roll_back(published) -> None:
    for target, backup, existed in reversed(published):
        try:
            if backup is not None:
                os.replace(backup, target)
            elif not existed:
                os.unlink(target)
        except OSError:
            pass


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_folder(folder: Path) -> None:
    # Makes the new directory entries durable; not possible everywhere (Windows), hence best effort.
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_text_file(target, text: str, overwrite: bool = False) -> Path:
    """One text file (UTF-8), staged, verified and published."""
    with OutputSet(overwrite) as outputs:
        outputs.add_text(target, text)
        return outputs.commit()[0]
