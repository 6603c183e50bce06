"""
FSDP2 training and its sharded checkpoints, run as a user runs them: train.py --fsdp=True under torchrun (gloo, CPU).
- a 2-process run with gradient accumulation and clipping saves shards; it resumes on 4 processes and on 1, with the
  first evaluation equal to the stored one (the resume matrix adds the other sources and targets);
- the FSDP model's logits equal those of the bundle convert_checkpoints.py consolidates from its shards (LoRA merged
  on the shards), for a save written in the background while training went on;
- kill -9 of one process at each stage of a sharded save: the previous checkpoint stays loadable, every file as its
  manifest says (the fault-injection table's rows);
- a sharded checkpoint whose index names files outside it, or claims more tensor bytes than its shards hold, is refused.
"""

import os
import pickle
import re
import signal
import subprocess
import sys

import pytest
import torch

from core.checkpoint import CheckpointError, find_checkpoint, read_checkpoint
from core.commit import MANIFEST_FILE, SAVING, verify_file
from core.fsdp import METADATA
from core.training import read_resume_check
from tests.helpers import REPO, TINY_CONFIG, run_python, run_script, run_train

pytestmark = pytest.mark.xdist_group('fsdp') # the module's 2-process run is made once, in one worker
VAL_TOL, LOGITS_TOL = 1e-4, 1e-5


def torchrun(cwd, processes, *args, script=REPO / 'train.py', config=TINY_CONFIG, env=None, popen=False):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}', str(script),
               *([config] if config else []), *map(str, args)]
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', **(env or {})}
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and 'Traceback' not in out, out[-4000:]
    return out


@pytest.fixture(scope='module')
def sharded(tmp_path_factory):
    """ a 2-process FSDP run: 2 micro-steps per process per step, gradients clipped, saved at steps 4 and 8 """
    root = tmp_path_factory.mktemp('fsdp')
    out = torchrun(root, 2, '--fsdp', True, '--out_dir', 'run', '--max_iters', 8, '--eval_interval', 4,
                   '--gradient_accumulation_steps', 4, '--grad_clip', 0.5)
    return root, out


def test_a_2_process_fsdp_run_saves_shards_that_every_tool_reads(sharded):
    root, out = sharded
    assert 'note: gradient_accumulation_steps' not in out # 4 divides among 2: 2 micro-steps each
    assert out.count('step 8: train loss') == 1 and out.count('saving checkpoint to run') == 2, out # said once
    ck = read_checkpoint(root / 'run')
    assert find_checkpoint(root / 'run')[0] == ck.kind == 'sharded' and ck.step == 8
    files = sorted(ck.manifest['files'])
    assert files == ['.metadata', '__0_0.distcp', '__1_0.distcp', 'config.json', 'tokenizer.json', 'training_state.json']
    for name in files:
        verify_file(ck.path, name, ck.manifest)
    shards = ck.training_state['shards']
    assert shards['processes'] == 2 and shards['parts'] == ['model', 'optimizer'], shards
    weights, named = ck.weights(), ck.optimizer_state()
    assert weights['lm_head.weight'] is weights['transformer.wte.weight'] # stored once, tied on reading
    assert set(named['state']) == {k for k in weights if k != 'lm_head.weight'} # every parameter, by standard name
    assert all(s['step'].item() == 8 for s in named['state'].values())
    assert [g['weight_decay'] for g in named['param_groups']] == [0.1, 0.0]
    # the tools read it as they read a bundle
    result = run_python([REPO / 'inspect_model.py', '--checkpoint', 'run'], root, os.environ)
    assert result.returncode == 0 and 'Sharded checkpoint (FSDP' in result.stdout and 'Warning' not in result.stderr
    assert 'in the shards, keyed by parameter name (saved by 2 processes)' in result.stdout, result.stdout


