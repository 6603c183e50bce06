"""
Checkpoint I/O against the limits of this machine. Every cost is printed next to its limit, measured in the same
run, and as a ratio: the machine is noisy, so ratios are what carry from one run (or machine) to another.
$ python bench/bench_checkpoint.py --size tiny      # seconds; CI runs it as a smoke test
$ python bench/bench_checkpoint.py --size gpt2      # GPT-2 small (124M parameters): a few minutes
Cold reads drop the files from the page cache with posix_fadvise(DONTNEED) (no root needed; pages are clean).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig, LoRALinear
from core.checkpoint import CheckpointManager, apply_optimizer_state, read_checkpoint, save_bundle, wait_for_saves
from core.commit import file_checksum, finish_cleanups
from core.probe import make_probe
from load_checkpoint_helper import load_pretrained_checkpoint, make_random_checkpoint

SIZES = {
    'tiny': dict(gpt=dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512),
                 modded=dict(vocab_size=512, num_layers=8, num_heads=2, model_dim=64, head_dim=32),
                 step=(4, 64), finetune=(16, 32), lora_rank=4),
    'gpt2': dict(gpt=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
                 modded=dict(vocab_size=50048, num_layers=12, num_heads=6, model_dim=768, head_dim=128),
                 step=(2, 256), finetune=(16, 64), lora_rank=16),
}


def settle():
    # before every timed run: the last save's replaced files freed, every dirty page on disk, so no
    # measurement pays for the writeback of the one before
    finish_cleanups()
    os.sync()


def best_time(fn, repeat=3):
    """ the fastest of `repeat` runs (the one least disturbed by the rest of the machine), and its result """
    best, result = float('inf'), None
    for _ in range(repeat):
        settle()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def evict(*paths):
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def raw_write(path, nbytes):
    """ the limit for a save: write nbytes, fsync the file and its directory """
    data = os.urandom(1 << 24) * (nbytes // (1 << 24)) + os.urandom(nbytes % (1 << 24))
    def write():
        with open(path, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(os.path.dirname(path), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return best_time(write)[0]


def read_pass(*paths):
    """ the limit for a load: read every byte of the files once, into one preallocated buffer """
    buffer = bytearray(max(os.path.getsize(p) for p in paths))
    def read():
        for p in paths:
            with open(p, 'rb', buffering=0) as f:
                f.readinto(buffer)
    return read


def classic_load(directory, config):
    """ what loaders usually do: random init, torch.load of everything, load_state_dict copies in """
    model = GPT(GPTConfig(**config))
    model.load_state_dict(torch.load(os.path.join(directory, 'model.pt'), weights_only=True))
    return model


def peak_rss_of(code, touch=True):
    """ peak resident memory growth (bytes) while `code` runs in a fresh process, after its imports; touch: and
    while every weight of the model `m` it makes is read """
    script = ('import sys, torch; sys.path.insert(0, %r)\n' % str(REPO) +
              'from core.checkpoint import read_checkpoint\nimport bench.bench_checkpoint as b\n'
              'def status(key): return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024\n'
              'open("/proc/self/clear_refs", "w").write("5")  # the high-water mark starts again from here\n'
              'base = status("VmRSS")\n' + code +
              ('\nwith torch.no_grad(): touched = sum(float(p.sum()) for p in m.parameters())  # every weight in memory\n'
               if touch else '\n') +
              'print(status("VmHWM") - base)')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.split()[-1])


def train_step_time(model, batch, steps=3):
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), 'cpu')
    def step():
        _, loss = model(batch, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step() # warm-up: the optimizer state is created here
    return best_time(step, steps)[0]


def lora_config(config, rank):
    return {**config, 'attn_lora_rank': rank, 'mlp_lora_rank': rank, 'lora_alpha': float(rank)}


def main(size, out_json=None):
    spec = SIZES[size]
    config = spec['gpt']
    rows = []
    def row(what, value, limit_name, limit, target=None, unit='s'):
        """ target: ('<=', x) or ('>=', x), a bound on the ratio """
        ratio = value / limit if limit else float('nan')
        met = None if target is None else (ratio <= target[1] if target[0] == '<=' else ratio >= target[1])
        rows.append(dict(what=what, value=value, unit=unit, limit_name=limit_name, limit=limit, ratio=ratio,
                         target=target and f'{target[0]} {target[1]}x', met=met))
        verdict = '' if target is None else f"   target {target[0]} {target[1]}x: {'met' if met else 'MISSED'}"
        print(f"{what:<46} {value:9.3f} {unit:<2} {limit_name:<34} {limit:9.3f} {unit:<2} {ratio:7.2f}x{verdict}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix='bench-', dir=os.environ.get('BENCH_DIR')))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    ids = torch.randint(0, config['vocab_size'], (1, 8))
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), 'cpu')
    model(ids, ids)[1].backward()
    optimizer.step() # every parameter has its AdamW state now
    optimizer.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f'bench_checkpoint --size {size}: GPT {n_params / 1e6:.1f}M parameters, torch {torch.__version__}, '
          f'{os.cpu_count()} cores, files in {tmp}\n')
    print(f"{'measure':<46} {'value':>12}  {'limit (same run)':<34} {'':>11} {'ratio':>8}")

    # saves: a whole bundle, and model.pt alone, against writing and fsyncing the same bytes
    bundle = tmp / 'bundle'
    t_save, _ = best_time(lambda: save_bundle(bundle, model, 1, optimizer))
    model_bytes, opt_bytes = (bundle / 'model.pt').stat().st_size, (bundle / 'optimizer.pt').stat().st_size
    row('bundle save (model + optimizer)', t_save, f'raw write+fsync {(model_bytes + opt_bytes) / 1e6:.0f} MB',
        raw_write(str(tmp / 'raw.bin'), model_bytes + opt_bytes))
    t_model_save, _ = best_time(lambda: model.save(tmp / 'weights'))
    row('model save (model.pt)', t_model_save, f'raw write+fsync {model_bytes / 1e6:.0f} MB',
        raw_write(str(tmp / 'raw.bin'), model_bytes), target=('<=', 1.2))

    # async_save: what the training loop waits for (the state staged in memory), against a synchronous save
    stalls = []
    for _ in range(3):
        wait_for_saves() # the write of the last one is not what this measures
        t0 = time.perf_counter()
        save_bundle(tmp / 'async', model, 1, optimizer, background=True)
        stalls.append(time.perf_counter() - t0)
    wait_for_saves()
    row('async_save stall (state copied to memory)', min(stalls), 'synchronous bundle save', t_save, target=('<=', 0.1))

    # the LoRA merge at save time runs while model.pt is written; what it still adds to the save is the save's time
    # less the same save with the merges done beforehand (the merged weights handed to save_bundle ready-made)
    torch.manual_seed(0)
    lora = GPT(GPTConfig(**lora_config(config, spec['lora_rank'])))
    lora_opt = lora.configure_optimizers(0.1, 1e-4, (0.9, 0.95), 'cpu')
    t_merge, merged = best_time(lora.get_merged_state_dict)
    def lora_save(premerged):
        if premerged:
            lora.get_merged_state_dict = lambda deferred=None: merged # (on this instance only)
        try:
            return best_time(lambda: save_bundle(tmp / 'lora', lora, 1, lora_opt), repeat=1)[0]
        finally:
            if premerged:
                del lora.get_merged_state_dict
    # a difference of two noisy times: 7 tries of each, taken in turns, so the machine's mood falls on both
    t_lora_save, t_premerged = [min(t) for t in zip(*[(lora_save(False), lora_save(True)) for _ in range(7)])]
    row('LoRA merge, what it adds to its bundle save (overlapped with the write)', max(t_lora_save - t_premerged, 0.0),
        'its bundle save', t_lora_save, target=('<=', 0.1))
    row('  the merge alone (sequential, as before)', t_merge, 'its bundle save', t_lora_save)
    adapted = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    naive = lambda: [m.main_weight.weight + (m.lora_B.weight @ m.lora_A.weight) * m.scale for m in adapted]
    row(f'  naive W + (B @ A) * s, {len(adapted)} weights', best_time(naive)[0], 'the addmm_ merge', t_merge)
    os.remove(tmp / 'raw.bin')

    # loads: warm (in page cache) and cold, against reading the same bytes
    weights = bundle / 'model.pt'
    load = lambda: read_checkpoint(bundle).build_model()[0]
    t_read_warm, _ = best_time(read_pass(weights))
    t_load_warm, _ = best_time(load)
    row('model load, warm (verified, mmap, assign)', t_load_warm, 'read pass over model.pt', t_read_warm, target=('<=', 3))
    # the probe (core/probe.py): one forward of 4 x 8 tokens, part of every save and of every load timed above
    t_probe, _ = best_time(lambda: make_probe(model))
    row('probe forward, its share of the bundle save', t_probe, 'the bundle save', t_save, target=('<=', 0.01))
    row('probe forward, its share of the warm load', t_probe, 'the warm model load', t_load_warm, target=('<=', 0.01))
    t_hash, _ = best_time(lambda: file_checksum(weights))
    t_crc, _ = best_time(lambda: file_checksum(weights, 'crc32'))
    row('  of which xxh3 checksum of model.pt', t_hash, 'zlib.crc32 of the same', t_crc)
    cold_read, cold_load = [], []
    for _ in range(3):
        evict(weights)
        cold_read.append(best_time(read_pass(weights), 1)[0])
        evict(weights)
        cold_load.append(best_time(load, 1)[0])
    row('model load, cold', min(cold_load), 'raw cold read of model.pt', min(cold_read), target=('<=', 1.5))
    rss_fast = peak_rss_of(f'm = read_checkpoint({str(bundle)!r}).build_model()[0]')
    rss_classic = peak_rss_of(f'm = b.classic_load({str(bundle)!r}, {config!r})')
    row('peak RSS growth on load (fast path)', rss_fast / 1e6, 'weights bytes', model_bytes / 1e6, target=('<=', 1.2), unit='MB')
    row('  classic path (init + torch.load + copy)', rss_classic / 1e6, 'weights bytes', model_bytes / 1e6, unit='MB')

    # a full resume and an inference load, end to end
    def resume():
        ck = read_checkpoint(bundle)
        m = ck.build_model()[0]
        opt = m.configure_optimizers(0.1, 1e-4, (0.9, 0.95), 'cpu')
        apply_optimizer_state(m, opt, ck.optimizer_state())
        return m
    t_resume, _ = best_time(resume)
    row('full resume (model + optimizer), warm', t_resume, 'read pass over both files',
        best_time(read_pass(weights, bundle / 'optimizer.pt'))[0])
    t_infer, _ = best_time(lambda: CheckpointManager.load_for_inference(str(bundle)))
    t_classic, _ = best_time(lambda: classic_load(bundle, config), 1)
    row('load_for_inference, warm (target <= 0.2 s)', t_infer, 'classic init + torch.load + copy', t_classic)

    # modded-nanogpt small checkpoint -> GPTBatched, against plainly loading the file
    modded = make_random_checkpoint(tmp / 'state_step001000.pt', 'small', scalars_pad=4, **spec['modded'])
    heads = spec['modded']['num_heads']
    t_convert, (backbone, _, _) = best_time(lambda: load_pretrained_checkpoint(modded, num_heads=heads, verbose=False))
    row('modded small -> GPTBatched (load + convert)', t_convert, 'plain torch.load of the file',
        best_time(lambda: torch.load(modded, weights_only=True))[0])
    file_tensors = sum(v.nbytes for v in torch.load(modded, weights_only=True, mmap=True)['model'].values())
    rss_check = peak_rss_of(f'import test_checkpoint_loading as t; t.verify({str(modded)!r}, {heads})', touch=False)
    row('test_checkpoint_loading.py on it, peak RSS growth', rss_check / 1e6, 'tensors in the file', file_tensors / 1e6,
        target=('<=', 2), unit='MB')
    rss_finetune = peak_rss_of('from load_checkpoint_helper import load_pretrained_checkpoint\n'
                               f'm = load_pretrained_checkpoint({str(modded)!r}, num_heads={heads}, verbose=False)[0]')
    row("  finetune_hindi_xnli.py's load of it, every weight read", rss_finetune / 1e6, 'tensors in the file',
        file_tensors / 1e6, target=('<=', 2), unit='MB')

    # training: a LoRA step against a standard step, same base model
    batch = torch.randint(0, config['vocab_size'], spec['step'])
    del lora, lora_opt, optimizer
    t_standard = train_step_time(model, batch)
    torch.manual_seed(0)
    t_lora = train_step_time(GPT(GPTConfig(**lora_config(config, spec['lora_rank']))), batch)
    row(f'LoRA train step (r={spec["lora_rank"]}, batch {tuple(batch.shape)})', t_lora, 'standard train step', t_standard, target=('<=', 1))

    # fine-tuning: GPTBatched + head, 16 examples per step against one example per step
    n, length = spec['finetune']
    head = nn.Linear(backbone.model_dim, 3)
    ft_opt = torch.optim.AdamW(list(backbone.parameters()) + list(head.parameters()), lr=1e-5)
    examples = torch.randint(0, spec['modded']['vocab_size'], (n, length))
    labels = torch.randint(0, 3, (n,))
    def finetune(batch_size):
        for i in range(0, n, batch_size):
            x, y = examples[i:i + batch_size], labels[i:i + batch_size]
            loss = F.cross_entropy(head(backbone.forward_features(x)[:, -1]), y)
            loss.backward()
            ft_opt.step()
            ft_opt.zero_grad(set_to_none=True)
    finetune(n) # warm-up: optimizer state
    t_batched, _ = best_time(lambda: finetune(16), 2)
    t_single, _ = best_time(lambda: finetune(1), 1)
    row('fine-tuning throughput, batch 16 (examples/s)', n / t_batched, 'one example at a time', n / t_single,
        target=('>=', 5), unit='/s')

    results = dict(size=size, params=n_params, model_bytes=model_bytes, optimizer_bytes=opt_bytes, rows=rows)
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=2))
    subprocess.run(['rm', '-rf', str(tmp)])
    return results


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Checkpoint I/O cost as ratios to the limits of this machine.')
    parser.add_argument('--size', choices=list(SIZES), default='tiny')
    parser.add_argument('--json', help='also write the results to this file')
    args = parser.parse_args()
    main(args.size, args.json)
