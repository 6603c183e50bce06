"""
The GPU path, checked in one script: train.py with autocast and torch.compile, resumed as LoRA, deployed as a
standard model, sampled; a bundle moved between devices; the modded-nanogpt forwards and finetune_hindi_xnli.py
on the device; FSDP on one GPU; then speed figures. Prints a table of checks (each with its measured difference
and tolerance) and a table of figures; exits 1 if a check fails.
$ python bench/gpu_check.py                  # on a GPU: GPT-2 small figures included, about 5 minutes
$ python bench/gpu_check.py --device cpu     # tiny sizes, no compile: CI's smoke test, so the script cannot rot

Tolerances. fp32 comparisons: 1e-5 relative for a loss, 1e-5 for logits on one device; 1e-4 between devices or
between the merged and the factored LoRA forward (summation order differs; TF32 is off here). Under autocast a resumed run
holds the same fp32 weights, so its evaluation can differ only where a matrix product rounds differently (another
compiled graph, LoRA's extra path): at most one rounding step of the dtype, relative to the loss: 2^-8 for bfloat16
(8 significant bits), 2^-11 for float16. On a CPU train.py computes in float32 whatever --dtype says.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from model import GPT, GPTConfig
from core.args import Parser
from core.checkpoint import CheckpointManager, read_checkpoint, rng_state, save_bundle
from core.cli import SetupError, check_device
from core.training import read_resume_check as resume_check, train_step
from data.prepare import prepare
from load_checkpoint_helper import load_pretrained_checkpoint, make_random_checkpoint
from bench.bench_checkpoint import evict, raw_write, read_pass

SIZES = { # the chain's model and batches (train.py's flags), the figures' model and batch
    'cuda': dict(chain=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, eval_iters=20),
                 figures=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304), batch=12,
                 modded=dict(vocab_size=512, num_layers=8, num_heads=4, model_dim=256, head_dim=64), lora_rank=16),
    'cpu': dict(chain=dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=5),
                figures=dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512), batch=4,
                modded=dict(vocab_size=256, num_layers=8, num_heads=2, model_dim=64, head_dim=32), lora_rank=4),
}
LORA = dict(attn_lora_rank=8, mlp_lora_rank=8, embedding_mode='lora', embedding_rank=8, lora_alpha=16.0)
ROUNDING = {'float32': 1e-5, 'bfloat16': 2 ** -8, 'float16': 2 ** -11} # one rounding step, relative (see above)

checks, figures, lock, T0 = [], [], threading.Lock(), time.perf_counter()


def check(name, ok, measured, tolerance):
    with lock:
        checks.append((name, bool(ok), measured, tolerance))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {measured} (tolerance {tolerance}) "
              f"[{time.perf_counter() - T0:.0f} s]", flush=True)
    return ok


def figure(name, value):
    figures.append((name, value))
    print(f"      {name}: {value}", flush=True)


def run(*args, cwd):
    """ a script of this repo as a user runs it; (exit code, stdout + stderr) """
    cmd = [str(a) for a in args]
    cmd = [sys.executable] + (['-m', 'torch.distributed.run'] + cmd[1:] if cmd[0] == 'torchrun' else cmd)
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, 'PYTHONPATH': str(REPO), 'PYTHONUNBUFFERED': '1'})
    return out.returncode, out.stdout + out.stderr


def flags(**kw):
    return [f'--{k}={v}' for k, v in kw.items()]


def resume_diff(out):
    """ (|val loss now - val loss stored|, stored) from train.py's resume check line; (inf, nan) without one """
    try:
        now, stored = resume_check(out)
    except StopIteration:
        return float('inf'), float('nan')
    return abs(now - stored), stored


class Reported(Exception):
    """ a failure already in the table """


def guarded(name):
    """ a section that crashes is one failed check, not the end of the run """
    def wrap(fn):
        def inner(*args, **kw):
            try:
                fn(*args, **kw)
            except Reported:
                pass
            except Exception as e: # what broke, in one line; the other sections still run
                check(name, False, f'{type(e).__name__}: {str(e)[:300]}', 'runs')
        return inner
    return wrap


