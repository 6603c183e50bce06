"""
LoRA fine-tuning vs full fine-tuning of a modded-nanogpt checkpoint, on the generated Hindi NLI task of
data/synthetic_xnli.py (make_hf_datasets: 240 train / 60 validation / 90 test examples) with a random-weight
small-layout checkpoint: trainable parameters, time per step (as a ratio to full fine-tuning, measured in the same
run) and test accuracy. One CPU thread; the numbers printed are what the README quotes.
$ python bench/bench_finetune_lora.py [--model_dim 128] [--epochs 3]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.tokenizer import hf_spec_from_file, load_tokenizer  # noqa: E402
from load_checkpoint_helper import make_random_checkpoint  # noqa: E402
from data.synthetic_xnli import make_examples, make_hf_datasets, round_up, train_tokenizer  # noqa: E402


def run(work, mode_args, common):
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'HF_DATASETS_OFFLINE': '1'}
    out = subprocess.run([sys.executable, str(REPO / 'finetune_hindi_xnli.py'), *common, *mode_args], cwd=work,
                         env=env, capture_output=True, text=True, check=True).stdout
    trainable = int(re.search(r'trainable: ([\d,]+) of', out).group(1).replace(',', ''))
    ms = [float(m) for m in re.findall(r'(\d+) ms/step', out)][1:]  # the first window includes warm-up
    return trainable, sorted(ms)[len(ms) // 2], json.loads((work / mode_args[-1] / 'results.json').read_text())


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--model_dim', type=int, default=128)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--rank', type=int, default=8)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix='bench-lora-'))
    make_hf_datasets(work)
    tokenizer = train_tokenizer([t for a, b, _ in make_examples(300, 0) for t in (a, b)], work / 'tokenizer.json')
    vocab = round_up(load_tokenizer(hf_spec_from_file(tokenizer)).vocab_size)
    ckpt = make_random_checkpoint(work / 'small.pt', vocab_size=vocab, num_layers=8, num_heads=args.model_dim // 32,
                                  model_dim=args.model_dim, head_dim=32)
    common = ['--parent_dataset', str(work / 'hf' / 'xnli-hi'), '--no_subset', '--pretrained_ckpt_path', str(ckpt),
              '--tokenizer_name', str(tokenizer), '--n_head', str(args.model_dim // 32), '--device', 'cpu',
              '--num_epochs', str(args.epochs), '--batch_size', '16', '--log_interval', '5']
    full = run(work, ['--learning_rate', '2e-3', '--head_learning_rate', '3e-3', '--out_dir', 'full'], common)
    lora = run(work, ['--learning_rate', '1e-2', '--head_learning_rate', '3e-3', '--lora_rank', str(args.rank),
                      '--out_dir', 'lora'], common)
    print(f'8 layers x {args.model_dim}, {args.epochs} epochs of 15 steps, batch 16, one CPU thread')
    print(f"{'mode':<18}{'trainable':>12}{'ms/step':>10}{'vs full':>9}{'test accuracy':>15}")
    for name, (trainable, ms, res) in (('full fine-tuning', full), (f'LoRA rank {args.rank}', lora)):
        print(f"{name:<18}{trainable:>12,}{ms:>10.0f}{ms / full[1]:>9.2f}{res['accuracy']:>15.4f}")


if __name__ == '__main__':
    main()
