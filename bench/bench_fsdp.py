"""
Sharded (FSDP) checkpoints against the rank-0 bundle, at 1, 2 and 4 CPU processes under torchrun (gloo).
$ python bench/bench_fsdp.py --size tiny --procs 2     # seconds; CI runs it as a smoke test
$ python bench/bench_fsdp.py --size gpt2               # GPT-2 small with its AdamW state at 1, 2, 4 processes: minutes

For each process count N, one torchrun of N workers builds the model, shards it (FSDP2) and gives AdamW its two
moments, then measures:
- save: every process writes its shards (save_sharded) vs the state gathered to process 0 and written there as a
  bundle (what a rank-0 save of an FSDP run costs); and how long the training loop waits for an async sharded save
  (each process copies its shards to CPU memory);
- load: train.py's resume of each under FSDP: the sharded checkpoint into the model sharded first, each process
  reading only its shards; the bundle read whole by every process, then sharded; then the optimizer state;
- peak memory per process on each, as the growth of its peak RSS over what it held before, against the full state
  (weights plus moments): the target is 1/N of it plus a small constant.
Times are the slowest process's. The machine has 2 cores: beyond 2 processes they share them.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.distributed as dist

from model import GPT, GPTConfig

SIZES = {'tiny': dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512),
         'gpt2': dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)}


def status(key):
    """ VmRSS / VmHWM of this process, in bytes """
    with open('/proc/self/status') as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024


def reset_peak():
    with open('/proc/self/clear_refs', 'w') as f: # '5': the peak RSS starts again from the current RSS
        f.write('5')


def measured(fn):
    """ (seconds of the slowest process, peak RSS growth of the largest process) of fn() run by every process """
    dist.barrier()
    reset_peak()
    before = status('VmRSS')
    t0 = time.perf_counter()
    result = fn()
    dist.barrier()
    figures = torch.tensor([time.perf_counter() - t0, status('VmHWM') - before], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    return figures[0].item(), figures[1].item(), result


def worker(size, out_dir, result_file):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from core.checkpoint import apply_optimizer_state, read_checkpoint, save_bundle, save_sharded, wait_for_saves
    from core.commit import finish_cleanups
    from core.distributed import end_process_group
    from core.fsdp import shard_model
    dist.init_process_group('gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = GPTConfig(**SIZES[size])
    model = shard_model(GPT(config), 'cpu', torch.float32)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', verbose=False)
    for group in optimizer.param_groups: # the state one AdamW step leaves, without the step (minutes on GPT-2)
        for p in group['params']:
            optimizer.state[p] = {'step': torch.tensor(1.0), 'exp_avg': torch.zeros_like(p), 'exp_avg_sq': torch.zeros_like(p)}
    full_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) # weights and two moments
    sharded_dir, bundle_dir = Path(out_dir) / f'sharded{world}', Path(out_dir) / f'bundle{world}'
    rows = {}

    rows['save, sharded'] = measured(lambda: save_sharded(sharded_dir, model, 1, optimizer))[:2]
    # async: the loop waits only while each process copies its shards to CPU memory (then the write is waited for)
    rows['save, sharded async: stall'] = measured(lambda: save_sharded(sharded_dir, model, 1, optimizer, background=True))[:2]
    wait_for_saves()

    def rank0_bundle():
        # the whole state on process 0 (every process takes part in gathering it), then written as a bundle
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        named = get_optimizer_state_dict(model, optimizer, options=options)
        if rank == 0:
            plain = GPT.on_meta(config)
            plain.load_state_dict(weights, strict=True, assign=True)
            plain.lm_head.weight = plain.transformer.wte.weight
            named['param_groups'] = [{**g, 'params': list(g['params'])} for g in named['param_groups']]
            save_bundle(bundle_dir, plain, 1, named)
            finish_cleanups()
    rows['save, rank-0 bundle'] = measured(rank0_bundle)[:2]
    dist.barrier()

    def resume(path):
        # train.py's resume under FSDP: a sharded checkpoint into the model sharded first (each process reads its
        # shards); any other checkpoint read whole by every process, then the model sharded; then the optimizer state
        ck = read_checkpoint(path)
        resumed = GPT.on_meta(ck.model_config())
        shard_first = ck.loads_shard_by_shard(ck.model_config())
        if shard_first:
            shard_model(resumed, 'cpu', torch.float32).to_empty(device='cpu')
        ck.load_into(resumed)
        if not shard_first:
            shard_model(resumed, 'cpu', torch.float32)
        opt = resumed.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu', verbose=False)
        return apply_optimizer_state(resumed, opt, ck.optimizer_state(resumed))
    seconds, peak, kept = measured(lambda: resume(sharded_dir))
    rows['load, sharded'] = (seconds, peak)
    seconds, peak, kept_bundle = measured(lambda: resume(bundle_dir))
    rows['load, rank-0 bundle'] = (seconds, peak)
    assert kept == kept_bundle and kept[1] == 0, (kept, kept_bundle) # every moment carried over, both ways
    if rank == 0:
        Path(result_file).write_text(json.dumps({'processes': world, 'full_bytes': full_bytes, 'rows': rows}))
    end_process_group()


def main(size, procs, out_json=None):
    results = []
    with tempfile.TemporaryDirectory(prefix='bench-fsdp-') as tmp:
        for n in procs:
            result_file = Path(tmp) / f'result{n}.json'
            env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 1) // n))}
            subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', __file__,
                            '--worker', '--size', size, '--out', tmp, '--result', str(result_file)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            results.append(json.loads(result_file.read_text()))
            for d in Path(tmp).glob('*'):
                if d.is_dir():
                    shutil.rmtree(d)
    full = results[0]['full_bytes']
    print(f'{size}: weights + AdamW moments = {full / 1e6:.0f} MB; times of the slowest process, peak RSS growth of the '
          'largest, as a share of the full state (target for sharded: 1/N + a small constant)')
    print(f"{'processes':>9}  {'what':<27} {'seconds':>8} {'vs rank-0 bundle':>17} {'peak MB':>8} {'x full':>7} {'x 1/N':>6}")
    rows = []
    for result in results:
        n = result['processes']
        for what in ('save', 'load'):
            bundle = result['rows'][f'{what}, rank-0 bundle']
            labels = [f'{what}, sharded'] + (['save, sharded async: stall'] if what == 'save' else []) + [f'{what}, rank-0 bundle']
            for label, (seconds, peak) in ((label, result['rows'][label]) for label in labels):
                ratio = seconds / bundle[0]
                print(f'{n:>9}  {label:<27} {seconds:8.3f} {ratio:16.2f}x {peak / 1e6:8.0f} {peak / full:7.2f} '
                      f'{peak / (full / n):6.2f}')
                rows.append(dict(processes=n, what=label, seconds=seconds, vs_bundle=ratio, peak_bytes=peak,
                                 peak_vs_full=peak / full))
        stall = result['rows']['save, sharded async: stall'][0] / result['rows']['save, sharded'][0]
        print(f"{n:>9}  async save: the loop waits {stall:.2f}x of the synchronous sharded save")
    if out_json:
        Path(out_json).write_text(json.dumps({'size': size, 'full_bytes': full, 'rows': rows}, indent=2))


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Sharded (FSDP) checkpoints vs the rank-0 bundle, by process count.')
    parser.add_argument('--size', choices=list(SIZES), default='tiny')
    parser.add_argument('--procs', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--json', help='also write the figures to this JSON file')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    parser.add_argument('--result', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.size, args.out, args.result)
    else:
        main(args.size, args.procs, args.json)