@guarded('train/resume chain')
def chain(device, dtype, compile, work):
    """ standard run, same-config resume, LoRA resume (attn+MLP+embedding), deploy as standard, generate """
    name = f"{dtype}{', compile' if compile else ''}"
    w = Path(work) / f"chain-{dtype}-{int(compile)}"
    w.mkdir()
    size = SIZES['cuda' if device.startswith('cuda') else 'cpu']['chain']
    common = flags(device=device, dtype=dtype, compile=compile, warmup_iters=5, lr_decay_iters=100, eval_interval=10,
                   log_interval=5, **size)
    tol_rel = ROUNDING[dtype if device.startswith('cuda') else 'float32']

    def step(label, *args):
        rc, out = run(REPO / 'train.py', *args, cwd=w)
        if rc:
            check(f"{name}: {label}", False, out.strip().splitlines()[-1] if out.strip() else f'exit {rc}', 'exit 0')
            raise Reported()
        return out

    step('train', *common, '--out_dir=std', '--max_iters=20')
    scaler = lambda d: json.loads((w / d / 'training_state.json').read_text()).get('scaler')
    scaler_at_20 = scaler('std')
    for label, args in (('same-config resume', [*common, '--resume_from=std', '--out_dir=std', '--max_iters=30']),
                        ('resume as LoRA', [*common, '--resume_from=std', '--out_dir=lora', '--max_iters=40',
                                            *flags(**LORA)]),
                        ('deploy as standard', [REPO / 'config/deploy_standard.py', *common, '--resume_from=lora',
                                                '--out_dir=deployed'])):
        out = step(label, *args)
        diff, stored = resume_diff(out)
        check(f"{name}: {label}, val loss now vs stored", diff <= tol_rel * stored, f'{diff:.1e}',
              f'{tol_rel * stored:.1e}')

    if dtype == 'float16': # the GradScaler's state goes into the checkpoint and comes back: its step count goes on
        before, after = scaler_at_20, scaler('std') # steps 20 and 30 of the same run, resumed in between
        kept = after['_growth_tracker'] == before['_growth_tracker'] + 10 and after['scale'] == before['scale']
        check(f"{name}: GradScaler restored on resume (scale / steps since its last change)", kept,
              f"{before['scale']:g}/{before['_growth_tracker']} -> {after['scale']:g}/{after['_growth_tracker']}",
              'same scale, +10 steps (a fresh one: 10)')

    # the deployed standard model computes the LoRA model's function (fp32, no autocast)
    lora_ckpt = read_checkpoint(w / 'lora')
    lora, _ = lora_ckpt.build_model(device, **lora_ckpt.trained_adapters())
    deployed = CheckpointManager.load_for_inference(str(w / 'deployed'), device=device)
    ids = torch.randint(0, lora.config.vocab_size, (4, lora.config.block_size), device=device)
    with torch.no_grad():
        diff = (lora.eval()(ids, ids)[0] - deployed(ids, ids)[0]).abs().max().item()
    check(f"{name}: deployed logits vs the LoRA model's (fp32)", diff <= 1e-4, f'{diff:.1e}', '1e-04')

    texts = []
    for bundle in ('lora', 'deployed'):
        rc, out = run(REPO / 'generate.py', '--checkpoint', bundle, '--device', device, '--dtype', dtype,
                      '--num_samples=1', '--max_new_tokens=60', cwd=w)
        texts.append(out if rc == 0 else None)
    same = texts[0] is not None and texts[0] == texts[1] and len(texts[0]) > 60
    check(f"{name}: generate.py, LoRA run and its deployment sample the same text", same,
          f'{len(texts[0] or "")} chars' if same else (texts[0] or texts[1] or '')[-200:], 'identical')


