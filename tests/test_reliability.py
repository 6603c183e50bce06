"""
Fault injection: the reliability and security promises, tried on purpose.
- kill -9 before each of the 16 write steps of a save (in the middle of each tensor file), and at 4 random moments:
  the checkpoint is exactly the old state before the old directory is moved aside, exactly the new one after;
- an OSError (disk full) at each of the 20 write steps of a save: the previous checkpoint stays intact until the
  commit point, the new one after it, and the error says what failed;
- one file written alone: never in place, so a failed write leaves the old file;
- damaged inputs: truncated, flipped, empty, garbage, missing, another architecture, a tokenizer that doesn't fit;
- hostile pickles at every loading entry point: refused, their code never runs;
- a crash mid-save in train.py: the resume continues from a complete checkpoint;
- a second run saving into the directory a run is writing: refused at start, the first run unharmed.
Each fault is recorded with whether data was lost (checked, not assumed: the checkpoint that survived is neither
the previous complete one nor the new one, or the input a tool refused was changed); conftest.py prints the table.
"""

import errno
import hashlib
import json
import os
import pickle
import random
import signal
import stat
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from model import GPT, GPTConfig, CheckpointMismatchError
from core.checkpoint import CheckpointError, read_checkpoint, save_bundle
from core.nanogpt import read_meta_pkl
from core.commit import MANIFEST_FILE, SAVING, PREVIOUS, atomic_write, file_checksum, verify_file
import core.bundle
import core.commit
from load_checkpoint_helper import load_pretrained_checkpoint
from tests.helpers import REPO, TINY_CONFIG, fill_with_step, make_nanogpt_checkpoint, run_script, run_train

TINY = dict(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)
CHARS = [chr(ord('a') + i) for i in range(26)] + list(' .,!?\n')


def state_model(step, **config):
    """ a model and optimizer whose every tensor says which step it is: a mix of two saves is visible """
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **config}))
    model.tokenizer_spec = {'token_kind': 'char', 'chars': CHARS[:TINY['vocab_size']]}
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.99), 'cpu')
    ids = torch.zeros(1, 4, dtype=torch.long)
    model(ids, ids)[1].backward()
    optimizer.step()
    fill_with_step(model, optimizer, step)
    return model, optimizer


def save_state(directory, step, **config):
    model, optimizer = state_model(step, **config)
    return save_bundle(directory, model, step, optimizer)


def saved_step(directory):
    """ the step a checkpoint holds, after checking every file against its manifest and every tensor against it """
    ck = read_checkpoint(directory)
    for name in ck.manifest['files']:
        verify_file(ck.path, name, ck.manifest)
    step = ck.step
    for k, v in ck.weights().items():
        assert torch.all(v == step), f'{k} is not from step {step}: a mix of two saves'
    for name, s in ck.optimizer_state()['state'].items():
        assert torch.all(s['exp_avg'] == step), f'optimizer state of {name} is not from step {step}'
    return step


def surviving_step(directory):
    """ saved_step, or None when what is there is no complete checkpoint of one step: the data was lost """
    try:
        return saved_step(directory)
    except (AssertionError, CheckpointError, CheckpointMismatchError):
        return None


