"""
Crash-safe writing, and verified reading, of files and whole checkpoint directories.

The promise: an interrupted or failed save never costs the last good checkpoint, and a damaged file is
detected and named. How:
- one file: written to a temporary name in the same directory, flushed, fsynced, renamed into place, and the
  directory fsynced (a rename is atomic: readers see the old file or the new one, never half of one);
- a directory (a bundle): written as a whole into a hidden sibling `.NAME.saving-PID`, its manifest
  (names, sizes, xxh3-64 checksums and format version of every file) last, then swapped in for NAME. Until the swap the old
  NAME is untouched; during the swap it sits at `.NAME.previous-PID`. Readers that find NAME missing (a crash
  between the two renames) use the complete sibling, and the next save finishes the job;
- files in NAME that the new save does not replace (a legacy latest.pt, a user's notes) are carried over as
  hard links, with their manifest entries;
- reading: sizes are checked when a directory is opened, checksums when a file is read;
- one writer per directory: a run that may save into NAME holds an exclusive lock on `.NAME.lock` beside it
  (flock: the kernel releases it when the process dies, however it dies), so a second run refuses at start
  instead of clearing the first one's save in progress as a leftover.
"""

import atexit
import errno
import fcntl
import json
import mmap
import os
import shutil
import threading
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
import xxhash # xxh3-64: 22 GB/s here, against zlib.crc32's 4 GB/s; every load of a checkpoint hashes its files

from core.errors import ClearError

MANIFEST_FILE = 'manifest.json'
MANIFEST_VERSION = 2 # 1 had crc32 checksums, still verified when found
SAVING, PREVIOUS = '.saving-', '.previous-'


class CheckpointError(ClearError):
    """ a checkpoint that cannot be read or written: the message names the file, what was expected and what was found """


class DamagedError(CheckpointError):
    """ a file or directory that is not what its manifest says: damaged, truncated or never committed """


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChecksumWriter:
    """ a file object that passes writes through and keeps the checksum and size of what went by """

    def __init__(self, f):
        self.f, self.hash, self.size = f, xxhash.xxh3_64(), 0

    def write(self, data):
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


# checksum and size of the files this process has just written, by path, so a commit never reads them back
WRITTEN = {}


def atomic_write(path, write):
    """
    write(f) into a temporary file beside `path`, fsync it, rename it into place, fsync the directory.
    Inside a directory that is being committed (commit_directory) the file is written in place: that
    directory becomes visible as a whole, renamed and fsynced once, so a rename per file would only cost time.
    """
    path = Path(path)
    in_commit = SAVING in path.parent.name
    tmp = path if in_commit else path.with_name(f'.{path.name}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            checked = ChecksumWriter(f)
            write(checked)
            f.flush()
            os.fsync(f.fileno())
        if not in_commit:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not in_commit:
        fsync_dir(path.parent)
    WRITTEN[str(path)] = {'size': checked.size, 'xxh3_64': checked.hash.hexdigest()}


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + '\n').encode()))


def file_checksum(path, kind='xxh3_64'):
    """ the file's checksum, read through a memory map (no copies; the pages stay cached for the load after) """
    digest = xxhash.xxh3_64_hexdigest if kind == 'xxh3_64' else zlib.crc32 # crc32: manifests of version 1
    with open(path, 'rb') as f:
        if os.fstat(f.fileno()).st_size == 0:
            return digest(b'') # an empty file cannot be mapped
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            data.madvise(mmap.MADV_SEQUENTIAL)
            return digest(data)


# -----------------------------------------------------------------------------
# whole directories

def siblings(final_dir, marker):
    final_dir = Path(final_dir)
    return sorted(final_dir.parent.glob(f'.{final_dir.name}{marker}*')) if final_dir.parent.is_dir() else []


def read_manifest(directory):
    """ the manifest of a committed directory, or None when it has none (written before manifests, or by hand) """
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding='utf-8'))
        files = manifest['files'] if isinstance(manifest, dict) else None
    except (ValueError, UnicodeDecodeError, KeyError) as e:
        raise DamagedError(f'{path} is damaged: expected a JSON object with "files", could not read it ({e})') from None
    if not isinstance(files, dict):
        raise DamagedError(f'{path} is damaged: expected a JSON object with a "files" object, found {type(files).__name__}')
    for name, entry in files.items():
        # names and sizes come from a file: a name must stay inside the directory, a size must be a size
        if not is_plain_name(name):
            raise DamagedError(f'{path} is damaged: it lists {name!r}, which is not a plain file name inside the '
                               'checkpoint directory (it names a path); the checkpoint cannot be trusted')
        if not (isinstance(entry, dict) and type(entry.get('size')) is int and entry['size'] >= 0):
            raise DamagedError(f'{path} is damaged: the entry for {name!r} has no valid size (found {entry!r})')
    return manifest