@guarded('FSDP on one GPU')
def fsdp(device, work):
    """ torchrun with FSDP2 (nccl, bf16 MixedPrecisionPolicy): a sharded save, resumed sharded and by one process """
    w = Path(work) / 'fsdp'
    w.mkdir()
    common = flags(device=device, dtype='bfloat16', warmup_iters=5, eval_interval=10, **SIZES['cuda']['chain'])
    torchrun = ['torchrun', '--standalone', '--nproc_per_node=1', REPO / 'train.py', '--fsdp=True', *common]
    for label, cmd in (('train', [*torchrun, '--out_dir=sh', '--max_iters=20']),
                       ('FSDP resume', [*torchrun, '--resume_from=sh', '--out_dir=sh', '--max_iters=30']),
                       ('one-process resume of the shards', [REPO / 'train.py', *common, '--resume_from=sh',
                                                              '--out_dir=whole', '--max_iters=40'])):
        rc, out = run(*cmd, cwd=w)
        if rc or label == 'train':
            check(f"FSDP bfloat16: {label}", rc == 0, 'exit 0' if rc == 0 else out.strip().splitlines()[-1], 'exit 0')
            continue
        diff, stored = resume_diff(out)
        check(f"FSDP bfloat16: {label}, val loss now vs stored", diff <= ROUNDING['bfloat16'] * stored, f'{diff:.1e}',
              f"{ROUNDING['bfloat16'] * stored:.1e}")


@guarded('bundles across devices')
def across_devices(device, work):
    """ a bundle saved from one device loads on the other with the same logits (fp32) """
    config = GPTConfig(**{**SIZES['cpu']['figures'], 'dropout': 0.0})
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, config.block_size))
    for source, target in ((device, 'cpu'), ('cpu', device))[:2 if device != 'cpu' else 1]:
        model = GPT(config).to(source).eval()
        directory = Path(work) / f'from-{source}-to-{target}'.replace(':', '')
        save_bundle(directory, model, 1)
        loaded = CheckpointManager.load_for_inference(str(directory), device=target)
        with torch.no_grad():
            diff = (model(ids.to(source), ids.to(source))[0].cpu() - loaded(ids.to(target), ids.to(target))[0].cpu())
        diff = diff.abs().max().item()
        tol = 1e-5 if source == target else 1e-4
        check(f"bundle saved on {source}, loaded on {target}: logits (fp32)", diff <= tol, f'{diff:.1e}', f'{tol:.0e}')


@guarded('modded-nanogpt forwards')
def modded(device, work):
    """ the small and medium layouts: the device's forward equals the CPU's (fp32) """
    size = SIZES['cuda' if device.startswith('cuda') else 'cpu']['modded']
    for layout in ('small', 'medium'):
        path = make_random_checkpoint(Path(work) / f'{layout}.pt', layout=layout, **size)
        ids = torch.randint(0, size['vocab_size'], (2, 64))
        features = []
        for where in ('cpu', device):
            model, _, _ = load_pretrained_checkpoint(str(path), device=where, num_heads=size['num_heads'],
                                                     verbose=False)
            with torch.no_grad():
                features.append(model.forward_features(ids.to(where)).float().cpu())
        diff = (features[0] - features[1]).abs().max().item()
        check(f"modded {layout} layout: {device} forward vs cpu (fp32)", diff <= 1e-4, f'{diff:.1e}', '1e-04')


@guarded('finetune_hindi_xnli.py')
def finetune(device, work):
    """ a few fine-tuning steps on a generated small-layout checkpoint and synthetic XNLI data """
    from core.tokenizer import hf_spec_from_file, load_tokenizer
    from data.synthetic_xnli import make_xnli_data, round_up
    root = Path(work) / 'xnli'
    data_dir, tokenizer = make_xnli_data(root, n_dev=400, n_test=90)
    vocab = round_up(load_tokenizer(hf_spec_from_file(tokenizer)).vocab_size)
    ckpt = make_random_checkpoint(root / 'small.pt', layout='small', vocab_size=vocab, num_layers=8, num_heads=2,
                                  model_dim=64, head_dim=32)
    rc, out = run(REPO / 'finetune_hindi_xnli.py', '--data_dir', data_dir, '--pretrained_ckpt_path', ckpt,
                  '--tokenizer_name', tokenizer, '--n_head', 2, '--batch_size', 32, '--max_steps', 12, '--device', device,
                  '--learning_rate', 2e-3, '--out_dir', root / 'out', cwd=root)
    losses = [float(x) for x in re.findall(r'train loss ([\d.]+)', out)]
    results = root / 'out' / 'results.json'
    ok = rc == 0 and losses and all(l == l for l in losses) and results.exists()
    accuracy = json.loads(results.read_text())['accuracy'] if results.exists() else None
    check(f"finetune_hindi_xnli.py, 12 steps on {device}", ok,
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, test accuracy {accuracy:.2f}" if ok else out.strip()[-300:],
          'runs, finite losses')


