"""
What train.py checks in its settings before any work, as two tables of rules: ERRORS, settings no run can use (one
clear paragraph, never an assert or a crash deep inside torch), and NOTES, settings that other settings switch off
(said, never silently dropped). Each rule is a predicate on the config and a message formatted with it. check_train_config()
applies them once.
"""

import os

from configurator import ConfigError
from model import ADAPTER_FIELDS, BASE_FIELDS, GPTConfig
from core.cli import DTYPES, check_device
from core.commit import CheckpointError, is_plain_name

# ranges: written so that NaN fails each
CHOICES = {'dtype': DTYPES, 'embedding_mode': ('standard', 'lora')}
AT_LEAST_ONE = ('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'eval_interval', 'eval_iters',
                'log_interval', 'gradient_accumulation_steps')
AT_LEAST_ZERO = ('max_iters', 'warmup_iters', 'lr_decay_iters', 'n_hidden', 'attn_lora_rank', 'mlp_lora_rank',
                 'embedding_rank', 'learning_rate', 'min_lr', 'weight_decay', 'grad_clip')
FRACTIONS = ('dropout', 'lora_dropout', 'beta1', 'beta2') # in [0, 1)
POSITIVE = ('lora_alpha',) # the update is scaled by lora_alpha / rank: 0 would train adapters that change nothing


def expected_value(key, value):
    """ what `key` must be, when `value` is not that; else None """
    if key in CHOICES:
        return None if value in CHOICES[key] else f'one of {", ".join(CHOICES[key])}'
    if key in FRACTIONS:
        return None if 0 <= value < 1 else 'at least 0 and below 1'
    if key in POSITIVE:
        return None if value > 0 else 'above 0'
    bound = 1 if key in AT_LEAST_ONE else 0
    return None if value >= bound else f'at least {bound}'


def checkpoint_dir(c):
    """ where the run's checkpoints go: checkpoints/<model_name> (the bundle format's layout), else out_dir """
    return os.path.join('checkpoints', c['model_name']) if c['model_name'] else c['out_dir']


def torchrun():
    return os.environ.get('RANK') is not None


# (the run cannot work when this holds, the message)
ERRORS = [
    (lambda c: c['n_embd'] % c['n_head'],
     'n_embd = {n_embd} is not divisible by n_head = {n_head}: each head gets n_embd / n_head dimensions'),
    (lambda c: not is_plain_name(c['dataset']),
     'dataset = {dataset!r} is not a dataset name: it names a folder in data/ (e.g. pydocs_char), not a path'),
    (lambda c: c['model_name'] and not is_plain_name(c['model_name']),
     'model_name = {model_name!r} is not a name: checkpoints live in checkpoints/<model_name>, so no paths'),
    (lambda c: c['resume_from'] and c['init_from'] not in ('scratch', 'resume')
     and os.path.abspath(c['resume_from']) != os.path.abspath(c['init_from']),
     'init_from = {init_from!r} and resume_from = {resume_from!r} name two checkpoints: pass one of them'),
    (lambda c: c['adapter_from'] and (c['resume_from'] or c['init_from'] == 'resume'),
     "adapter_from = {adapter_from!r} starts a run from a peft adapter, and resume_from / init_from = 'resume' "
     'continues one of ours: pass one of them (the base model of the adapter goes in init_from)'),
    (lambda c: c['fsdp'] and not torchrun(),
     'fsdp = True shards the model across the processes that torchrun starts, and this run is one process: '
     'run it as torchrun --standalone --nproc_per_node=N train.py ... (N = 1 works too), or leave out --fsdp'),
    (lambda c: c['fsdp'] and c['dtype'] == 'float16',
     "dtype = 'float16' cannot be used with fsdp = True (its gradient scaler does not work on sharded gradients): "
     'use --dtype=bfloat16, or float32'),
    (lambda c: os.path.exists(checkpoint_dir(c)) and not os.path.isdir(checkpoint_dir(c)),
     'out_dir = {checkpoint_dir!r} is a file: checkpoints are written as a directory there; name a directory'),
]

# (a setting is not used when this holds, what is said)
NOTES = [
    (lambda c: c['embedding_mode'] == 'lora' and c['embedding_rank'] == 0,
     "embedding_mode = 'lora' with embedding_rank = 0: the embedding stays standard (pass --embedding_rank=N)"),
    (lambda c: c['embedding_mode'] == 'standard' and c['embedding_rank'] > 0,
     "embedding_rank = {embedding_rank} is not used: embedding_mode = 'standard' (pass --embedding_mode=lora for "
     'LoRA on the token embedding)'),
    (lambda c: c['model_name'] and c['out_dir'] != 'out',
     'out_dir = {out_dir!r} is not used: with model_name, checkpoints live in checkpoints/{model_name}'),
]