def is_plain_name(name):
    """ a file name that stays inside its directory: no separators, not '', '.' or '..' """
    return (isinstance(name, str) and name not in ('', '.', '..') and not any(c in name for c in '/\\\0'))


def check_sizes(directory, editable=()):
    """
    Raise DamagedError unless every file the manifest lists is there with its size; returns the manifest.
    `editable` files (JSON a user may edit by hand) need only be there: their readers validate them.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, entry in (manifest or {}).get('files', {}).items():
        path = directory / name
        if not path.is_file():
            raise DamagedError(f'{path} is missing, but the manifest lists it: the checkpoint is incomplete')
        size = path.stat().st_size
        if size != entry['size'] and name not in editable:
            raise DamagedError(f'{path} has {size:,} bytes, the manifest says {entry["size"]:,}: truncated or damaged')
    return manifest


def verify_file(directory, name, manifest):
    """ raise DamagedError if `name`'s checksum is not the manifest's (no manifest, or not listed: nothing to check) """
    entry = (manifest or {}).get('files', {}).get(name)
    if entry is None:
        return
    path = Path(directory) / name
    kind = 'xxh3_64' if 'xxh3_64' in entry else 'crc32'
    if path.stat().st_size != entry['size'] or file_checksum(path, kind) != entry[kind]:
        raise DamagedError(f'{path} does not match its checksum in {MANIFEST_FILE}: the file is damaged '
                           '(a flipped bit, a partial copy); restore it from a backup or use an earlier checkpoint')


def complete(directory):
    try:
        return read_manifest(directory) is not None and check_sizes(directory) is not None
    except DamagedError:
        return False


def missing(final_dir):
    """ no directory, or an empty one """
    return not final_dir.exists() or (final_dir.is_dir() and not any(final_dir.iterdir()))


def interrupted_save(final_dir):
    """ the complete directory an interrupted commit left beside a missing final_dir, or None """
    for candidate in siblings(final_dir, SAVING) + siblings(final_dir, PREVIOUS):
        if complete(candidate):
            return candidate
    return None


def recover(final_dir):
    """ finish an interrupted commit (put its complete directory in place) and clear the leftovers """
    final_dir = Path(final_dir)
    if missing(final_dir):
        candidate = interrupted_save(final_dir)
        if candidate is not None:
            if final_dir.exists():
                final_dir.rmdir() # empty: made by a program that was about to save into it
            os.rename(candidate, final_dir)
            fsync_dir(final_dir.parent)
            print(f'recovered {final_dir} from an interrupted save ({candidate.name})')
    for leftover in siblings(final_dir, SAVING) + siblings(final_dir, PREVIOUS):
        shutil.rmtree(leftover, ignore_errors=True)


def carry_over(old_dir, new_dir, names):
    """ hard-link the entries of old_dir named in `names` into new_dir (no copy; the bytes are shared) """
    for name in names:
        source, target = Path(old_dir) / name, Path(new_dir) / name
        if source.is_dir():
            shutil.copytree(source, target, copy_function=os.link, symlinks=True)
        else:
            os.link(source, target)


# -----------------------------------------------------------------------------
# one writer per checkpoint directory

HELD = {} # lock file path -> (the open descriptor holding its lock, the pid that took it)


def lock_path(final_dir):
    final_dir = Path(final_dir)
    return final_dir.with_name(f'.{final_dir.name}.lock')


def lock_writer(final_dir):
    """
    Make this process final_dir's one writer, until unlock_writer or exit; True if this call took the lock, False if
    the process held it already. Another live process holding it is a CheckpointError naming its pid. A lock taken
    on a file that its holder removed meanwhile is no lock, so the file is checked to be the one locked.
    """
    final_dir, path = Path(final_dir), lock_path(final_dir)
    if str(path) in HELD:
        return False
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors='replace').strip() or 'unknown'
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise CheckpointError(f'{final_dir} is being written by another run (pid {holder}, holding {path}): two runs '
                                  'saving into one directory would undo each other\'s saves. Let it finish or stop it, '
                                  'or give this run another out_dir') from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd) # its last holder removed it as we opened it: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode())
    HELD[str(path)] = (fd, os.getpid())
    return True


def unlock_writer(final_dir):
    release_lock(str(lock_path(final_dir)))


def release_lock(path):
    fd, pid = HELD.pop(path, (None, None))
    if fd is None or pid != os.getpid(): # a forked child never releases its parent's lock
        return
    try:
        os.unlink(path) # while still locked: a process that opened it meanwhile finds it gone, and opens it again
    except OSError:
        pass
    os.close(fd)


@atexit.register
def release_writer_locks():
    for path in list(HELD):
        release_lock(path)


def commit_directory(final_dir, write_files, replaces=()):
    """
    Write final_dir as a whole: write_files(directory) writes the new files; entries of the old final_dir that
    are neither written nor named in `replaces` (names, or a test of a name) are carried over. The manifest is written last, then the new
    directory is swapped in. If anything fails, the old final_dir is as it was and the error says what failed.
    """
    final_dir = Path(final_dir)
    if final_dir.exists() and not final_dir.is_dir():
        raise CheckpointError(f'{final_dir} is a file: a checkpoint is written as a directory there; name a directory')
    taken = lock_writer(final_dir) # before recover(): the leftovers it clears are then no live writer's
    try:
        return commit_locked(final_dir, write_files, replaces)
    finally:
        if taken: # a one-off save (convert, a test); a training run holds its lock until it exits
            unlock_writer(final_dir)


def commit_locked(final_dir, write_files, replaces):
    finish_cleanups() # the last commit's replaced directory has the name this one's will take: let it go first
    recover(final_dir)
    tmp = final_dir.with_name(f'.{final_dir.name}{SAVING}{os.getpid()}')
    old = final_dir.with_name(f'.{final_dir.name}{PREVIOUS}{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_files(tmp)
        written = {p.name for p in tmp.iterdir()}
        files = {name: WRITTEN.pop(str(tmp / name), None) or {'size': (tmp / name).stat().st_size,
                                                             'xxh3_64': file_checksum(tmp / name)}
                 for name in sorted(written) if (tmp / name).is_file()}
        if final_dir.exists():
            replaced = replaces if callable(replaces) else replaces.__contains__
            kept = sorted(p.name for p in final_dir.iterdir()
                          if p.name not in written and not replaced(p.name) and p.name != MANIFEST_FILE)
            carry_over(final_dir, tmp, kept)
            old_entries = (read_manifest(final_dir) or {}).get('files', {})
            files.update({name: old_entries[name] for name in kept if name in old_entries})
        write_json(tmp / MANIFEST_FILE, {'format_version': MANIFEST_VERSION, 'files': files})
        fsync_dir(tmp)
        if final_dir.exists():
            os.rename(final_dir, old)
        os.rename(tmp, final_dir) # the commit point
    except BaseException:
        if old.exists() and not final_dir.exists():
            os.rename(old, final_dir) # the swap itself failed: put the last good directory back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fsync_dir(final_dir.parent) # committed; this makes the rename itself durable
    finally:
        # freeing the old files takes a while (0.2 s for GPT-2's bundle): let the caller go on. Not a daemon
        # thread, so the program waits for it at exit; a leftover from a kill is cleared by the next save
        cleanup = threading.Thread(target=shutil.rmtree, args=(old, True))
        cleanup.start()
        CLEANUPS.append(cleanup)
    return final_dir


CLEANUPS = [] # the threads freeing replaced directories


def finish_cleanups():
    """ wait until the directories replaced by commits are gone """
    while CLEANUPS:
        CLEANUPS.pop().join()


# -----------------------------------------------------------------------------
# tensor files (torch and safetensors) and JSON files

def read_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f'{path} is missing: a checkpoint bundle needs it') from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{path} is not valid JSON ({e}); expected the JSON object this toolkit writes') from None


def save_tensors(path, obj, deferred=()):
    """
    torch.save, crash-safe, without the zip format's CRC32 of every record: it made writes 1.3x slower here, and the
    manifest's xxh3 checksum covers every byte anyway (torch.load doesn't need the CRC; unzip would warn).
    deferred: (tensor of obj, job that fills it) pairs, e.g. LoRA merges: they run in a thread while the file is
    written, and a tensor's bytes are written once its job is done, so the file is the one torch.save writes after
    them. (Without a CRC the zip writer reads a tensor's bytes only when it writes them; torch writes the tensors in
    the dict's order, the order the jobs run in.)
    """
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        atomic_write(path, lambda f: save_while_computing(obj, deferred, f) if deferred else torch.save(obj, f))
    finally:
        torch.serialization.set_crc32_options(previous)


def save_while_computing(obj, deferred, f):
    done = [threading.Event() for _ in deferred]
    errors = []
    def compute():
        for (_, job), event in zip(deferred, done):
            try:
                if not errors:
                    job()
            except BaseException as e: # raised below, after torch.save: the file is then discarded
                errors.append(e)
            event.set()
    thread = threading.Thread(target=compute, name=f'merge for {f}')
    thread.start()
    try:
        torch.save(obj, HoldBack(f, [(t.data_ptr(), t.data_ptr() + t.nbytes, e) for (t, _), e in zip(deferred, done)]))
    finally:
        thread.join()
    if errors:
        raise errors[0]


class HoldBack:
    """ a file for torch.save: a write of bytes that lie in a pending tensor waits until its job is done """

    def __init__(self, f, pending):
        self.f, self.pending = f, pending # [(start address, end address, done event)]

    def write(self, data):
        view = memoryview(data)
        if view.nbytes and self.pending:
            start = np.frombuffer(view.cast('B'), np.uint8).ctypes.data
            for lo, hi, done in self.pending:
                if lo < start + view.nbytes and start < hi:
                    done.wait()
        return self.f.write(data)

    def flush(self):
        return self.f.flush() if hasattr(self.f, 'flush') else None


def load_tensors(path, map_location='cpu', mmap=False):
    # mmap: tensors are read from disk when first touched (a large optimizer state that is never used, never is)
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and 'mmap can only be used' in str(e)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True) # an old-style (non-zip) file
    except pickle.UnpicklingError as e:
        # torch reports both a class reference (unsafe to load) and plain garbage through this error
        reference = [line.strip() for line in str(e).splitlines() if 'GLOBAL' in line or 'global' in line][:1]
        if not reference: # (a text file reaches here too: torch reads any first byte as a pickle opcode)
            raise CheckpointError(f'{path} is not a PyTorch checkpoint: {what_file_holds(path)}') from None
        raise CheckpointError(
            f'{path} holds more than tensors and plain containers, so it was not loaded: unpickling it could run '
            f'code. torch said: {reference[0]}') from None
    except FileNotFoundError:
        raise CheckpointError(f'{path} does not exist') from None
    except IsADirectoryError:
        raise CheckpointError(f'{path} is a directory, expected a PyTorch checkpoint file') from None
    except Exception as e: # truncated or damaged zip, empty file, a text file
        raise CheckpointError(f'{path} could not be read as a PyTorch tensor file: {what_file_holds(path)} '
                              f'(torch said {type(e).__name__}: {e})') from None


def read_safetensors(path):
    """ a safetensors file (tensors only: nothing to unpickle), or a CheckpointError naming it """
    try:
        return load_file(path)
    except Exception as e: # safetensors' own error for a truncated or damaged header
        raise CheckpointError(f'{path} could not be read as a safetensors file (truncated or damaged?): {e}') from None


def save_safetensors(tensors, path):
    save_file(tensors, path, metadata={'format': 'pt'})
    umask = os.umask(0) # safetensors creates its file readable by its owner only; others' files follow the umask
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def what_file_holds(path):
    """ a few words on a file that torch could not read, from its first bytes """
    with open(path, 'rb') as f:
        head = f.read(16)
    if not head:
        return 'the file is empty'
    if head.startswith(b'PK\x03\x04'):
        return 'it is a zip archive, but not a complete PyTorch one (truncated or damaged)'
    if head[:1] == b'\x80':
        return 'it is a pickle stream, truncated or damaged'
    return f'it starts with {head!r}: not a zip archive or a pickle, so not a PyTorch file'


def load_verified(directory, name, manifest):
    """ a tensor file of a committed directory: its checksum first (a damaged file is named, never unpickled),
    then mapped (read by the page, when touched; the pages the checksum read are still cached) """
    verify_file(directory, name, manifest)
    return load_tensors(os.path.join(directory, name), mmap=True)
