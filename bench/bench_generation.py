"""
Generation and generative fine-tuning of a modded-nanogpt checkpoint (medium layout, random weights) on the CPU, as
ratios to references measured in the same run:
- beam search (core/beam_search.py: the beams as one batch over a key/value cache) against the fork's cache-free
  search (beam_search_without_cache: one beam at a time, the whole prefix recomputed every token) on the same model
  and prompts; the two must return the same sequences, or the benchmark fails. The LM head is scaled up (HEAD_SCALE)
  so that the next-token distributions are peaked, not near-uniform; EOS is the vocabulary's last id, and how many
  tokens were generated is printed. Also printed: the smallest score gap between adjacent candidates the search ranked
  (how close it came to a tie) and the largest difference between the two searches' log-probabilities;
- a training step (forward, backward, AdamW step) of the generative fine-tune (finetune_xlsum.py: GPTBatched with its
  LM head, token_loss, labels -100 on the first half of each row) against one of the classification fine-tune
  (finetune_hindi_xnli.py's NLIClassifier, 3 classes) on the same checkpoint and input batch, and with LoRA
  (add_modded_lora) against full fine-tuning: the median step after warm-up, the steps taken in turns;
- LoRA against full fine-tuning: trainable parameters, and peak memory: the growth of the peak RSS (VmHWM) of a fresh
  process over a few training steps (optimizer state, gradients, activations) from its RSS once the model is built and
  every weight read (/proc/self/clear_refs resets the peak there).
$ python bench/bench_generation.py --size tiny      # seconds; CI runs it as a smoke test
$ python bench/bench_generation.py                  # 12 layers x 128, 1,024-token prompts: about a minute on 2 cores
Run it on otherwise idle cores: with another process on them, the cache-free search (many long forwards over both
threads) slows down far more than ours, and the speed-up comes out larger than it is.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
import torch.nn.functional as F

import core.beam_search as search
import finetune_hindi_xnli
import finetune_xlsum
from core.beam_search import beam_search, beam_search_without_cache
from finetune_hindi_xnli import NLIClassifier
from finetune_xlsum import collate, token_loss
from load_checkpoint_helper import load_pretrained_checkpoint, make_random_checkpoint
from model import add_modded_lora

SIZES = {
    'tiny': dict(model=dict(vocab_size=500, num_layers=8, num_heads=2, model_dim=64, head_dim=32),
                 prompt=48, new_tokens=8, beams=4, prompts=2, batch=(2, 32), steps=3, warmup=1, rss_steps=2,
                 lora_rank=4),
    'full': dict(model=dict(vocab_size=2000, num_layers=12, num_heads=2, model_dim=128, head_dim=64),
                 prompt=1024, new_tokens=64, beams=4, prompts=3, batch=(4, 256), steps=7, warmup=2, rss_steps=3,
                 lora_rank=8),
}
HEAD_SCALE = 4.0 # random head rows of norm ~1 on RMS-normed features give near-uniform next tokens; x4: peaked
OPTIMIZER_ARGS = SimpleNamespace(learning_rate=1e-4, head_learning_rate=1e-3, weight_decay=0.1)


def threads():
    return len(os.sched_getaffinity(0))


def max_seq_len(spec):
    return max(spec['prompt'] + spec['new_tokens'], spec['batch'][1])


def load(ckpt, spec, lm_head):
    """ the checkpoint as finetune_xlsum.py (lm_head) or finetune_hindi_xnli.py (backbone) loads it """
    model = load_pretrained_checkpoint(ckpt, num_heads=spec['model']['num_heads'], max_seq_len=max_seq_len(spec),
                                       verbose=False, lm_head=lm_head)[0]
    if lm_head:
        with torch.no_grad():
            model.lm_head_w.mul_(HEAD_SCALE)
    return model


def training_batch(spec, seed=0):
    """ (x, y) as finetune_xlsum.py's collate gives them, labels -100 on each row's first half; 3-class labels """
    n, length = spec['batch']
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec['model']['vocab_size'], (n, length), generator=g).tolist()
    x, y = collate([dict(input_ids=row, labels=[-100] * (length // 2) + row[length // 2:]) for row in ids])
    return x, y, torch.randint(0, 3, (n,), generator=g)


def generative_trainer(model):
    model.train()
    optimizer = finetune_xlsum.make_optimizer(model, OPTIMIZER_ARGS)
    def step(x, y, classes):
        total, count = token_loss(model(x), y)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def classification_trainer(model):
    model.train()
    optimizer = finetune_hindi_xnli.make_optimizer(model, OPTIMIZER_ARGS)
    def step(x, y, classes):
        lengths = torch.full((x.size(0),), x.size(1)) # every row is real to its end
        F.cross_entropy(model(x, lengths), classes).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def status(key):
    """ VmRSS / VmHWM of this process, in bytes """
    with open('/proc/self/status') as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024


def training_peak_rss(ckpt, size, lora):
    """ (run in a fresh process) peak RSS growth of rss_steps generative training steps, from the built model """
    spec = SIZES[size]
    torch.set_num_threads(threads())
    torch.manual_seed(0)
    model = load(ckpt, spec, lm_head=True)
    if lora:
        add_modded_lora(model, spec['lora_rank'], float(spec['lora_rank']))
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters()) # every weight in memory (the head's pages are the file's)
    x, y, classes = training_batch(spec)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5') # the peak starts again from the current RSS
    base = status('VmRSS')
    step = generative_trainer(model) # the optimizer's state is part of what is measured
    for _ in range(spec['rss_steps']):
        step(x, y, classes)
    return status('VmHWM') - base


def peak_rss_of(ckpt, size, lora):
    code = (f'import sys; sys.path.insert(0, {str(REPO)!r})\nimport bench.bench_generation as b\n'
            f'print(b.training_peak_rss({str(ckpt)!r}, {size!r}, {lora!r}))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.split()[-1])


class Recorder:
    """ what each search ranks at each step: the beams (score, tokens) and their next-token log-probabilities """

    def __init__(self):
        self.steps = []

    def __enter__(self):
        self.original = search.next_candidates
        def recorded(beams, log_probs, *args):
            self.steps.append(([score for score, _ in beams], [list(tokens) for _, tokens in beams], log_probs.clone()))
            return self.original(beams, log_probs, *args)
        search.next_candidates = recorded # beam_search and beam_search_without_cache look it up at each call
        return self

    def __exit__(self, *exc):
        search.next_candidates = self.original


def smallest_gap(steps, num_beams, eos_id, prompt_len):
    """ the smallest score gap between adjacent candidates among the best num_beams + 1 of any step: how close the
    ranking came to a tie (the kept ones' order decides the best beam at the end, the last one's the cut) """
    gap = float('inf')
    for scores, beams, log_probs in steps:
        top = torch.topk(log_probs, k=num_beams, dim=-1).values.tolist()
        pool = []
        for score, tokens, row in zip(scores, beams, top):
            pool += [score] if search.ended(tokens, eos_id, prompt_len) else [score + lp for lp in row]
        pool = sorted(pool, reverse=True)[:num_beams + 1]
        gap = min([gap] + [a - b for a, b in zip(pool, pool[1:])])
    return gap


def log_prob_difference(ours, reference, vocab_size, eos_id, prompt_len):
    """ the largest |difference| of the two searches' log-probabilities of the live beams (an ended beam's row is
    never read: ours feeds it its EOS again) at the steps where they ranked the same beams, and the first step where
    the beams differ (None: none) """
    largest, first_divergence = 0.0, None
    for i, ((_, beams, lp), (_, ref_beams, ref_lp)) in enumerate(zip(ours, reference)):
        if beams != ref_beams:
            first_divergence = i
            break
        live = [j for j, tokens in enumerate(beams) if not search.ended(tokens, eos_id, prompt_len)]
        largest = max(largest, (lp[live, :vocab_size] - ref_lp[live, :vocab_size]).abs().max().item())
    return largest, first_divergence


def main(size, out_json=None):
    spec = SIZES[size]
    mspec = spec['model']
    vocab, beams, new_tokens, prompt_len = mspec['vocab_size'], spec['beams'], spec['new_tokens'], spec['prompt']
    eos_id = vocab - 1
    torch.set_num_threads(threads())
    rows = []
    def row(what, value, limit_name, limit, target=None, unit='s'):
        """ target: ('<=', x) or ('>=', x), a bound on the ratio """
        ratio = value / limit if limit else float('nan')
        met = None if target is None else (ratio <= target[1] if target[0] == '<=' else ratio >= target[1])
        rows.append(dict(what=what, value=value, unit=unit, limit_name=limit_name, limit=limit, ratio=ratio,
                         target=target and f'{target[0]} {target[1]}x', met=met))
        verdict = '' if target is None else f"   target {target[0]} {target[1]}x: {'met' if met else 'MISSED'}"
        print(f"{what:<46} {value:9.3f} {unit:<2} {limit_name:<34} {limit:9.3f} {unit:<2} {ratio:7.2f}x{verdict}", flush=True)

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix='bench-generation-', dir=os.environ.get('BENCH_DIR')))
    ckpt = make_random_checkpoint(tmp / 'state_step001000.pt', 'medium', **mspec)
    heads = f"{mspec['num_heads']} heads of {mspec['head_dim']}"
    print(f"bench_generation --size {size}: medium layout, {mspec['num_layers']} layers x {mspec['model_dim']} "
          f"({heads}), vocabulary {vocab} (head rows {-(-vocab // 128) * 128}), random weights, head x{HEAD_SCALE:g}; "
          f'torch {torch.__version__}, {threads()} threads\n')
    print(f"{'measure':<46} {'value':>12}  {'limit (same run)':<34} {'':>11} {'ratio':>8}")

    # beam search: ours (beams batched, KV cache) against the fork's cache-free search, prompt by prompt in turns
    model = load(ckpt, spec, lm_head=True).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab - 1, (prompt_len,), generator=g).tolist() for _ in range(spec['prompts'])]
    with torch.no_grad():
        model(torch.tensor([prompts[0][:16]])) # warm-up: lazy initialisation is not what is timed
    t_ours = t_ref = 0.0
    outputs, mismatches, gaps, diffs, top1, not_greedy = [], [], [], [], [], 0
    for i, prompt in enumerate(prompts):
        with Recorder() as ours_log, torch.no_grad():
            t0 = time.perf_counter()
            ours = beam_search(model, prompt, new_tokens, beams, eos_id, vocab)
            t_ours += time.perf_counter() - t0
        with Recorder() as ref_log, torch.no_grad():
            t0 = time.perf_counter()
            reference = beam_search_without_cache(model, prompt, new_tokens, beams, eos_id, vocab)
            t_ref += time.perf_counter() - t0
        outputs.append(len(ours))
        gaps.append(smallest_gap(ref_log.steps, beams, eos_id, prompt_len))
        diff, divergence = log_prob_difference(ours_log.steps, ref_log.steps, vocab, eos_id, prompt_len)
        diffs.append(diff)
        top1 += [lp[:, :vocab].max(-1).values.exp().tolist() for _, _, lp in ref_log.steps]
        not_greedy += ours != beam_search(model, prompt, new_tokens, 1, eos_id, vocab)
        if ours != reference:
            at = next((j for j, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
            mismatches.append(f'prompt {i}: the sequences differ from new token {at} on (ours {ours[at:at + 5]}..., '
                              f'without the cache {reference[at:at + 5]}...); '
                              + ('the beams they ranked were the same at every step' if divergence is None else
                                 f'the beams they ranked differ from step {divergence} on')
                              + f'; smallest candidate gap {gaps[-1]:.3g}, log-probs differ by up to {diff:.3g} '
                              'while the beams were the same')
    n = len(prompts)
    label = f'beam search ({beams} beams, {new_tokens} new tokens, {prompt_len}-token prompt)'
    row('beam search without the cache (s/prompt)', t_ref / n, 'ours: beams batched + KV cache', t_ours / n,
        target=('>=', 10))
    speedup = t_ref / t_ours
    same = 'same sequences' if not mismatches else f'DIFFERENT SEQUENCES in {len(mismatches)} of {n} prompts'
    print(f'  {label}: {t_ours / n:.3g} s vs {t_ref / n:.3g} s without the cache, {speedup:.1f}x faster, {same}'
          + ('' if speedup >= 10 else ' (target 10x NOT met)'))
    generated = (f'all {new_tokens}' if all(k == new_tokens for k in outputs) else
                 f"{', '.join(map(str, outputs))} (of {new_tokens} at most: the shorter ended with EOS)")
    print(f'  {n} prompts; new tokens of the best beam: {generated}, EOS = id {eos_id}; the best '
          f'beam differs from greedy decoding in {not_greedy} of {n}; mean top-1 next-token probability '
          f'{statistics.mean(p for ps in top1 for p in ps):.3f}')
    print(f'  closest call: the smallest gap between adjacent ranked candidates {min(gaps):.3g} (score = sum of '
          f'log-probs); the two searches\' log-probs differ by at most {max(diffs):.3g} (float32: batched cached rows vs '
          f'whole-prefix single rows)')
    for line in mismatches:
        print('  ' + line)
    del model

    # training steps: generative, classification, generative with LoRA; same checkpoint, same input batch, in turns
    torch.manual_seed(0)
    generative = load(ckpt, spec, lm_head=True)
    classifier = NLIClassifier(load(ckpt, spec, lm_head=False), num_classes=3, dropout=0.0)
    lora = add_modded_lora(load(ckpt, spec, lm_head=True), spec['lora_rank'], float(spec['lora_rank']))
    steps = {'generative': generative_trainer(generative), 'classification': classification_trainer(classifier),
             'lora': generative_trainer(lora)}
    batch = training_batch(spec)
    times = {name: [] for name in steps}
    for i in range(spec['warmup'] + spec['steps']):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(*batch)
            if i >= spec['warmup']: # the warm-up steps create the optimizer state
                times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    shape = f"batch {spec['batch'][0]} x {spec['batch'][1]}"
    row(f'generative fine-tuning step ({shape})', median['generative'], 'classification step (3 classes)',
        median['classification'])
    full_params, lora_params = trainable(generative), trainable(lora)
    rank = spec['lora_rank']
    row(f'LoRA rank {rank}: trainable parameters ({100 * lora_params / full_params:.2f}%)', lora_params / 1e6,
        'full fine-tuning', full_params / 1e6, unit='M')
    row(f'LoRA rank {rank}: generative step', median['lora'], 'full fine-tuning step', median['generative'])
    del generative, classifier, lora, steps

    # peak memory: each configuration in a fresh process
    rss_full, rss_lora = peak_rss_of(ckpt, size, False), peak_rss_of(ckpt, size, True)
    row(f"LoRA rank {rank}: peak RSS growth, {spec['rss_steps']} steps", rss_lora / 1e6, 'full fine-tuning',
        rss_full / 1e6, unit='MB')
    print(f"  peak RSS growth: a fresh process per configuration, VmHWM after {spec['rss_steps']} training steps "
          f'(AdamW state, gradients, activations) minus VmRSS once the model is built and every weight read; the '
          f'weights themselves: {4 * full_params / 1e6:.1f} MB in float32')

    results = dict(size=size, threads=threads(), rows=rows, beam=dict(
        prompts=n, beams=beams, new_tokens=new_tokens, prompt_tokens=prompt_len, generated=outputs,
        same_sequences=not mismatches, speedup=speedup, smallest_gap=min(gaps), largest_log_prob_difference=max(diffs),
        not_greedy=not_greedy), trainable=dict(full=full_params, lora=lora_params),
        peak_rss_growth=dict(full=rss_full, lora=rss_lora), seconds=time.perf_counter() - t_start)
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=2))
    subprocess.run(['rm', '-rf', str(tmp)])
    print(f"\n{results['seconds']:.0f} s in all")
    if mismatches:
        raise SystemExit('beam search with the cache and without it gave different sequences:\n' + '\n'.join(mismatches))
    return results


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Beam search with the KV cache against the fork\'s cache-free '
                                     'search; generative against classification and LoRA against full fine-tuning.')
    parser.add_argument('--size', choices=list(SIZES), default='full')
    parser.add_argument('--json', help='also write the results to this file')
    args = parser.parse_args()
    main(args.size, args.json)