def check_train_config(config):
    """ the notes to say about train.py's `config`, or a ConfigError (a SetupError for a device this machine lacks)
    naming the first setting no run can use """
    for key in AT_LEAST_ONE + AT_LEAST_ZERO + FRACTIONS + POSITIVE + tuple(CHOICES):
        expected = expected_value(key, config[key])
        if expected:
            raise ConfigError(f'{key} = {config[key]!r} cannot be used: it must be {expected}')
    values = {**config, 'checkpoint_dir': checkpoint_dir(config)}
    for holds, message in ERRORS:
        if holds(config):
            raise ConfigError(message.format(**values))
    check_device(config['device'], name='device =', fix='--device=cpu')
    return [message.format(**values) for holds, message in NOTES if holds(config)]


# -----------------------------------------------------------------------------
# a resume: what the checkpoint decides, said

def check_vocabulary(ckpt, meta, data_dir):
    """ the checkpoint was trained on this dataset's vocabulary (or stores none, and this one fits its embedding) """
    if ckpt.tokenizer is not None and ckpt.tokenizer != meta['tokenizer']:
        raise CheckpointError(f"{ckpt.path} was trained with another tokenizer than {data_dir}/meta.json's "
                              f"({ckpt.tokenizer.get('token_kind')} vs {meta['tokenizer'].get('token_kind')}, "
                              f"vocab {ckpt.config.vocab_size} vs {meta['vocab_size']}): pick the dataset it was trained on")
    if ckpt.tokenizer is None and meta['vocab_size'] > ckpt.config.vocab_size:
        raise CheckpointError(f"{ckpt.path} stores no vocabulary, and {data_dir}/meta.json's has {meta['vocab_size']} "
                              f"tokens where the model has {ckpt.config.vocab_size} embedding rows: ids past "
                              f"{ckpt.config.vocab_size - 1} have no embedding. Pick the dataset it was trained on")


def resume_notes(ckpt, config, given, defaults, meta, data_dir):
    """ the settings of this config that the checkpoint overrides or leaves unused, in words """
    notes = []
    for k in BASE_FIELDS:
        ours, theirs = config.get(k), getattr(ckpt.config, k)
        if k in given and ours != theirs and not (k == 'n_hidden' and ours == 0) and k != 'block_size':
            notes.append(f"{k} = {theirs} from the checkpoint is used (this config says {ours})")
    trained = ckpt.trained_adapters()
    adapters = {k: config[k] for k in ADAPTER_FIELDS}
    if GPTConfig(**{**adapters, **trained}).uses_lora and not GPTConfig(**adapters).uses_lora and not given & set(ADAPTER_FIELDS):
        flags = ' '.join(f'--{k}={v}' for k, v in trained.items() if v != defaults[k])
        notes.append(f"{ckpt.path} was trained with LoRA; this run sets no adapters, so the merged weights go on as a "
                     f"standard model (all of them trainable). To continue the adapters instead: {flags}")
    if ckpt.tokenizer is None:
        notes.append(f"{ckpt.path} stores no vocabulary: {data_dir}/meta.json's ({meta['vocab_size']} tokens) is used "
                     f"with the model's {ckpt.config.vocab_size} embedding rows, and saved with the checkpoint")
    ours, theirs = config['block_size'], ckpt.config.block_size # the checkpoint has position embeddings for `theirs`
    if ours < theirs:
        notes.append(f"block_size = {ours} from this config: the checkpoint's {theirs} position embeddings are cropped "
                     f"to the first {ours} (nanoGPT's crop_block_size; their optimizer state starts fresh)")
    elif ours > theirs:
        notes.append(f"block_size = {theirs} from the checkpoint is used: it has position embeddings for {theirs} "
                     f"positions only, so this config's {ours} cannot be honoured; batches, evaluation and "
                     f"generation use {theirs}")
    return notes


def nothing_saved_note(config, saved, trained_steps, iter_num, in_place, resume_path, best_val_loss):
    """ why a run wrote no checkpoint, so an unchanged out_dir is no surprise; None when it saved, or said so before """
    if config['eval_only']:
        return "eval_only = True: nothing was saved (an evaluation never rewrites a checkpoint)"
    if saved or (in_place and trained_steps == 0):
        return None
    if iter_num == 0:
        convert = f"; python convert_checkpoints.py {resume_path} --to bundle DIR writes it as a bundle" if resume_path else ''
        return f"nothing was saved to {config['out_dir']}: no step was trained (max_iters = {config['max_iters']}){convert}"
    return (f"nothing was saved to {config['out_dir']}: the val loss never went below best_val_loss {best_val_loss:.4f} "
            "(always_save_checkpoint = False)")
