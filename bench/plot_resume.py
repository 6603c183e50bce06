"""
Resume continuity as a picture: the loss per step of one uninterrupted train.py run, against the same run
interrupted at step K and resumed
  (a) with the same config,
  (b) by 2 processes after 1, and by 1 after 2 (the same tokens per step: 2 micro-steps in one process, 1 in each of two),
  (c) as LoRA (r16) after standard, then (d) at rank 32 after rank 16,
  (e) after a kill -9 in the middle of a save.
(a) and (e) repeat the uninterrupted run exactly; (b) draws other batches (each process has its own stream), so it
can only follow the curve within the batch-to-batch noise, measured as the distance to the same run with another
seed; (c) and (d) change the model, so they must start where the checkpoint stopped (the same loss on the same
batch) and go their own way from there. check_claims() returns those claims with their numbers; tests/test_bench.py
asserts them, the picture only shows them.
$ pip install -r requirements-bench.txt && python bench/plot_resume.py      # about a minute on 2 cores; resume.png
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.args import Parser
from core.training import read_resume_check as resume_check

N, K, M = 40, 20, 30 # steps in all, the interruption, the rank change of (d)
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4', '--eval_iters=5',
        '--gradient_accumulation_steps=2', '--log_interval=1', '--warmup_iters=5', '--lr_decay_iters=100',
        '--device=cpu', '--compile=False']
LORA = ['--attn_lora_rank={r}', '--mlp_lora_rank={r}', '--lora_alpha=16']
# installed as sitecustomize in run (e): the process kills itself with SIGKILL while writing its third save's
# manifest (step 30): the save's files are in its hidden directory, the checkpoint of step 20 still in place
KILL_HOOK = '''
import os, signal
real_fsync, count = os.fsync, [0]
def fsync(fd):
    path = os.readlink(f'/proc/self/fd/{fd}')
    if '.saving-' in path and os.path.basename(path) == 'manifest.json':
        count[0] += 1
        if count[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_fsync(fd)
os.fsync = fsync
'''


def train(work, *args, processes=1, hook=None, ok=True):
    """ train.py as a user runs it; {step: train loss of that step} from its log, and its output """
    command = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}']
               if processes > 1 else [sys.executable]) + [str(REPO / 'train.py'), *TINY, *map(str, args)]
    path = os.pathsep.join([str(hook)] * bool(hook) + [str(REPO)])
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHONPATH': path, 'OMP_NUM_THREADS': '1'})
    out = proc.stdout + proc.stderr
    if ok and proc.returncode:
        raise RuntimeError(f'train.py {" ".join(map(str, args))} failed:\n{out[-3000:]}')
    return {int(i): float(x) for i, x in re.findall(r'^iter (\d+): loss ([\d.]+)', out, re.M)}, out


def collect(work):
    """ every run's losses by step, and the resume checks: {name: (losses, |val now - stored|)} """
    work = Path(work)
    lora = lambda r: [a.format(r=r) for a in LORA]
    curves = {}
    curves['uninterrupted'] = train(work, '--out_dir=u', f'--max_iters={N}', f'--eval_interval={K}')[0]
    curves['another seed'] = train(work, '--out_dir=s', f'--max_iters={N}', f'--eval_interval={K}', '--seed=7')[0]
    # (e) first: killed while saving step 30, its checkpoint is step 20's, a copy of which the other resumes start from
    hook = work / 'hook'
    hook.mkdir()
    (hook / 'sitecustomize.py').write_text(KILL_HOOK)
    killed = train(work, '--out_dir=e', f'--max_iters={N}', '--eval_interval=10', hook=hook, ok=False)[0]
    shutil.copytree(work / 'e', work / 'k') # (the killed save's leftovers lie beside e, not in it)
    resumed = lambda name, source, *args, **kw: train(work, f'--resume_from={source}', f'--out_dir={name}',
                                                      f'--eval_interval={K}', *args, **kw)
    runs = {'(a) same config': resumed('a', 'k', f'--max_iters={N}'),
            '(b) 2 processes after 1': resumed('b', 'k', f'--max_iters={N}', processes=2)}
    train(work, '--out_dir=k2', f'--max_iters={K}', f'--eval_interval={K}', processes=2)
    runs['(b) 1 process after 2'] = resumed('b2', 'k2', f'--max_iters={N}')
    runs['(c) LoRA r16 after standard'] = resumed('c', 'k', f'--max_iters={M}', *lora(16))
    c_on = resumed('c2', 'c', f'--max_iters={N}', *lora(16))
    runs['(d) rank 32 after rank 16'] = resumed('d', 'c', f'--max_iters={N}', *lora(32))
    runs['(e) after a kill -9 mid-save'] = resumed('e', 'e', f'--max_iters={N}')
    out = {name: (curves[name], None) for name in curves}
    out['killed (e)'] = (killed, None)
    for name, (losses, text) in runs.items():
        if name.startswith('(c)'):
            losses = {**losses, **c_on[0]} # the LoRA run goes on past M with the same config
        now, stored = resume_check(text) # |first evaluation after the resume - the one stored|
        out[name] = (losses, abs(now - stored))
    return out


