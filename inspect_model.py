"""
Print what a checkpoint is, without loading its optimizer state (or, for a bundle, its weights):
$ python inspect_model.py --model_name dante
$ python inspect_model.py --model_name dante --legacy_checkpoint final.pt
$ python inspect_model.py --checkpoint out/ckpt.pt           # a public nanoGPT checkpoint
"""

import argparse
import os

from core.checkpoint import ADAPTER_FIELDS
from core.cli import add_checkpoint_args, open_checkpoint, run

FORMAT_NAMES = {'bundle': 'New JSON-based format', 'nanogpt': 'Legacy single file (nanoGPT ckpt.pt)',
                'legacy': 'Legacy single file'}


def size(path):
    n = os.path.getsize(path)
    return f'{n / 1e6:.1f} MB' if n >= 1e5 else f'{n / 1e3:.1f} KB'


def describe_tokenizer(spec):
    if spec is None:
        return ['kind      : unknown (no vocabulary stored; pass --meta PATH to name one)']
    kind = spec.get('token_kind')
    if kind == 'char':
        return ['kind      : char', f"vocab     : {len(spec['chars'])} characters"]
    if kind == 'gpt2':
        return ['kind      : gpt2', 'vocab     : GPT-2 BPE (fixed ~50k tokens)']
    if kind == 'hf':
        vocab = spec.get('tokenizer', {}).get('model', {}).get('vocab', {})
        return ['kind      : hf (Hugging Face tokenizers)', f'vocab     : {len(vocab)} tokens in the model, plus added tokens']
    return [f'kind      : {kind}']


def describe_adapters(adapter):
    ranks = [f"{name} r{adapter[key]}" for name, key in (('attention', 'attn_lora_rank'), ('mlp', 'mlp_lora_rank'))
             if adapter.get(key)]
    if adapter.get('embedding_mode') == 'lora' and adapter.get('embedding_rank'):
        ranks.append(f"embedding r{adapter['embedding_rank']}")
    return f"LoRA {', '.join(ranks)}, alpha {adapter.get('lora_alpha')}" if ranks else 'none (standard)'


def main(args):
    ck = open_checkpoint(args)
    print('=== FORMAT ===')
    print(FORMAT_NAMES[ck.kind])
    print(f'Location: {ck.path}')
    if ck.kind == 'bundle':
        files = sorted(f for f in os.listdir(ck.path) if not f.startswith('.') and os.path.isfile(os.path.join(ck.path, f)))
        print('Files: ' + ', '.join(f'{f} ({size(os.path.join(ck.path, f))})' for f in files))
    else:
        print(f'Size: {size(ck.path)}')
    print()
    print('=== CONFIG ===')
    config = {k: v for k, v in vars(ck.config).items() if k not in ADAPTER_FIELDS}
    print(', '.join(f'{k}:{v}' for k, v in config.items()))
    run_config = ck.training_state.get('config') or {}
    if run_config:
        keys = [k for k in ('dataset', 'batch_size', 'block_size', 'learning_rate', 'max_iters', 'device', 'dtype') if k in run_config]
        print('run: ' + ', '.join(f'{k}:{run_config[k]}' for k in keys))
    print()
    print('=== TOKENIZER ===')
    print('\n'.join(describe_tokenizer(ck.tokenizer)))
    print()
    print('=== TRAINING STATE ===')
    print(f'Last recorded training step: {ck.step}')
    for key, label in (('best_val_loss', 'Best val loss'), ('val_loss', 'Val loss of these weights')):
        if ck.training_state.get(key) is not None:
            print(f'{label}: {ck.training_state[key]:.4f}')
    print(f"Trained with adapters: {describe_adapters(ck.training_state.get('adapter') or {})}")
    if ck.kind == 'bundle':
        name = ck.training_state.get('optimizer_file')
        print(f'Optimizer state: {name} (keyed by parameter name)' if name else 'Optimizer state: none (deploy-only save)')
        if ck.training_state.get('adapter_file'):
            print(f"Adapter factors: {ck.training_state['adapter_file']} (restored when resuming with the same adapters)")
    else:
        print(f"Optimizer state: {'present, named by nanoGPT order' if ck.optimizer_state() else 'none usable'}")
    for note in ck.notes:
        print(f'Note: {note}')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_checkpoint_args(parser)
    run(main, parser.parse_args())