@pytest.mark.parametrize('processes', [1, 4])
def test_it_resumes_on_another_number_of_processes(sharded, processes):
    import shutil
    root, _ = sharded
    shutil.copytree(root / 'run', root / f'run{processes}') # resumed in place: the 2 shards are replaced by N
    # on 4 processes as LoRA rank 8: new factors are drawn on the whole tensor (when each process drew its own shard
    # from one random stream, the shards of A were equal and a rank-8 adapter had rank 2 here)
    lora = ('--attn_lora_rank', 8, '--mlp_lora_rank', 8) if processes == 4 else ()
    out = torchrun(root, processes, '--fsdp', True, '--resume_from', f'run{processes}', '--out_dir', f'run{processes}',
                   '--max_iters', 9, '--eval_interval', 4, '--gradient_accumulation_steps', 4, *lora)
    assert f'loaded sharded checkpoint run{processes} (step 8)' in out
    # new factors need the whole weight: then every process reads the whole checkpoint, else only its own shards
    assert ('each process read its own shards' in out) != bool(lora), out[-2000:]
    assert ('state carried over for 15 parameter tensors, fresh for 0' in out) != bool(lora), out[-2000:]
    now, stored = read_resume_check(out)
    assert abs(now - stored) <= VAL_TOL, out[-3000:]
    ck = read_checkpoint(root / f'run{processes}')
    assert ck.step == 9 and ck.training_state['shards']['processes'] == processes
    assert sorted(n for n in ck.manifest['files'] if n.endswith('.distcp')) == [f'__{r}_0.distcp' for r in range(processes)]
    if lora:
        assert 'adapters initialised fresh' in out and 'may not have complete support' not in out, out[-2000:]
        factors = ck.adapter_state()
        for key in ('transformer.h.0.attn.c_attn.lora_A.weight', 'transformer.h.1.mlp.c_fc.lora_A.weight'):
            assert torch.linalg.matrix_rank(factors[key].float()).item() == 8, key


def test_a_resume_that_crops_the_block_size_trains_and_saves_what_it_evaluates(sharded):
    # cropping the positions needs the whole tensor: each process reads the checkpoint whole, crops, then shards
    # (when the crop came after the sharding, the cropped embedding trained 100x too slowly and the saved
    # checkpoint's val loss was 1.2e-2 off what was evaluated)
    import shutil
    root, _ = sharded
    shutil.copytree(root / 'run', root / 'crop')
    out = torchrun(root, 2, '--fsdp', True, '--resume_from', 'crop', '--out_dir', 'crop', '--max_iters', 12,
                   '--eval_interval', 4, '--gradient_accumulation_steps', 4, '--block_size', 16)
    assert 'cropped to the first 16' in out and 'each process read its own shards' not in out, out[-2000:]
    out = torchrun(root, 2, '--fsdp', True, '--resume_from', 'crop', '--out_dir', 'crop', '--max_iters', 13,
                   '--eval_interval', 4, '--gradient_accumulation_steps', 4, '--block_size', 16)
    now, stored = read_resume_check(out)
    assert abs(now - stored) <= VAL_TOL and 'each process read its own shards' in out, out[-3000:]


FSDP_LOGITS = '''
import sys, torch, torch.distributed as dist
from model import GPT, GPTConfig
from core.checkpoint import save_sharded, wait_for_saves
from core.distributed import end_process_group
from core.fsdp import shard_model
dist.init_process_group('gloo')
out = sys.argv[1]
torch.manual_seed(0)
chars = [chr(ord('a') + i) for i in range(26)] + list(' .,!?')
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=len(chars), attn_lora_rank=4,
                      mlp_lora_rank=4, embedding_mode='lora', embedding_rank=4, lora_alpha=8.0))
model.tokenizer_spec = {'token_kind': 'char', 'chars': chars}
shard_model(model, 'cpu', torch.float32)
optimizer = model.configure_optimizers(0.1, 3e-2, (0.9, 0.99), 'cpu', False)
ids = torch.randint(0, len(chars), (2, 16), generator=torch.Generator().manual_seed(1))
for _ in range(3): # the factors move away from B = 0, so the merge changes the weights
    model(ids, ids)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
model.eval()
with torch.no_grad():
    logits = model(ids, ids)[0]
save_sharded(out, model, 3, optimizer, background=True) # written while training goes on:
model.train()
for _ in range(3): # the parameters and moments change (in place) during the write
    model(ids, ids)[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
wait_for_saves()
if dist.get_rank() == 0:
    torch.save({'ids': ids, 'logits': logits}, out + '.logits.pt')
end_process_group()
'''


