"""
Fault injection: the reliability and security promises, tried on purpose.
- kill -9 at random moments of a save (20 trials): the checkpoint is exactly the old or exactly the new state;
- an OSError (disk full) at each write step of a save: the previous checkpoint stays intact, the error says what failed;
- damaged inputs: truncated, flipped, empty, garbage, missing, another architecture, a tokenizer that doesn't fit;
- hostile pickles at every loading entry point: refused, their code never runs;
- a crash mid-save in train.py: the resume continues from a complete checkpoint.
Each fault is recorded; conftest.py prints the table (faults per class, outcomes, data lost) after the run.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from model import GPT, GPTConfig, CheckpointMismatchError
from core.checkpoint import CheckpointError, read_checkpoint, read_meta_pkl, save_bundle
from core.commit import MANIFEST_FILE, SAVING, PREVIOUS, file_checksum, verify_file
import core.checkpoint
import core.commit
from load_checkpoint_helper import load_pretrained_checkpoint
from tests.helpers import REPO, fill_with_step, make_nanogpt_checkpoint, run_script, run_train

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


# -----------------------------------------------------------------------------
# kill -9 during a save

KILLED_SAVER = '''
import sys, time, torch
from model import GPT, GPTConfig
from core.checkpoint import save_bundle
from tests.helpers import fill_with_step
directory, step = sys.argv[1], int(sys.argv[2])
model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256))
optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.99), 'cpu')
ids = torch.zeros(1, 4, dtype=torch.long)
model(ids, ids)[1].backward()
optimizer.step()
while True:
    fill_with_step(model, optimizer, step)
    print('saving', step, flush=True)
    t0 = time.time()
    save_bundle(directory, model, step, optimizer)
    print('saved', step, round(time.time() - t0, 4), flush=True)
    step += 1
'''


def next_line(proc, word):
    while not (line := proc.stdout.readline()).startswith(word):
        assert line, f'the saving process ended before printing {word!r}'
    return line


def test_kill_during_save_leaves_old_or_new_state(tmp_path, record_fault):
    directory = tmp_path / 'ckpt'
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    rng = random.Random(1234)
    save_time, last = 0.3, 0
    outcomes = []
    for trial in range(20):
        proc = subprocess.Popen([sys.executable, '-c', KILLED_SAVER, str(directory), str(last + 1)],
                                stdout=subprocess.PIPE, text=True, env=env)
        in_flight = int(next_line(proc, 'saving').split()[1]) # this save starts now
        if last == 0: # the first trial commits one whole checkpoint, timing it
            saved = next_line(proc, 'saved').split()
            save_time, last = float(saved[2]), int(saved[1])
            in_flight = int(next_line(proc, 'saving').split()[1])
        time.sleep(rng.uniform(0, 1.5 * save_time)) # anywhere in the save, or just after it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the saves the child reported complete before it died; the one after may have committed unreported
        done = max([int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith('saved')],
                   default=last)
        proc.stdout.close()
        step = saved_step(directory)
        assert step in (done, done + 1), f'after a kill the checkpoint holds step {step}, expected {done} or {done + 1}'
        outcome = 'killed mid-save, previous intact' if step < in_flight else 'killed after a save, new intact'
        outcomes.append(outcome)
        record_fault('kill -9 during save', outcome)
        last = step
    assert len(outcomes) == 20


# -----------------------------------------------------------------------------
# an OSError at each write step

class DiskFull:
    """ counts calls to the write primitives; raises ENOSPC at call number `fail_at` """

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at, self.failed_in = 0, fail_at, None
        targets = [(torch, 'save'), (core.checkpoint, 'write_json'), (core.commit, 'write_json'), (os, 'fsync'),
                   (os, 'rename'), (os, 'replace'), (os, 'link'), (os, 'mkdir')]
        for owner, name in targets:
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name), f'{getattr(owner, "__name__", owner)}.{name}'))

    def wrap(self, function, name):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                self.failed_in = name
                raise OSError(errno.ENOSPC, f'No space left on device (injected in {name})')
            return function(*args, **kwargs)
        return call


def test_disk_full_at_each_write_step(tmp_path, monkeypatch, record_fault):
    directory = tmp_path / 'ckpt'
    save_state(directory, 1)
    model, optimizer = state_model(2, attn_lora_rank=2) # the new save also writes adapter.pt
    save_state(tmp_path / 'count', 1)
    with monkeypatch.context() as m:
        counter = DiskFull(m)
        save_bundle(tmp_path / 'count', model, 2, optimizer) # over an existing checkpoint, like the real ones
    total = counter.calls
    assert total > 15
    for fail_at in range(1, total + 1):
        save_state(directory, 1) # the last good checkpoint
        with monkeypatch.context() as m:
            fault = DiskFull(m, fail_at)
            try:
                save_bundle(directory, model, 2, optimizer)
                raised = None
            except CheckpointError as e:
                raised = str(e)
        core.commit.finish_cleanups()
        leftovers = [p.name for p in tmp_path.iterdir() if SAVING in p.name or PREVIOUS in p.name]
        ck = read_checkpoint(directory)
        assert ck.step in (1, 2), f'failure at call {fail_at} ({fault.failed_in}) left step {ck.step}'
        if ck.step == 1:
            assert raised and saved_step(directory) == 1 # every file checked against the manifest, every tensor
            outcome = 'error, previous intact'
        else: # the failure came after the commit point: the new checkpoint is complete (and said so, if it failed)
            outcome = 'error after commit, new intact' if raised else 'new state complete'
        if raised:
            assert 'No space left on device (injected' in raised and str(directory) in raised
        assert leftovers == [], leftovers
        record_fault('OSError at each write step', outcome)


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
        'wrong shape'),
    'config field of the wrong type': (
        lambda d: (d / 'config.json').write_text(json.dumps({**json.loads((d / 'config.json').read_text()), 'n_layer': 'two'})),
        "field 'n_layer' should be a int"),
    'tokenizer larger than the model': (
        lambda d: (d / 'tokenizer.json').write_text(json.dumps({'token_kind': 'char', 'chars': CHARS + ['@', '#']})),
        'does not belong to these weights'),
    'no manifest, truncated model.pt': (lambda d: ((d / MANIFEST_FILE).unlink(), truncate(d / 'model.pt')),
                                        'model.pt could not be read'),
}


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
    with pytest.raises((CheckpointError, CheckpointMismatchError)) as err:
        load_everything(directory)
    assert expected in str(err.value), str(err.value)
    record_fault('damaged input', 'named and refused')


def test_damaged_inputs_through_the_command_line(tmp_path, record_fault):
    save_state(tmp_path / 'ckpt', 3)
    flip_byte(tmp_path / 'ckpt' / 'model.pt')
    code, out = run_script('generate.py', '--checkpoint', 'ckpt', '--max_new_tokens', 2, cwd=tmp_path, ok=False)
    assert code == 1 and 'model.pt does not match its checksum' in out and 'Traceback' not in out
    code, out = run_script('generate.py', '--checkpoint', 'ckpt', '--max_new_tokens', 2, '--debug', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' in out # only when asked
    legacy = make_nanogpt_checkpoint(tmp_path / 'n', CHARS)[0]
    truncate(legacy)
    for script, args in (('inspect_model.py', ['--checkpoint', legacy]), ('convert_checkpoints.py', [legacy]),
                         ('test_checkpoint_loading.py', [legacy])):
        code, out = run_script(script, *args, cwd=tmp_path, ok=False)
        assert code == 1 and 'ckpt.pt' in out and 'Traceback' not in out, (script, out)
        record_fault('damaged input', 'named and refused')
    code, out = run_train(tmp_path, '--resume_from', legacy, ok=False)
    assert code == 1 and 'could not be read' in out and 'Traceback' not in out
    record_fault('damaged input', 'named and refused')


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
    evil = tmp_path / 'evil.pt'
    torch.save({'model': {'x': payload}, 'model_args': {}, 'iter_num': 1}, evil)
    modded = tmp_path / 'best_state_step000001_val1.0000.pt'
    torch.save({'step': 1, 'model': {'_orig_mod.scalars': payload}}, modded)
    attempts = {
        'legacy ckpt.pt': lambda: read_checkpoint(evil),
        'bundle model.pt': lambda: read_checkpoint(hostile_bundle(tmp_path / 'b1', 'model.pt', payload)).build_model(),
        'bundle optimizer.pt': lambda: read_checkpoint(hostile_bundle(tmp_path / 'b2', 'optimizer.pt', payload)).optimizer_state(),
        'bundle adapter.pt': lambda: read_checkpoint(hostile_bundle(tmp_path / 'b3', 'adapter.pt', payload)).build_model(attn_lora_rank=2),
        'modded checkpoint': lambda: load_pretrained_checkpoint(modded, num_heads=2),
    }
    for name, attempt in attempts.items():
        with pytest.raises(CheckpointError, match='could run code'):
            attempt()
        assert not marker.exists(), name
        record_fault('hostile pickle', 'refused, code never ran')
    import pickle
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump({'itos': payload}, f)
    with pytest.raises(CheckpointError, match='refusing to load'):
        read_meta_pkl(tmp_path / 'meta.pkl')
    assert not marker.exists()
    record_fault('hostile pickle', 'refused, code never ran')
    commands = [('inspect_model.py', ['--checkpoint', evil]), ('generate.py', ['--checkpoint', tmp_path / 'b1']),
                ('convert_checkpoints.py', [evil]), ('test_checkpoint_loading.py', [modded]),
                ('train.py', ['--resume_from', evil])]
    if (REPO / 'finetune_hindi_xnli.py').exists():
        commands.append(('finetune_hindi_xnli.py', ['--pretrained_ckpt_path', modded, '--n_head', '2',
                                                    '--tokenizer_name', 'none.json', '--data_dir', tmp_path]))
    for script, args in commands:
        code, out = run_script(script, *args, cwd=tmp_path, ok=False)
        assert code != 0 and not marker.exists() and 'Traceback' not in out, (script, out[-2000:])
        record_fault('hostile pickle', 'refused, code never ran')


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
    out = run_train(tmp_path, '--out_dir', 'run', '--init_from', 'resume', '--max_iters', 30)
    assert f'(step {expected})' in out, out
    if point == 'swap':
        assert 'was interrupted' in out and 'recovered' in out
    assert read_checkpoint(tmp_path / 'run').step == 30
    assert [p.name for p in tmp_path.iterdir() if SAVING in p.name or PREVIOUS in p.name] == []
    record_fault('crash mid-save, then resume', f'resumed from step {expected}')


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