def sync_count(fn, device):
    """ how many times fn() waits for the GPU (torch's sync debug mode warns at each wait) """
    if not device.startswith('cuda'):
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    # (the first switch to 'warn' also warns that the mode is a prototype: that notice is not a sync)
    where = [f'{Path(w.filename).name}:{w.lineno}' for w in caught if 'called a synchronizing' in str(w.message)]
    return len(where), sorted(set(where))


def speed(device, size, work):
    """ GPT-2 small (on a GPU) standard vs LoRA: ms/iter, tokens/s, MFU; host syncs per step; bundle save/load """
    cuda = device.startswith('cuda')
    dtype = torch.bfloat16 if cuda else torch.float32
    ctx = torch.amp.autocast(device_type='cuda', dtype=dtype) if cuda else nullcontext()
    B, T = size['batch'], size['figures']['block_size']
    X = torch.randint(0, size['figures']['vocab_size'], (B, T), device=device)
    timed = {}
    for label, adapters in (('standard', {}), (f"LoRA r{size['lora_rank']}", dict(attn_lora_rank=size['lora_rank'],
                                                                                   mlp_lora_rank=size['lora_rank']))):
        torch.manual_seed(0)
        raw = GPT(GPTConfig(**size['figures'], **adapters)).to(device)
        optimizer = raw.configure_optimizers(0.1, 6e-4, (0.9, 0.95), 'cuda' if cuda else 'cpu', False)
        model = torch.compile(raw) if cuda else raw
        step = lambda: train_step(model, optimizer, (X, X), lambda: (X, X), ctx=ctx)
        for _ in range(3): # compile and warm up
            step()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        n = 10
        t0 = time.perf_counter()
        for _ in range(n):
            loss, _ = step()
        sync()
        dt = (time.perf_counter() - t0) / n
        timed[label] = dt
        figure(f"{label}: ms/iter, tokens/s, MFU (train.py's, vs A100 312 TFLOPS)",
               f"{dt * 1000:.1f} ms, {B * T / dt:,.0f} tokens/s, {raw.estimate_mfu(B, dt) * 100:.1f}%")
        if label == 'standard':
            saved = raw, optimizer
    figure(f"LoRA r{size['lora_rank']} / standard ms/iter", f"{timed[list(timed)[1]] / timed['standard']:.2f}")

    # host syncs per training step: none (the loss is read only when logged, the RNG only before an evaluation)
    small = GPT(GPTConfig(**{**SIZES['cpu']['figures'], 'block_size': 128})).to(device)
    opt = small.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cuda' if cuda else 'cpu', False)
    Xs = torch.randint(0, 512, (16, 128), device=device)
    plain = lambda: train_step(small, opt, (Xs, Xs), lambda: (Xs, Xs), ctx=ctx)
    def old(): # what train.py did before: the RNG state read before every batch and the loss read every step
        loss, _ = train_step(small, opt, (Xs, Xs), lambda: (rng_state(), (Xs, Xs))[1], ctx=ctx)
        loss.item()
    for fn in (plain, old, plain, old): # warm up: allocations, the optimizer's state
        fn()
    if cuda:
        (now, at), (before, _) = [sync_count(lambda: [fn() for _ in range(10)], device) for fn in (plain, old)]
        check('host syncs in 10 training steps (bf16), now / reading the loss every step', now == 0 and before >= 10,
              f"{now} / {before}{' at ' + ', '.join(at) if at else ''}", '0 / at least 10')
    times, n = [], 50 if cuda else 3
    for fn in (plain, old):
        torch.cuda.synchronize() if cuda else None
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize() if cuda else None
        times.append((time.perf_counter() - t0) / n)
    figure('small model (2x64, 16x128 tokens) ms/iter without / with a sync per step',
           f'{times[0] * 1000:.2f} / {times[1] * 1000:.2f} ms ({times[1] / times[0]:.2f}x)')

    # the standard model's bundle (weights + AdamW moments), saved from and loaded to the device
    raw, optimizer = saved
    directory = Path(work) / 'speed-bundle'
    t0 = time.perf_counter()
    save_bundle(directory, raw, 13, optimizer)
    t_save = time.perf_counter() - t0
    files = [str(p) for p in directory.iterdir() if p.is_file()]
    nbytes = sum(os.path.getsize(p) for p in files)
    t_raw = raw_write(str(Path(work) / 'raw.bin'), nbytes)
    figure('bundle save (from the device) / raw write of the same bytes',
           f'{t_save:.2f} s / {t_raw:.2f} s = {t_save / t_raw:.2f}x ({nbytes / 1e6:.0f} MB)')
    evict(*files)
    t0 = time.perf_counter()
    loaded = CheckpointManager.load_for_inference(str(directory), device=device)
    torch.cuda.synchronize() if cuda else None
    t_load = time.perf_counter() - t0
    weights = [p for p in files if not p.endswith('optimizer.pt')] # what a load for inference reads
    evict(*files)
    t0 = time.perf_counter()
    read_pass(*weights)()
    t_read = time.perf_counter() - t0
    figure('bundle load for inference (to the device, cold cache) / raw read of the same files',
           f'{t_load:.2f} s / {t_read:.2f} s = {t_load / t_read:.2f}x '
           f'({sum(os.path.getsize(p) for p in weights) / 1e6:.0f} MB)')
    del loaded