def test_the_consolidated_bundle_has_the_fsdp_models_logits(tmp_path):
    # the save runs in the background while 3 more steps change the model: what is read back is the state at step 3
    (tmp_path / 'fsdp_logits.py').write_text(FSDP_LOGITS)
    torchrun(tmp_path, 2, 'lora', script=tmp_path / 'fsdp_logits.py', config=None)
    expected = torch.load(tmp_path / 'lora.logits.pt', weights_only=True)
    result = run_python([REPO / 'convert_checkpoints.py', 'lora', '--to', 'bundle', 'bundle'], tmp_path,
                        {**os.environ, 'PYTHONPATH': str(REPO)})
    assert result.returncode == 0 and 'Warning' not in result.stderr, result.stdout + result.stderr
    bundle = read_checkpoint(tmp_path / 'bundle')
    assert bundle.kind == 'bundle' and (tmp_path / 'bundle' / 'adapter.pt').is_file() # the factors carried along
    assert bundle.step == 3 and {s['step'].item() for s in bundle.optimizer_state()['state'].values()} == {3.0}
    for ck in (bundle, read_checkpoint(tmp_path / 'lora')): # the bundle, and the shards read in one process
        model, report = ck.build_model() # standard: every adapter merged
        with torch.no_grad():
            diff = (model.eval()(expected['ids'], expected['ids'])[0] - expected['logits']).abs().max().item()
        assert diff <= LOGITS_TOL, (ck.kind, diff)
    # with its own adapters, the factors come back and the function is the same
    lora, report = read_checkpoint(tmp_path / 'lora').build_model(attn_lora_rank=4, mlp_lora_rank=4, embedding_mode='lora',
                                                                  embedding_rank=4, lora_alpha=8.0)
    assert len(report['restored_lora']) == 9 and not report['fresh_lora'], report
    with torch.no_grad():
        assert (lora.eval()(expected['ids'], expected['ids'])[0] - expected['logits']).abs().max().item() <= LOGITS_TOL


# -----------------------------------------------------------------------------
# kill -9 of one process during a sharded save

# installed as sitecustomize: in the process whose RANK is KILL_RANK, the second save stops at KILL_POINT (the first
# save has committed a checkpoint to fall back on), says so with the pid, and waits to be killed
PAUSE_HOOK = '''
import os, time
point = os.environ.get('KILL_POINT') if os.environ.get('RANK') == os.environ.get('KILL_RANK') else None
if point:
    real_fsync, real_rename, seen = os.fsync, os.rename, []
    def reached(event):
        seen.append(event)
        if seen.count(event) == 2:
            print(f'paused at {event} pid {os.getpid()}', flush=True)
            time.sleep(600)
    def fsync(fd):
        path = os.readlink(f'/proc/self/fd/{fd}')
        name = os.path.basename(path)
        if '.saving-' in path and point == {'.metadata.tmp': 'index', 'manifest.json': 'manifest'}.get(
                name, 'shard' if name.endswith('.distcp') else None):
            reached(point)
        return real_fsync(fd)
    def rename(src, dst, *args, **kwargs):
        if point == 'swap' and '.saving-' in os.path.basename(str(src)):
            reached(point) # the new directory complete, the old one moved aside, the new one not yet in place
        return real_rename(src, dst, *args, **kwargs)
    os.fsync, os.rename = fsync, rename
'''
# (the process, the point): a shard file being written by either process; process 0 writing DCP's index, our
# manifest, and between the two renames of the swap (then the complete new checkpoint is the one found)
KILLS = [('1', 'shard'), ('0', 'shard'), ('0', 'index'), ('0', 'manifest'), ('0', 'swap')]


@pytest.mark.parametrize('rank,point', KILLS, ids=[f'rank{r}-{p}' for r, p in KILLS])
def test_kill_9_of_one_process_during_a_sharded_save_loses_nothing(tmp_path, record_fault, rank, point):
    hook = tmp_path / 'hook'
    hook.mkdir()
    (hook / 'sitecustomize.py').write_text(PAUSE_HOOK)
    env = {'PYTHONPATH': f'{hook}{os.pathsep}{REPO}', 'KILL_RANK': rank, 'KILL_POINT': point}
    proc = torchrun(tmp_path, 2, '--fsdp', True, '--out_dir', 'run', '--max_iters', 100, '--eval_interval', 2,
                    '--eval_iters', 1, env=env, popen=True)
    try:
        lines = []
        # (the save runs in a thread: its line may share a line with the training loop's output)
        while not (paused := re.search(r'paused at \w+ pid (\d+)', line := proc.stdout.readline())):
            assert line, 'the run ended before its second save:\n' + ''.join(lines[-40:])
            lines.append(line)
        os.kill(int(paused.group(1)), signal.SIGKILL)
        proc.communicate(timeout=120) # torchrun stops the other process
    finally:
        proc.kill()
    assert proc.returncode != 0
    expected = 4 if point == 'swap' else 2 # the second save's step once it is complete, else the first's
    try:
        ck = read_checkpoint(tmp_path / 'run')
        for name in ck.manifest['files']:
            verify_file(ck.path, name, ck.manifest)
        model, _ = ck.build_model()
        step, moments = ck.step, len(ck.optimizer_state()['state'])
    except CheckpointError as e:
        step, moments = f'unreadable: {e}', 0
    lost = step not in (2, 4) or moments != 15
    record_fault('kill -9 of an FSDP process mid-save',
                 f"process {rank} at the {point}: {'new' if step == 4 else 'previous'} checkpoint intact", lost=lost)
    assert step == expected and moments == 15, step
    if (rank, point) in (('0', 'swap'), ('1', 'shard')): # the next save clears what the killed one left (rank 0's kill
                                                          # at a shard leaves what rank 1's does)
        out = run_train(tmp_path, '--resume_from', 'run', '--out_dir', 'run', '--max_iters', expected + 1, '--eval_iters', 1)
        assert f'(step {expected})' in out and read_checkpoint(tmp_path / 'run').step == expected + 1, out[-2000:]
        assert ('recovered' in out) == (point == 'swap'), out[-2000:]
        assert [p.name for p in tmp_path.iterdir() if SAVING in p.name or '.previous-' in p.name] == []


