"""
Load modded-nanogpt pretraining checkpoints (train_gpt_small.py's "small" layout, train_gpt_medium.py's "medium"
layout) into GPTBatched for fine-tuning, with explicit rules instead of strict=False:

  from load_checkpoint_helper import inspect_checkpoint, load_pretrained_checkpoint
  info, checkpoint = inspect_checkpoint('best_state_step005000_val3.2811.pt')      # prints what it is
  model, info, checkpoint = load_pretrained_checkpoint(path, device='cpu')        # GPTBatched, loaded strictly

Everything is read from the file: the layout from its keys, vocab size from embed.weight, dimensions from the
tensor shapes. The one thing no shape tells is the head count: it comes from the num_heads argument or the
table of known models, and otherwise loading stops with a clear error (a guess gives a wrong forward).
The rules: `_orig_mod.` stripped, the lm head dropped (a task head goes on the features; lm_head=True keeps it),
scalars checked (at least 5L values, any padding all 1.0) and cut to 5L, small keys mapped to the medium
layout (model.small_to_medium_state_dict), then a strict load.
"""

import os

import torch

from model import (GPTBatched, GPTFlexAttention, KNOWN_HEADS, Rotary, check_state_dict_fits, meta_device,
                   small_to_medium_state_dict, strip_wrapper_prefixes)
from core.commit import CheckpointError, load_tensors

FORMATS = {'small': 'small (from train_gpt_small.py)', 'medium': 'medium (from train_gpt_medium.py)',
           'large-lite': 'large-lite (medium keys, head_dim = model_dim / heads)'}
LM_HEAD_KEYS = ('lm_head.weight', 'lm_head_w') # small, medium


class ModdedCheckpointError(CheckpointError):
    """ a modded-nanogpt checkpoint that cannot be used as asked; the message says why """


EXPECTED = 'expected a .pt file written by train_gpt_small.py or train_gpt_medium.py'
NANOGPT_HINT = ('; these are nanoGPT / GPT-2 keys (transformer.h.N...), a checkpoint of nanoGPT or of this repository\'s '
                'train.py, which inspect_model.py and generate.py read, not a modded-nanogpt one')


def check_tensor_file(path):
    """ name what a file plainly is not before torch.load does, which says e.g. 'KeyError: 101' for a text file """
    if os.path.isdir(path):
        raise ModdedCheckpointError(f'{path} is a directory; {EXPECTED} (a bundle directory of train.py is read by '
                                    'inspect_model.py)')
    if not os.path.exists(path):
        raise ModdedCheckpointError(f'{path} does not exist; {EXPECTED}')
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(64)
        f.seek(max(0, size - 65557)) # the zip end record sits in the last 22 bytes + up to 64 KiB of comment
        tail = f.read()
    if not head:
        raise ModdedCheckpointError(f'{path} is empty (0 bytes); {EXPECTED}')
    if head[:2] == b'PK': # torch.save writes a zip archive, which ends with its end-of-central-directory record
        if b'PK\x05\x06' not in tail:
            raise ModdedCheckpointError(f'{path} is truncated or damaged: it starts as a zip archive (as torch.save '
                                        f'writes) but has no end record ({size:,} bytes); copy the file again')
    elif head[0] != 0x80: # nor the pickle protocol byte that old-style torch.save files start with
        try:
            found = f'text starting {head.decode()[:40]!r}'
        except UnicodeDecodeError as e: # a character cut by the 64 bytes read is still text
            found = (f'text starting {head[:e.start].decode()[:40]!r}' if e.start >= len(head) - 3 else
                     f'a file starting with the bytes {head[:8]!r}')
        raise ModdedCheckpointError(f'{path} is not a PyTorch checkpoint: {EXPECTED} (a zip archive starting with '
                                    f'PK), found {found}')


