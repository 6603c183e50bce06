"""
Print what a checkpoint is, without loading its optimizer state (or, for a bundle, its weights):
$ python inspect_model.py --model_name dante
$ python inspect_model.py --model_name dante --legacy_checkpoint final.pt
$ python inspect_model.py --checkpoint out/ckpt.pt           # a public nanoGPT checkpoint
Every kind in core/checkpoint.py's KINDS is read: bundles, legacy files, Hugging Face GPT-2 directories, and the
classifiers finetune_hindi_xnli.py writes.
"""

import os
from pathlib import Path

from model import ADAPTER_FIELDS
from core.checkpoint import CheckpointError, describe_adapters
from core.args import Parser
from core.cli import add_checkpoint_args, open_checkpoint, run
from core.tokenizer import TOKENIZERS


def size(path):
    n = os.path.getsize(path)
    return f'{n / 1e6:.1f} MB' if n >= 1e5 else f'{n / 1e3:.1f} KB'


def describe_tokenizer(spec):
    if spec is None:
        return ['kind      : unknown (no vocabulary stored; pass --meta PATH to name one)']
    kind = spec.get('token_kind')
    return TOKENIZERS[kind].describe(spec) if isinstance(kind, str) and kind in TOKENIZERS else [f'kind      : {kind}']


def list_files(path):
    files = sorted(f for f in os.listdir(path) if not f.startswith('.') and os.path.isfile(os.path.join(path, f)))
    return 'Files: ' + ', '.join(f'{f} ({size(os.path.join(path, f))})' for f in files)


def gpt_config(ck):
    try:
        ck.weights() # the config is checked against the weights' own shapes: what is printed is what they are
    except CheckpointError as e:
        ck.notes.append(f'the config above was not confirmed by the weights: {e}')
    lines = [', '.join(f'{k}:{v}' for k, v in vars(ck.config).items() if k not in ADAPTER_FIELDS)]
    run_config = ck.training_state.get('config') or {}
    keys = [k for k in ('dataset', 'batch_size', 'block_size', 'learning_rate', 'max_iters', 'device', 'dtype') if k in run_config]
    return lines + (['run: ' + ', '.join(f'{k}:{run_config[k]}' for k in keys)] if keys else [])


def gpt_state(ck):
    lines = [f'{label}: {ck.training_state[key]:.4f}' for key, label in
             (('best_val_loss', 'Best val loss'), ('val_loss', 'Val loss of these weights'))
             if ck.training_state.get(key) is not None]
    lines += [f"Trained with adapters: {describe_adapters(ck.training_state.get('adapter') or {})}",
              f'Optimizer state: {ck.describe_optimizer()}']
    factors = ck.training_state.get('adapter_file') or ('in the shards' if 'adapter' in ck.shard_parts() else None)
    if factors:
        lines.append(f"Adapter factors: {factors} (restored when resuming with the same adapters)")
    return lines


def classifier_config(ck):
    """ finetune_hindi_xnli.py's bundle: its own config (a modded-nanogpt backbone and a classification head) """
    config = ck.details
    lines = [', '.join(f'{k}:{v!r}' if isinstance(v, str) and '\n' in v else f'{k}:{v}' for k, v in config.items()
                       if not isinstance(v, (dict, list)) and k != 'format_version')]
    if config.get('labels'):
        lines.append(f"labels: {', '.join(map(str, config['labels']))}")
    if isinstance(config.get('pretrained'), dict):
        lines.append('pretrained: ' + ', '.join(f'{k}:{v}' for k, v in config['pretrained'].items()))
    lora = config.get('lora')
    lines.append(f"trained with: LoRA rank {lora['rank']}, alpha {lora['alpha']} on attention and MLP (merged in model.pt"
                 + ('; the factors in adapter.pt)' if (Path(ck.path) / 'adapter.pt').is_file() else ')')
                 if isinstance(lora, dict) else 'trained with: full fine-tuning')
    if config.get('text_columns'):
        lines.append(f"data: text columns {', '.join(config['text_columns'])}; label column {config.get('label_column')}")
    return lines


def classifier_state(ck):
    metrics = {k: v for k, v in (ck.training_state.get('metrics') or {}).items() if isinstance(v, float)}
    lines = ['Validation: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items())] if metrics else []
    return lines + [f"Optimizer state: {'optimizer.pt' if os.path.exists(ck.file('optimizer.pt')) else 'none'}"]


def describe_probe(ck, verify):
    """ the probe the checkpoint stores; with --verify, the model built and the probe run (a mismatch exits 1) """
    probe = ck.probe()
    if probe is None:
        return ['none stored (written before checkpoints carried one): nothing to verify']
    stored = (f"{len(probe['ids'])} sequences of {len(probe['ids'][0])} tokens: their next-token log-probabilities "
              f"and the last position's top {len(probe['top_ids'][0])} logits, as the saving model computed them")
    if not verify:
        return [stored, '--verify builds the model and runs it']
    return [stored, ck.build_model()[1]['probe']]


def main(args):
    ck = open_checkpoint(args)
    gpt = ck.config is not None # else a checkpoint of another kind of model (KINDS' gpt=False rows)
    where = list_files(ck.path) if os.path.isdir(ck.path) else f'Size: {size(ck.path)}'
    sections = {'FORMAT': [ck.title, f'Location: {ck.path}', where],
                'CONFIG': gpt_config(ck) if gpt else classifier_config(ck),
                'TOKENIZER': describe_tokenizer(ck.tokenizer),
                'TRAINING STATE': [f'Last recorded training step: {ck.step}'] + (gpt_state(ck) if gpt else classifier_state(ck))
                                  + [f'Note: {note}' for note in ck.notes]}
    if gpt:
        sections['PROBE'] = describe_probe(ck, args.verify)
    print('\n\n'.join(f'=== {name} ===\n' + '\n'.join(lines) for name, lines in sections.items()))


if __name__ == '__main__':
    parser = Parser(description=__doc__.strip().splitlines()[0])
    add_checkpoint_args(parser)
    parser.add_argument('--verify', action='store_true', help='build the model and run the probe the checkpoint stores: '
                        'exit 1 when the model does not compute what the saved one did')
    run(main, parser.parse_args())