def main():
    parser = Parser(description='Check the GPU path end to end; print checks and figures.')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--keep', action='store_true', help='keep the work folder (printed) for a look')
    args = parser.parse_args()
    device, cuda = args.device, args.device.startswith('cuda')
    try:
        check_device(device)
    except SetupError as e:
        sys.exit(f'error: {e}')
    if not (cuda or device == 'cpu'):
        sys.exit(f"error: --device {device!r}: this script checks the CUDA path (--device cuda, cuda:N), or runs as a "
                 "smoke test with --device cpu")
    torch.backends.cuda.matmul.allow_tf32 = False # fp32 comparisons mean fp32 here
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if cuda else 'CPU'
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix='gpu_check-')
    if not (REPO / 'data' / 'pydocs_char' / 'train.bin').exists(): # once, before the runs start side by side
        prepare('pydocs_char', out_dir=str(REPO / 'data' / 'pydocs_char'))
    try:
        # the checks run side by side (small models; each train.py is its own process), the figures alone after them
        # (on a CPU one chain: float16 there still saves and restores the GradScaler, and computes in float32)
        variants = [('bfloat16', True), ('float16', True), ('float32', False)] if cuda else [('float16', False)]
        jobs = [threading.Thread(target=chain, args=(device, dtype, compile, work)) for dtype, compile in variants]
        if cuda:
            jobs.append(threading.Thread(target=fsdp, args=(device, work)))
        for job in jobs:
            job.start()
        across_devices(device, work)
        modded(device, work)
        finetune(device, work)
        for job in jobs:
            job.join()
        speed(device, SIZES['cuda' if cuda else 'cpu'], work)
    finally:
        if args.keep:
            print(f'work folder kept: {work}')
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = [c for c in checks if not c[1]]
    print(f"\n{name}, torch {torch.__version__}: {len(checks) - len(failed)} of {len(checks)} checks passed "
          f"in {time.perf_counter() - t_start:.0f} s\n")
    print('| check | result | measured | tolerance |\n| --- | --- | --- | --- |')
    for c, ok, measured, tolerance in checks:
        print(f"| {c} | {'pass' if ok else 'FAIL'} | {measured} | {tolerance} |")
    print('\n| figure | value |\n| --- | --- |')
    for f, value in figures:
        print(f'| {f} | {value} |')
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