def digest(path):
    """ the bytes of a file, or of every file under a directory, as {relative name: sha256} ({} if nothing is there) """
    files = sorted(p for p in path.rglob('*') if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# -----------------------------------------------------------------------------
# the write steps of a save, counted and named

WRITE_PRIMITIVES = [(torch, 'save'), (core.bundle, 'write_json'), (core.commit, 'write_json'), (os, 'fsync'),
                    (os, 'rename'), (os, 'replace'), (os, 'link'), (os, 'mkdir')]


class WriteSteps:
    """
    Wraps every write primitive and records each call in `steps` (an fsync as 'os.fsync(file)' or 'os.fsync(dir)',
    with the inode of each directory synced in `synced_dirs`). At call number `at`, fault(step, function, args)
    runs first: it raises (disk full) or pauses (to be killed). setattr: monkeypatch's, or the builtin.
    """

    def __init__(self, setattr, at=None, fault=None):
        self.steps, self.synced_dirs, self.at, self.fault = [], [], at, fault
        for owner, name in WRITE_PRIMITIVES:
            setattr(owner, name, self.wrap(getattr(owner, name), f'{owner.__name__}.{name}'))

    def wrap(self, function, name):
        def call(*args, **kwargs):
            step = name
            if name == 'os.fsync': # a file's data, or a directory's entries: which one matters
                info = os.fstat(args[0])
                step = 'os.fsync(dir)' if stat.S_ISDIR(info.st_mode) else 'os.fsync(file)'
                self.synced_dirs += [info.st_ino] if stat.S_ISDIR(info.st_mode) else []
            self.steps.append(step)
            if len(self.steps) == self.at:
                self.fault(step, function, args)
            return function(*args, **kwargs)
        return call


def save_steps(writers):
    """
    The write steps of one save_bundle over an existing checkpoint, as core/commit.py takes them, for files written
    by `writers` in order: the parent made (it exists: Path.mkdir(exist_ok=True) ignores the error) and the hidden
    new directory; each file written and fsynced in it (no rename per file: the directory is renamed as a whole),
    the manifest last; the new directory fsynced, the old one moved aside, the new one renamed into place (the
    commit point), the parent fsynced (the rename made durable).
    """
    steps = ['os.mkdir', 'os.mkdir']
    for writer in writers + ['core.commit.write_json']:
        steps += [writer, 'os.fsync(file)']
    return steps + ['os.fsync(dir)', 'os.rename', 'os.rename', 'os.fsync(dir)']


# -----------------------------------------------------------------------------
# kill -9 during a save

KILLED_SAVER = '''
import io, sys, time, torch
from model import GPT, GPTConfig
from core.checkpoint import save_bundle
from tests.helpers import fill_with_step
from tests.test_reliability import WriteSteps
directory, step, pause_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def pause(name, function, args):
    if name == 'torch.save': # stop in the middle of the file, not between two files
        data = io.BytesIO()
        function(args[0], data)
        args[1].write(data.getvalue()[:len(data.getvalue()) // 2])
        args[1].flush()
    print('paused before', name, flush=True)
    time.sleep(600)
model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256))
optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.99), 'cpu')
for p in model.parameters(): # the state one AdamW step leaves, without running one (seconds, 20 times over)
    optimizer.state[p] = {'step': torch.tensor(1.0), 'exp_avg': torch.zeros_like(p), 'exp_avg_sq': torch.zeros_like(p)}
WriteSteps(setattr, pause_at, pause) # pause_at counts the write steps from the first save on; 0: never
while True:
    fill_with_step(model, optimizer, step)
    print('saving', step, flush=True)
    t0 = time.time()
    save_bundle(directory, model, step, optimizer)
    print('saved', step, round(time.time() - t0, 4), flush=True)
    step += 1
'''
# what that save writes (no tokenizer, no adapters): model.pt, config.json, optimizer.pt, training_state.json
KILLED_SAVE_STEPS = save_steps(['torch.save', 'core.bundle.write_json', 'torch.save', 'core.bundle.write_json'])


def next_line(proc, word):
    while not (line := proc.stdout.readline()).startswith(word):
        assert line, f'the saving process ended before printing {word!r}'
    return line


def test_kill_during_save_leaves_old_or_new_state(tmp_path, record_fault):
    directory = tmp_path / 'ckpt'
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    rng = random.Random(1234)
    save_time, last = 0.3, 0
    # a reader finds the new state once the old directory has been moved aside (the complete new one is used then)
    new_from = KILLED_SAVE_STEPS.index('os.rename') + 2 # the step number of the second rename
    assert len(KILLED_SAVE_STEPS) == 16 and KILLED_SAVE_STEPS[new_from - 1] == 'os.rename'
    # trial by trial: k > 0 pauses the save before its write step k and is killed there; 0 is killed at a random
    # moment of a save, or just after it (the first one commits a checkpoint first, timing it)
    schedule = [0] + list(range(1, len(KILLED_SAVE_STEPS) + 1)) + [0, 0, 0]
    outcomes = Counter()
    for pause_at in schedule:
        proc = subprocess.Popen([sys.executable, '-c', KILLED_SAVER, str(directory), str(last + 1), str(pause_at)],
                                stdout=subprocess.PIPE, text=True, env=env)
        in_flight = int(next_line(proc, 'saving').split()[1]) # this save starts now
        if last == 0:
            saved = next_line(proc, 'saved').split()
            save_time, last = float(saved[2]), int(saved[1])
            in_flight = int(next_line(proc, 'saving').split()[1])
        if pause_at:
            paused = next_line(proc, 'paused').split()[-1]
            assert paused == KILLED_SAVE_STEPS[pause_at - 1], (pause_at, paused)
        else:
            time.sleep(rng.uniform(0, 1.5 * save_time)) # anywhere in the save, or just after it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the saves the child reported complete before it died; the one after may have committed unreported
        done = max([int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith('saved')],
                   default=last)
        proc.stdout.close()
        step = surviving_step(directory)
        lost = step not in (done, done + 1) # neither the last complete checkpoint nor the one after it
        how = 'killed before a write step' if pause_at else 'killed at a random moment'
        outcome = f"{how}, {'new' if step >= in_flight else 'previous'} intact"
        record_fault('kill -9 during save', outcome, lost=lost)
        assert not lost, f'after a kill the checkpoint holds step {step}, expected {done} or {done + 1}'
        if pause_at:
            expected = in_flight if pause_at >= new_from else in_flight - 1
            assert step == expected, f'killed before write step {pause_at} ({paused}): step {step}, expected {expected}'
        outcomes[outcome] += 1
        if not directory.exists(): # killed between the two renames: finish that commit as the next save would,
            core.commit.recover(directory) # so that every save takes the same write steps
        last = step
    # both kinds of outcome, from the kill points that decide them
    assert outcomes['killed before a write step, previous intact'] == new_from - 1
    assert outcomes['killed before a write step, new intact'] == len(KILLED_SAVE_STEPS) - new_from + 1


def test_a_second_writer_of_a_checkpoint_directory_is_refused_and_the_first_run_loses_nothing(tmp_path, record_fault):
    # two runs with one out_dir (an easy slip with job scripts): the second used to clear the first one's save in
    # progress as a leftover, killing it. Now the first run holds the directory's lock and the second refuses at start
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    first = subprocess.Popen([sys.executable, str(REPO / 'train.py'), TINY_CONFIG, '--out_dir', 'out', '--max_iters',
                              '100000', '--eval_interval', '20'], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    next_line(first, 'saving checkpoint') # it has saved once; more saves follow while the others try
    code, out = run_train(tmp_path, '--out_dir', 'out', '--max_iters', 10, ok=False)
    assert code == 1 and 'Traceback' not in out and f'out is being written by another run (pid {first.pid}' in out, out
    # under torchrun too: process 0 names the holder, the others stop beside it (they used to fail in a collective)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(REPO / 'train.py'), TINY_CONFIG, '--out_dir', 'out', '--max_iters', '10'], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and f'out is being written by another run (pid {first.pid}' in out, out
    assert '[rank1]' not in out and 'train.py", line' not in out, out # no traceback from train.py
    save_state(tmp_path / 'other', 1) # and a tool that writes there: another checkpoint exported into it
    code, out = run_script('convert_checkpoints.py', 'other', '--to', 'bundle', 'out', '--force', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'being written by another run' in out, out
    next_line(first, 'saving checkpoint') # and it goes on saving; then Ctrl-C
    first.send_signal(signal.SIGINT)
    rest = first.communicate(timeout=120)[0]
    ck = read_checkpoint(tmp_path / 'out')
    for name in ck.manifest['files']: # every file of the last save as committed
        verify_file(ck.path, name, ck.manifest)
    lost = first.returncode != 130 or f'step {ck.step}' not in rest or ck.step < 40
    record_fault('a second writer of the same directory', 'refused at start; the first run finished', lost=lost)
    assert not lost, rest[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['other', 'out'], 'a lock file or a leftover stayed behind'


def test_reader_uses_a_complete_interrupted_save(tmp_path):
    directory = tmp_path / 'ckpt'
    save_state(directory, 1)
    save_state(tmp_path / 'new', 2)
    # what a crash between the two renames of a commit leaves: the old directory aside, the new one not yet in place
    os.rename(directory, tmp_path / f'.ckpt{PREVIOUS}1')
    os.rename(tmp_path / 'new', tmp_path / f'.ckpt{SAVING}1')
    assert saved_step(directory) == 2 # the new one is complete: the commit had passed its last write
    truncate(tmp_path / f'.ckpt{SAVING}1' / 'model.pt') # unless its data did not reach the disk: then the old one
    assert saved_step(directory) == 1
    core.commit.recover(directory) # what the next save does first
    assert saved_step(directory) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']


def test_an_empty_directory_where_the_checkpoint_goes_does_not_block_recovery(tmp_path):
    directory = tmp_path / 'ckpt'
    save_state(tmp_path / 'new', 2)
    os.rename(tmp_path / 'new', tmp_path / f'.ckpt{SAVING}1') # a crash after the new directory was complete
    directory.mkdir() # made, empty, by a program about to save there
    core.commit.recover(directory)
    assert saved_step(directory) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ['ckpt']


# -----------------------------------------------------------------------------
# an OSError at each write step

def disk_full(step, function, args):
    raise OSError(errno.ENOSPC, f'No space left on device (injected in {step})')


def test_disk_full_at_each_write_step(tmp_path, monkeypatch, record_fault):
    directory = tmp_path / 'ckpt'
    model, optimizer = state_model(2, attn_lora_rank=2) # the new save also writes adapter.pt
    save_state(tmp_path / 'new', 1)
    with monkeypatch.context() as m:
        counter = WriteSteps(m.setattr)
        save_bundle(tmp_path / 'new', model, 2, optimizer) # over an existing checkpoint, like the real ones
    # model.pt, config.json, tokenizer.json, adapter.pt, optimizer.pt, training_state.json
    writers = ['torch.save', 'core.bundle.write_json', 'core.bundle.write_json', 'torch.save', 'torch.save',
               'core.bundle.write_json']
    steps = save_steps(writers)
    assert counter.steps == steps and len(steps) == 20
    # the directories synced: the new one (before it is renamed in, so its entries are durable), then the parent
    assert counter.synced_dirs == [(tmp_path / 'new').stat().st_ino, tmp_path.stat().st_ino]
    new_files = digest(tmp_path / 'new') # a complete save of step 2: what "the new state" means byte for byte
    commit = len(steps) - 1 # the rename of the new directory into place
    outcomes = Counter()
    for fail_at in range(1, len(steps) + 1):
        save_state(directory, 1) # the last good checkpoint
        with monkeypatch.context() as m:
            fault = WriteSteps(m.setattr, fail_at, disk_full)
            try:
                save_bundle(directory, model, 2, optimizer)
                raised = None
            except CheckpointError as e:
                raised = str(e)
        core.commit.finish_cleanups()
        leftovers = [p.name for p in tmp_path.iterdir() if SAVING in p.name or PREVIOUS in p.name]
        failed_in = fault.steps[fail_at - 1]
        survivor = 'new' if digest(directory) == new_files else 'previous' if surviving_step(directory) == 1 else None
        lost = survivor is None
        if fail_at == 1: # the parent's mkdir: the parent exists, and Path.mkdir(exist_ok=True) ignores the error
            outcome, expected = 'new state complete', ('new', None)
        elif fail_at > commit: # after the commit point: the new checkpoint is complete, and the error says so
            outcome, expected = 'error after commit, new intact', ('new', 'raised')
        else:
            outcome, expected = 'error, previous intact', ('previous', 'raised')
        record_fault('OSError at each write step', outcome, lost=lost)
        assert not lost, f'failure at step {fail_at} ({failed_in}) lost the checkpoint'
        assert (survivor, 'raised' if raised else None) == expected, (fail_at, failed_in, survivor, raised)
        if raised:
            assert f'No space left on device (injected in {failed_in})' in raised and str(directory) in raised
        assert leftovers == [], leftovers
        outcomes[outcome] += 1
    assert outcomes == {'error, previous intact': commit - 1, 'error after commit, new intact': 1,
                        'new state complete': 1}


# -----------------------------------------------------------------------------
# one file written alone (atomic_write outside a directory commit)

def test_single_file_is_written_beside_and_renamed_into_place(tmp_path, monkeypatch):
    path = tmp_path / 'notes.json'
    path.write_text('old')
    def fail_midway(f):
        f.write(b'{"new": ')
        raise OSError(errno.ENOSPC, 'No space left on device')
    with pytest.raises(OSError):
        atomic_write(path, fail_midway)
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['notes.json'] # the old file, no temporary left
    with monkeypatch.context() as m:
        counter = WriteSteps(m.setattr)
        core.commit.write_json(path, {'new': 1})
    # the temporary file's data made durable, renamed over the old file, the directory entry made durable
    assert counter.steps == ['core.commit.write_json', 'os.fsync(file)', 'os.replace', 'os.fsync(dir)']
    assert counter.synced_dirs == [tmp_path.stat().st_ino]
    assert json.loads(path.read_text()) == {'new': 1} and os.listdir(tmp_path) == ['notes.json']


def test_files_beside_a_bundle_are_carried_over(tmp_path):
    """ a save replaces what it writes; other files in the directory stay, as hard links, with their manifest
    entries: a user's notes, a legacy latest.pt, the bundle files a weights-only save (GPT.save) leaves """
    directory = tmp_path / 'ckpt'
    save_state(directory, 1)
    (directory / 'notes.txt').write_text('lr 1e-3 was too high')
    save_state(directory, 2)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())['files']
    inodes = {p.name: p.stat().st_ino for p in directory.iterdir() if p.name not in ('model.pt', MANIFEST_FILE)}
    state_model(3)[0].save(directory) # model.pt only
    assert (directory / 'notes.txt').read_text() == 'lr 1e-3 was too high' and read_checkpoint(directory).step == 2
    assert {name: (directory / name).stat().st_ino for name in inodes} == inodes # hard links: never copied
    carried = json.loads((directory / MANIFEST_FILE).read_text())['files']
    del carried['model.pt'], manifest['model.pt']
    assert carried == manifest
    flip_byte(directory / 'optimizer.pt', 0.7) # still verified against the entry it was saved with
    with pytest.raises(CheckpointError, match='optimizer.pt does not match its checksum'):
        read_checkpoint(directory).optimizer_state()


# -----------------------------------------------------------------------------
# damaged inputs

def flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGES = {
    'truncated model.pt': (lambda d: truncate(d / 'model.pt'), 'model.pt has'),
    'truncated optimizer.pt': (lambda d: truncate(d / 'optimizer.pt'), 'optimizer.pt has'),
    'flipped byte in model.pt': (lambda d: flip_byte(d / 'model.pt'), 'model.pt does not match its checksum'),
    'flipped byte in optimizer.pt': (lambda d: flip_byte(d / 'optimizer.pt', 0.7), 'optimizer.pt does not match its checksum'),
    'empty model.pt': (lambda d: (d / 'model.pt').write_bytes(b''), 'model.pt has 0 bytes'),
    'garbage config.json': (lambda d: (d / 'config.json').write_text('{"n_layer": 2, "n_'), 'config.json is not valid JSON'),
    'garbage training_state.json': (lambda d: (d / 'training_state.json').write_text('\x00\x01'), 'training_state.json is not valid JSON'),
    'garbage manifest.json': (lambda d: (d / MANIFEST_FILE).write_text('[1, 2'), 'manifest.json is damaged'),
    'model.pt missing': (lambda d: (d / 'model.pt').unlink(), 'model.pt is missing'),
    'config.json missing': (lambda d: (d / 'config.json').unlink(), 'config.json is missing'),
    'config of another architecture': (
        lambda d: (d / 'config.json').write_text(json.dumps({**json.loads((d / 'config.json').read_text()), 'n_embd': 32})),
        'config.json does not describe its weights: it says n_embd 32 (the weights have 16)'),
    'config field of the wrong type': (
        lambda d: (d / 'config.json').write_text(json.dumps({**json.loads((d / 'config.json').read_text()), 'n_layer': 'two'})),
        "field 'n_layer' should be a int"),
    'tokenizer larger than the model': (
        lambda d: (d / 'tokenizer.json').write_text(json.dumps({'token_kind': 'char', 'chars': CHARS + ['@', '#']})),
        'does not belong to these weights'),
    'no manifest, truncated model.pt': (lambda d: ((d / MANIFEST_FILE).unlink(), truncate(d / 'model.pt')),
                                        'model.pt could not be read'),
}


def crc32_manifest(directory):
    """ the manifest as version 1 wrote it: crc32 checksums (still verified when found) """
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest['format_version'] = 1
    for name, entry in manifest['files'].items():
        manifest['files'][name] = {'size': entry['size'], 'crc32': file_checksum(directory / name, 'crc32')}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


DAMAGES['flipped byte, version-1 manifest'] = (lambda d: (crc32_manifest(d), flip_byte(d / 'model.pt')),
                                               'model.pt does not match its checksum')


def test_version_1_manifest_is_verified(tmp_path):
    save_state(tmp_path, 3)
    crc32_manifest(tmp_path)
    assert saved_step(tmp_path) == 3 # every file checked against its crc32


def load_everything(directory):
    ck = read_checkpoint(directory)
    ck.build_model()
    ck.optimizer_state()


@pytest.mark.parametrize('damage', list(DAMAGES))
def test_damaged_bundle_is_named_and_refused(tmp_path, damage, record_fault):
    directory = tmp_path / 'ckpt'
    save_state(directory, 3)
    corrupt, expected = DAMAGES[damage]
    corrupt(directory)
    before = digest(directory)
    with pytest.raises((CheckpointError, CheckpointMismatchError)) as err:
        load_everything(directory)
    lost = digest(directory) != before # a reader never "repairs" or rewrites what it refuses
    record_fault('damaged input', 'named and refused', lost=lost)
    assert expected in str(err.value) and not lost, str(err.value)


def test_damaged_inputs_through_the_command_line(tmp_path, record_fault):
    save_state(tmp_path / 'ckpt', 3)
    flip_byte(tmp_path / 'ckpt' / 'model.pt')
    before = digest(tmp_path / 'ckpt')
    code, out = run_script('generate.py', '--checkpoint', 'ckpt', '--max_new_tokens', 2, cwd=tmp_path, ok=False)
    assert code == 1 and 'model.pt does not match its checksum' in out and 'Traceback' not in out
    code, out = run_script('generate.py', '--checkpoint', 'ckpt', '--max_new_tokens', 2, '--debug', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' in out # only when asked
    record_fault('damaged input', 'named and refused', lost=digest(tmp_path / 'ckpt') != before)
    assert digest(tmp_path / 'ckpt') == before
    legacy = make_nanogpt_checkpoint(tmp_path / 'n', CHARS)[0]
    truncate(legacy)
    before = digest(legacy.parent)
    commands = [('inspect_model.py', ['--checkpoint', legacy]), ('convert_checkpoints.py', [legacy]),
                ('test_checkpoint_loading.py', [legacy]), ('train.py', [TINY_CONFIG, '--resume_from', legacy])]
    for script, args in commands:
        code, out = run_script(script, *args, cwd=tmp_path, ok=False)
        lost = digest(legacy.parent) != before # nothing written over or beside the file it refused
        record_fault('damaged input', 'named and refused', lost=lost)
        assert code == 1 and f'{legacy} ' in out and 'truncated or damaged' in out, (script, out)
        assert 'Traceback' not in out, (script, out)
        assert not lost, script


# -----------------------------------------------------------------------------
# hostile pickles

class Payload:
    """ unpickling this runs a command that creates the marker file """

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def hostile_bundle(directory, name, payload):
    """ a real bundle with one file replaced by a hostile pickle, its manifest entry updated to match """
    save_state(directory, 4, attn_lora_rank=2)
    torch.save({'x': payload}, directory / name)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest['files'][name] = {'size': (directory / name).stat().st_size, 'xxh3_64': file_checksum(directory / name)}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory


def test_hostile_pickles_never_run(tmp_path, record_fault):
    marker = tmp_path / 'marker'
    payload = Payload(marker)
    pickle.loads(pickle.dumps(payload)) # the check can fail: unpickled without the guards, the payload runs
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / 'evil.pt'
    torch.save({'model': {'x': payload}, 'model_args': {}, 'iter_num': 1}, evil)
    modded = tmp_path / 'best_state_step000001_val1.0000.pt'
    torch.save({'step': 1, 'model': {'_orig_mod.scalars': payload}}, modded)
    bundles = {name: hostile_bundle(tmp_path / f'b{i}', name, payload)
               for i, name in enumerate(['model.pt', 'optimizer.pt', 'adapter.pt'])}
    before = digest(tmp_path)
    refusal = 'holds more than tensors and plain containers, so it was not loaded: unpickling it could run code'
    attempts = { # what is read, and the file the refusal must name
        'legacy ckpt.pt': (lambda: read_checkpoint(evil), evil),
        'bundle model.pt': (lambda: read_checkpoint(bundles['model.pt']).build_model(),
                            bundles['model.pt'] / 'model.pt'),
        'bundle optimizer.pt': (lambda: read_checkpoint(bundles['optimizer.pt']).optimizer_state(),
                                bundles['optimizer.pt'] / 'optimizer.pt'),
        'bundle adapter.pt': (lambda: read_checkpoint(bundles['adapter.pt']).build_model(attn_lora_rank=2),
                              bundles['adapter.pt'] / 'adapter.pt'),
        'modded checkpoint': (lambda: load_pretrained_checkpoint(modded, num_heads=2), modded),
    }
    for name, (attempt, path) in attempts.items():
        with pytest.raises(CheckpointError) as err:
            attempt()
        assert f'{path} {refusal}' in str(err.value) and not marker.exists(), (name, str(err.value))
        record_fault('hostile pickle', 'refused, code never ran', lost=digest(tmp_path) != before)
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump({'itos': payload}, f)
    before = digest(tmp_path)
    with pytest.raises(CheckpointError, match='refusing to load posix.system'):
        read_meta_pkl(tmp_path / 'meta.pkl')
    assert not marker.exists()
    record_fault('hostile pickle', 'refused, code never ran', lost=digest(tmp_path) != before)
    commands = [('inspect_model.py', ['--checkpoint', evil], evil),
                ('generate.py', ['--checkpoint', bundles['model.pt']], bundles['model.pt'] / 'model.pt'),
                ('convert_checkpoints.py', [evil], evil), ('test_checkpoint_loading.py', [modded], modded),
                ('train.py', ['--resume_from', evil], evil)]
    if (REPO / 'finetune_hindi_xnli.py').exists():
        (tmp_path / 'train.jsonl').write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n' * 4)
        commands.append(('finetune_hindi_xnli.py', ['--pretrained_ckpt_path', modded, '--n_head', '2',
                                                    '--tokenizer_name', 'none.json', '--train_file',
                                                    tmp_path / 'train.jsonl'], modded))
    for script, args, path in commands:
        code, out = run_script(script, *args, cwd=tmp_path, ok=False)
        # refused for this reason (not failing for another one), and the inputs are as they were
        lost = {k: v for k, v in digest(tmp_path).items() if k in before} != before
        record_fault('hostile pickle', 'refused, code never ran', lost=lost)
        assert code == 1 and f'{path} {refusal}' in out and 'Traceback' not in out, (script, out[-2000:])
        assert not marker.exists() and not lost, script


# -----------------------------------------------------------------------------
# a crash in the middle of train.py's save, then a resume

CRASH_HOOK = '''
import os, torch
point, nth = os.environ['CRASH_POINT'], int(os.environ['CRASH_ON_SAVE'])
counts = {'save': 0, 'swap': 0}
real_save, real_rename = torch.save, os.rename
def save(obj, f, *a, **k):
    counts['save'] += 1
    if point == 'writing' and counts['save'] == 2 * nth - 1: # inside the nth save's first file
        real_save(obj, f, *a, **k); os._exit(9)
    return real_save(obj, f, *a, **k)
def rename(src, dst, *a, **k):
    if '.saving-' in str(src): # the nth save moves its complete new directory in: die just before that
        counts['swap'] += 1
        if point == 'swap' and counts['swap'] == nth:
            os._exit(9) # the old checkpoint is out of place, the new one complete but not yet in
    return real_rename(src, dst, *a, **k)
torch.save, os.rename = save, rename
'''


@pytest.mark.parametrize('point', ['writing', 'swap'])
def test_resume_after_crash_mid_save(tmp_path, point, record_fault):
    hook = tmp_path / 'hook'
    hook.mkdir()
    (hook / 'sitecustomize.py').write_text(CRASH_HOOK)
    env = {**os.environ, 'PYTHONPATH': f'{hook}{os.pathsep}{REPO}', 'CRASH_POINT': point, 'CRASH_ON_SAVE': '2'}
    proc = subprocess.run([sys.executable, str(REPO / 'train.py'), str(REPO / 'config' / 'test_checkpoint_compatibility.py'),
                           '--out_dir', 'run', '--max_iters', '20'], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stdout + proc.stderr # it died in the second save (step 20)
    expected = 10 if point == 'writing' else 20 # the swap crash left a complete new checkpoint beside the old one
    ck = read_checkpoint(tmp_path / 'run') # what a reader finds now, every file checked against its manifest
    for name in ck.manifest['files']:
        verify_file(ck.path, name, ck.manifest)
    lost = ck.step not in (10, 20) # neither the previous complete checkpoint nor the new one
    record_fault('crash mid-save, then resume', f'resumed from step {expected}', lost=lost)
    assert ck.step == expected, ck.step
    out = run_train(tmp_path, '--out_dir', 'run', '--init_from', 'resume', '--max_iters', 30)
    assert f'(step {expected})' in out, out
    if point == 'swap':
        assert 'was interrupted' in out and 'recovered' in out
    assert read_checkpoint(tmp_path / 'run').step == 30
    assert [p.name for p in tmp_path.iterdir() if SAVING in p.name or PREVIOUS in p.name] == []


# -----------------------------------------------------------------------------
# the rules, checked in the code itself

def code_calls(source, name):
    """ the token text of every call of `name` (e.g. 'torch.load') in Python source, comments and strings excluded """
    import io
    import tokenize
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)]
    parts, calls = name.split('.'), []
    for i in range(len(tokens)):
        if [t.string for t in tokens[i:i + 2 * len(parts) - 1:2]] == parts and tokens[i + 2 * len(parts) - 1].string == '(':
            depth, j = 0, i + 2 * len(parts) - 1
            while True:
                depth += {'(': 1, ')': -1}.get(tokens[j].string, 0)
                if depth == 0:
                    break
                j += 1
            calls.append(' '.join(t.string for t in tokens[i:j + 1]))
    return calls


def test_every_torch_load_is_weights_only_and_nothing_loads_non_strictly():
    files = [p for p in REPO.rglob('*.py') if not any(part.startswith('.') or part == 'venv' for part in p.relative_to(REPO).parts)]
    loads = []
    for path in files:
        source = path.read_text(encoding='utf-8')
        for call in code_calls(source, 'torch.load'):
            loads.append(call)
            assert 'weights_only = True' in call, f'{path.name}: {call}'
        for call in code_calls(source, 'load_state_dict'):
            assert 'strict = False' not in call, f'{path.name}: {call}'
    assert len(loads) >= 5 # the check saw the project's loads (core/checkpoint.py, the tests, ...)