def check_claims(data):
    """ [(claim, holds, the numbers)] """
    u = data['uninterrupted'][0]
    gap = lambda losses, steps: max(abs(losses[s] - u[s]) for s in steps)
    mean_gap = lambda losses: sum(abs(losses[s] - u[s]) for s in range(K, N)) / (N - K)
    claims = []
    killed = data['killed (e)'][0]
    same = gap(killed, range(max(killed) + 1))
    claims.append(('the run killed mid-save is the uninterrupted run up to the kill', same == 0.0, f'max |diff| {same:.1e}'))
    for name in ('(a) same config', '(e) after a kill -9 mid-save'):
        losses, check = data[name]
        start = min(losses)
        d = gap(losses, range(start, N))
        claims.append((f'{name}: steps {start}-{N - 1} repeat the uninterrupted run', d == 0.0 and check <= 1e-4,
                       f'max |loss diff| {d:.1e}, val now vs stored {check:.1e}'))
    claims.append(('(e) resumed from the last complete checkpoint (step 20), after the kill at the save of step 30',
                   min(data['(e) after a kill -9 mid-save'][0]) == 20 and max(data['killed (e)'][0]) == 29,
                   f"killed after step {max(data['killed (e)'][0])}, resumed at {min(data['(e) after a kill -9 mid-save'][0])}"))
    noise = mean_gap(data['another seed'][0])
    for name in ('(b) 2 processes after 1', '(b) 1 process after 2'):
        losses, check = data[name]
        d = mean_gap(losses)
        claims.append((f'{name}: follows the curve within the noise of another seed', d <= 1.5 * noise and check <= 1e-4,
                       f'mean |loss diff| {d:.3f} vs another seed {noise:.3f}, max {gap(losses, range(K, N)):.3f}; '
                       f'val now vs stored {check:.1e}'))
    for name, at, before in (('(c) LoRA r16 after standard', K, u), ('(d) rank 32 after rank 16', M,
                                                                      data['(c) LoRA r16 after standard'][0])):
        losses, check = data[name]
        d = abs(losses[at] - before[at])
        claims.append((f'{name}: starts from the stored loss (its first step, the same batch)', d <= 1e-5 and check <= 1e-4,
                       f'step {at} loss |diff| {d:.1e}, val now vs stored {check:.1e}'))
    return claims


def plot(data, path):
    import matplotlib # bench-only (requirements-bench.txt)
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5))
    styles = {'uninterrupted': dict(color='black', lw=3, alpha=0.35), 'another seed': dict(color='grey', lw=1, ls=':'),
              '(a) same config': dict(marker='o', ms=3, ls='none'), '(e) after a kill -9 mid-save': dict(marker='x', ms=5, ls='none')}
    for name, (losses, _) in data.items():
        if name == 'killed (e)':
            continue
        steps = sorted(losses)
        ax.plot(steps, [losses[s] for s in steps], label=name, **styles.get(name, dict(lw=1)))
    ax.axvline(K, color='grey', lw=0.5)
    ax.axvline(M, color='grey', lw=0.5, ls='--')
    ax.set_xlabel('step')
    ax.set_ylabel('train loss (the logged micro-batch)')
    ax.set_title(f'train.py resumed at step {K} (and {M} for the rank change), tiny model on CPU')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = Parser(description='Plot resume continuity and check its claims.')
    parser.add_argument('--out', default='resume.png', help='the picture (PNG)')
    args = parser.parse_args()
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not args.out.lower().endswith('.png'):
        sys.exit(f'error: --out {args.out}: expected a .png file in an existing folder ({folder} '
                 f"{'exists' if os.path.isdir(folder) else 'does not exist'}); the runs take about a minute, so this "
                 'is checked first')
    if importlib.util.find_spec('matplotlib') is None: # checked before the runs, not after them
        sys.exit('error: bench/plot_resume.py draws with matplotlib, which is not installed: '
                 'pip install -r requirements-bench.txt')
    with tempfile.TemporaryDirectory(prefix='plot_resume-') as work:
        data = collect(work)
    claims = check_claims(data)
    for claim, holds, numbers in claims:
        print(f"{'ok  ' if holds else 'FAIL'} {claim}: {numbers}")
    plot(data, args.out)
    print(f'wrote {args.out}')
    sys.exit(0 if all(holds for _, holds, _ in claims) else 1)


if __name__ == '__main__':
    main()