# -----------------------------------------------------------------------------
# a damaged or forged index

class RunsCode:
    """ unpickled, it would create the file `marker` """

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_a_forged_index_is_refused_before_any_tensor_is_read(sharded, tmp_path):
    import shutil
    from torch.distributed.checkpoint import FileSystemReader
    root, _ = sharded
    for forge, words in [('escape', 'not a shard file'), ('huge', 'claims'), ('class', 'not an index of tensors')]:
        copy = tmp_path / forge
        shutil.copytree(root / 'run', copy)
        metadata = FileSystemReader(copy).read_metadata() # (our reader never unpickles it this way)
        if forge == 'escape':
            info = next(iter(metadata.storage_data.values()))
            info.relative_path = '../../outside.distcp'
        elif forge == 'huge':
            next(iter(metadata.state_dict_metadata.values())).size = torch.Size([10**6, 10**6])
        data = pickle.dumps(metadata) if forge != 'class' else pickle.dumps(RunsCode(tmp_path / 'ran')) # code, not an index
        (copy / METADATA).write_bytes(data)
        (copy / MANIFEST_FILE).unlink() # a forger writes a matching manifest; none is the same for the reader
        with pytest.raises(CheckpointError) as error:
            read_checkpoint(copy).weights()
        assert words in str(error.value) and str(copy / METADATA) in str(error.value), str(error.value)
    assert not (tmp_path / 'ran').exists() # the pickle's code never ran


def test_wrong_uses_of_a_sharded_checkpoint_are_named(sharded, tmp_path):
    import json
    import shutil
    root, _ = sharded
    run = tmp_path / 'run'
    shutil.copytree(root / 'run', run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    # converted onto itself: refused, nothing touched (it used to become a bundle, then fail with a traceback)
    code, out = run_script('convert_checkpoints.py', 'run', '--out', 'run', '--force', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'names the checkpoint being read' in out, out
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # a flipped bit in a shard: named by its checksum before any tensor is used
    damaged = tmp_path / 'damaged'
    shutil.copytree(run, damaged)
    data = bytearray((damaged / '__1_0.distcp').read_bytes())
    data[len(data) // 2] ^= 1
    (damaged / '__1_0.distcp').write_bytes(bytes(data))
    code, out = run_script('convert_checkpoints.py', 'damaged', '--to', 'bundle', 'out', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and '__1_0.distcp does not match its checksum' in out, out
    # a leftover of an interrupted save, inspected: named as such, with the checkpoint to read instead
    leftover = tmp_path / '.run.saving-4242'
    shutil.copytree(run, leftover)
    (leftover / MANIFEST_FILE).unlink()
    (leftover / 'config.json').unlink()
    code, out = run_script('inspect_model.py', '--checkpoint', leftover, cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'an interrupted save left beside the checkpoint run' in out, out
    # training_state.json edited: parts that are not there are not claimed; optimizer groups that are not groups refused
    state = json.loads((run / 'training_state.json').read_text())
    state['shards']['parts'] = ['model', 'optimizer', 'adapter']
    (run / 'training_state.json').write_text(json.dumps(state))
    code, out = run_script('inspect_model.py', '--checkpoint', 'run', cwd=tmp_path, ok=False)
    assert code == 0 and 'Adapter factors' not in out and 'edited after it was saved' in out, out
    del state['shards']['optimizer_groups']
    (run / 'training_state.json').write_text(json.dumps(state))
    code, out = run_script('convert_checkpoints.py', 'run', '--to', 'bundle', 'out', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'training_state.json' in out and 'optimizer_groups' in out, out
    state['shards']['optimizer_groups'] = [{'lr': 1.0}]
    (run / 'training_state.json').write_text(json.dumps(state))
    code, out = run_script('convert_checkpoints.py', 'run', '--to', 'bundle', 'out', cwd=tmp_path, ok=False)
    assert code == 1 and 'Traceback' not in out and 'not a list of parameter groups' in out, out