def read_state_dict(path):
    check_tensor_file(path)
    checkpoint = load_tensors(path, mmap=True) # the optimizer states are large: mapped, never read
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('model'), dict):
        keys = [str(k) for k in checkpoint][:6] if isinstance(checkpoint, dict) else []
        hint = NANOGPT_HINT if any(k.startswith('transformer.') for k in keys) else ''
        raise ModdedCheckpointError(f'{path} is not a modded-nanogpt checkpoint: expected a dict with a "model" '
                                    f'state dict (and step, optimizers, val_loss), found {type(checkpoint).__name__}'
                                    + (f' with keys {keys}' if isinstance(checkpoint, dict) else '') + hint)
    sd = checkpoint['model']
    odd = next((k for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
    if odd is not None:
        raise ModdedCheckpointError(f'{path} is not a modded-nanogpt checkpoint: its "model" state dict should map '
                                    f'names to tensors, found {odd!r}: {type(sd[odd]).__name__}')
    return checkpoint, strip_wrapper_prefixes(sd)


def inspect_checkpoint(path, num_heads=None, verbose=True):
    """ (info, checkpoint): what the file is, read from its keys and shapes; prints a summary when verbose """
    checkpoint, sd = read_state_dict(path)
    if any(k.endswith('.attn.qkv_w') for k in sd):
        layout, qkv = 'small', 'qkv_w'
    elif any(k.endswith('.attn.qkvo_w') for k in sd):
        layout, qkv = 'medium', 'qkvo_w'
    else:
        hint = NANOGPT_HINT if any(k.startswith('transformer.') for k in sd) else ''
        raise ModdedCheckpointError(f'{path}: neither the small layout (blocks.N.attn.qkv_w) nor the medium layout '
                                    f'(blocks.N.attn.qkvo_w) was found; keys start with {list(sd)[:5]}{hint}')
    if 'embed.weight' not in sd or 'scalars' not in sd:
        raise ModdedCheckpointError(f'{path}: a modded-nanogpt state dict has embed.weight and scalars; '
                                    f'missing {[k for k in ("embed.weight", "scalars") if k not in sd]}')
    vocab_size, model_dim = sd['embed.weight'].shape
    num_layers = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    attn_layers = sorted(int(k.split('.')[1]) for k in sd if k.endswith(f'.attn.{qkv}'))
    hdim = sd[f'blocks.{attn_layers[0]}.attn.{qkv}'].shape[1]
    heads_source = 'given' if num_heads else None
    if num_heads is None and (num_layers, model_dim) in KNOWN_HEADS:
        num_heads, heads_source = KNOWN_HEADS[(num_layers, model_dim)], f'known table for {num_layers} layers x {model_dim}'
    head_dim = hdim // num_heads if num_heads and hdim % num_heads == 0 else None
    fmt = 'large-lite' if layout == 'medium' and head_dim not in (None, 128) else layout
    val_loss = checkpoint.get('val_loss')
    info = dict(format=fmt, layout=layout, vocab_size=vocab_size, model_dim=model_dim, num_layers=num_layers,
                num_heads=num_heads, heads_source=heads_source, head_dim=head_dim, hdim=hdim,
                no_attention_layers=[i for i in range(num_layers) if i not in attn_layers],
                scalars_size=sd['scalars'].numel(), scalars_used=5 * num_layers, step=checkpoint.get('step'),
                val_loss=float(val_loss) if val_loss is not None else None,
                embed_dtype=str(sd['embed.weight'].dtype).replace('torch.', ''),
                block_dtype=str(sd[f'blocks.{attn_layers[0]}.attn.{qkv}'].dtype).replace('torch.', ''))
    if verbose:
        print(describe_modded(path, info))
    return info, checkpoint


def describe_modded(path, info):
    heads = (f"{info['num_heads']} ({info['heads_source']}; head_dim {info['head_dim']})" if info['num_heads']
             else f"unknown: no tensor shape tells it and ({info['num_layers']}, {info['model_dim']}) is not in the "
                  f"known table; pass it (--n_head)")
    padding = info['scalars_size'] - info['scalars_used']
    return '\n'.join([
        f'Checkpoint: {path}',
        f"Format: {FORMATS[info['format']]}",
        f"Step: {info['step']}" + (f", val_loss: {info['val_loss']:.4f}" if info['val_loss'] is not None else ', no val_loss'),
        f"Vocab size: {info['vocab_size']} (rows of embed.weight)",
        f"Model dim: {info['model_dim']}",
        f"Layers: {info['num_layers']} (no attention in layer {', '.join(map(str, info['no_attention_layers'])) or '-'})",
        f'Heads: {heads}',
        f"Scalars: {info['scalars_size']} values ({info['scalars_used']} used, {padding} padding)",
        f"Dtypes: embeddings {info['embed_dtype']}, blocks {info['block_dtype']}",
    ])


def fine_tuning_state_dict(path, info, sd, lm_head=False):
    """ the explicit rules: lm head dropped (kept with lm_head), scalars checked and cut to 5L, small keys moved to
    the medium layout """
    sd = {k: v for k, v in sd.items() if lm_head or k not in LM_HEAD_KEYS}
    scalars, used = sd['scalars'], info['scalars_used']
    if scalars.numel() < used:
        raise ModdedCheckpointError(f'{path}: scalars has {scalars.numel()} values but {info["num_layers"]} layers need '
                                    f'{used} (skip weights, block lambdas, attention lambdas); the file is not from '
                                    'this architecture or was cut short')
    padding = scalars[used:].float()
    if padding.numel() and not torch.all(padding == 1.0):
        raise ModdedCheckpointError(f'{path}: scalars has {padding.numel()} values past the {used} used ones, and they '
                                    f'should be the training script\'s padding (all 1.0), but found {padding[:5].tolist()}')
    sd['scalars'] = scalars[:used]
    if info['layout'] == 'small':
        sd = small_to_medium_state_dict(sd)
    return sd


def load_pretrained_checkpoint(path, device='cpu', num_heads=None, max_seq_len=1024, verbose=True, lm_head=False):
    """ (GPTBatched, info, checkpoint), loaded strictly; the forward follows the rules of the checkpoint's layout.
    lm_head: with the pretraining LM head, for generation (forward gives the pretraining logits) """
    info, checkpoint = inspect_checkpoint(path, num_heads, verbose)
    if info['num_heads'] is None:
        raise ModdedCheckpointError(
            f"{path}: the head count is not stored and cannot be read from tensor shapes ({info['num_layers']} layers "
            f"x {info['model_dim']} is not in the known table {KNOWN_HEADS}); pass num_heads (--n_head). A guess such as "
            f"attention width / 128 gives a wrong forward whenever the head size is not 128.")
    if info['head_dim'] is None or info['head_dim'] * info['num_heads'] != info['model_dim'] or info['head_dim'] % 4:
        raise ModdedCheckpointError(f"{path}: {info['num_heads']} heads do not fit: the attention width is {info['hdim']} "
                                    f"and the model dim {info['model_dim']}; heads x head_dim must equal both")
    sd = fine_tuning_state_dict(path, info, strip_wrapper_prefixes(checkpoint['model']), lm_head) # read once
    arch = 'small' if info['layout'] == 'small' else 'medium'
    head = sd.get('lm_head_w')
    if lm_head and head is None:
        raise ModdedCheckpointError(f'{path} has no LM head ({" or ".join(LM_HEAD_KEYS)}): it cannot generate text')
    with meta_device(): # no memory, no random init of weights about to be replaced
        model = GPTBatched(info['vocab_size'], info['num_layers'], info['num_heads'], info['model_dim'], max_seq_len,
                           info['head_dim'], arch=arch, lm_head_rows=head.size(0) if lm_head else 0)
    check_state_dict_fits(model.state_dict(), sd, path, f"GPTBatched({info['format']}, {info['num_layers']} layers, "
                                                        f"{info['num_heads']} heads, dim {info['model_dim']})")
    # fp32 tensors are the file's mapped pages (private: training writes copy them); bf16 ones become fp32 (exact)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    model.rotary = Rotary(info['head_dim'], max_seq_len) # its tables are not in the file: computed here
    return model.to(device), info, checkpoint


def make_random_checkpoint(path, layout='small', vocab_size=256, num_layers=8, num_heads=2, model_dim=64, head_dim=32,
                           scalars_pad=0, seed=0, step=1000, val_loss=3.28):
    """
    Write a checkpoint file the way the training scripts do (compiled keys, bf16 embeddings, fp32 small blocks or
    bf16 medium blocks, optimizer states, the small scalars padded with ones), with random non-trivial weights:
    for tests and for trying the tools without a real run. val_loss=None leaves it out, like older files.
    """
    generator = torch.Generator().manual_seed(seed)
    if layout == 'small':
        model = GPTFlexAttention(vocab_size, num_layers, num_heads, model_dim, 64, head_dim)
    else:
        model = GPTBatched(vocab_size, num_layers, num_heads, model_dim, 64, head_dim, arch='medium')
    sd = {}
    for k, v in model.state_dict().items():
        if k == 'scalars':
            v = torch.cat([0.5 + torch.rand(v.shape, generator=generator), torch.ones(scalars_pad)])
        else:
            v = torch.randn(v.shape, generator=generator) * (1.0 if 'embed' in k else v.shape[-1] ** -0.5)
        embedding = 'embed' in k
        sd[k] = v.to(torch.bfloat16 if embedding or (layout != 'small' and k != 'scalars') else torch.float32)
    if layout != 'small':
        rows = -(-vocab_size // 128) * 128 # medium pads only the head to a multiple of 128
        sd['lm_head_w'] = torch.randn(rows, model_dim, generator=generator) * model_dim ** -0.5
    params = list(sd.values())
    optimizers = [{'state': {0: {'momentum_buffer': torch.zeros_like(params[1])}},
                   'param_groups': [{'lr': 0.05, 'momentum': 0.95, 'params': [0]}]}]
    checkpoint = dict(step=step, code=f'# train_gpt_{layout}.py', model={'_orig_mod.' + k: v for k, v in sd.items()},
                      optimizers=optimizers)
    if val_loss is not None:
        checkpoint['val_loss'] = val_loss
    torch.save(checkpoint, path)
    return path
