"""
Single-file checkpoints: the public nanoGPT's ckpt.pt both ways (its seven model_args, weights, a positional AdamW
state, and the meta.pkl vocabulary beside its dataset), and our older latest.pt / final.pt or a bare state dict,
which are read only. Recognised by content, not by name.

Nothing here unpickles objects: every torch.load passes weights_only=True, and nanoGPT's meta.pkl is read by an
unpickler that refuses all classes.
"""

import dataclasses
import os
import pickle
from pathlib import Path

import torch

from model import ADAPTER_FIELDS, GPT, GPTConfig
from core.bundle import name_optimizer_state, positional_names
from core.commit import CheckpointError, atomic_write, is_plain_name, load_tensors, read_json
from core.kind import STANDARD, Checkpoint, Kind, config_from_dict, infer_base_config
from core.probe import make_probe
from core.tokenizer import spec_vocab_size

LEGACY_NAMES = ('latest.pt', 'final.pt', 'ckpt.pt')  # looked for, in this order, in a directory with no bundle
NANOGPT_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')


# -----------------------------------------------------------------------------
# reading

def legacy_file(path):
    if path.is_file():
        return path
    return next((path / name for name in LEGACY_NAMES if (path / name).is_file()), None) if path.is_dir() else None


def read_legacy(path, meta_path=None):
    """ a single-file checkpoint: nanoGPT's ckpt.pt, an older latest.pt / final.pt, or a bare state dict """
    ck = load_tensors(path, mmap=True) # its optimizer state is only read if a resume asks for it
    if not isinstance(ck, dict):
        raise CheckpointError(f'{path} holds a {type(ck).__name__}, expected a checkpoint dict or a state dict')
    if ck and all(torch.is_tensor(v) for v in ck.values()):
        ck = {'model': ck}  # a bare state dict
    weights = next((ck[k] for k in ('model', 'model_state_dict', 'state_dict') if isinstance(ck.get(k), dict)), None)
    if weights is None:
        raise CheckpointError(f'{path} has no weights: expected a "model" state dict (nanoGPT) among {sorted(ck)[:8]}')
    notes = []
    args = ck.get('model_args') or (ck['config'] if isinstance(ck.get('config'), dict) and 'n_layer' in ck['config'] else {})
    inferred = infer_base_config(weights, path)
    for k, v in inferred.items():
        if k in args and args[k] != v:
            notes.append(f'{k}: the file says {args[k]} but the weights have {v}; using {v}')
    if 'n_head' not in args:
        raise CheckpointError(f'{path} does not record n_head (no model_args), and no tensor shape tells it; '
                              'save it with its model_args, or convert it with an explicit config')
    known = {f.name for f in dataclasses.fields(GPTConfig)} # an older file's config also holds run settings
    config = config_from_dict({**{k: v for k, v in args.items() if k in known}, **inferred, **STANDARD}, path)
    lora_alpha = args.get('lora_alpha')
    run_config = ck.get('config') if isinstance(ck.get('config'), dict) else {}

    tokenizer = legacy_tokenizer(path, ck, run_config, config.vocab_size, meta_path, notes)
    optimizer = None
    if isinstance(ck.get('optimizer'), dict) and ck['optimizer'].get('param_groups'):
        names = positional_names(GPT.on_meta(config), ck['optimizer'])
        if not ck['optimizer'].get('state'): # param groups with no moments: an export of a deploy-only save
            notes.append('the optimizer state is empty (no moments were saved); a resume starts it fresh')
        elif names is None:
            notes.append("the optimizer state does not follow nanoGPT's parameter order; it will start fresh")
        else:
            optimizer = name_optimizer_state(ck['optimizer'], names)
    step = int(ck.get('iter_num', ck.get('step', 0)))
    best = ck.get('best_val_loss')
    best = float(best) if best is not None else None  # nanoGPT stores a 0-d tensor here
    state = {'step': step, 'best_val_loss': best, 'config': run_config,
             'adapter': {f: args[f] for f in ADAPTER_FIELDS if f in args},
             **({'probe': ck['probe']} if isinstance(ck.get('probe'), dict) else {})}
    return Checkpoint(path, NANOGPT if 'model_args' in ck else LEGACY, config, tokenizer, step, best, state,
                      notes, weights=weights, optimizer=optimizer, lora_alpha=lora_alpha)


def legacy_tokenizer(path, ck, run_config, vocab_size, meta_path, notes):
    """ the vocabulary of a legacy checkpoint: stored in it, or next to its dataset, like nanoGPT's sample.py """
    if isinstance(ck.get('tokenizer'), dict) and 'token_kind' in ck['tokenizer']:
        return ck['tokenizer']
    if isinstance(ck.get('chars'), list):
        return {'token_kind': 'char', 'chars': ck['chars']}
    if isinstance(ck.get('itos'), dict):
        return {'token_kind': 'char', 'chars': [ck['itos'][i] for i in range(len(ck['itos']))]}
    dataset = run_config.get('dataset')
    dataset = dataset if is_plain_name(dataset) else None # a name from the file: never a path outside data/
    # nanoGPT's sample.py looks in data/<dataset>/ where it runs; also look beside the run (<root>/out/ckpt.pt)
    roots = (Path('data'), Path(path).resolve().parent.parent / 'data', Path(__file__).resolve().parents[1] / 'data')
    if meta_path:
        return None # read_checkpoint reads --meta, for every kind
    candidates = [Path(path).parent / 'meta.pkl'] + [ # beside: our export's
        d / dataset / name for d in roots if dataset for name in ('meta.json', 'meta.pkl')]
    for p in candidates:
        if p.is_file():
            notes.append(f'tokenizer: read from {p}')
            return read_meta_file(p)
    if vocab_size >= 50257:
        notes.append('tokenizer: gpt2 assumed (no vocabulary stored; nanoGPT\'s sample.py assumes the same)')
        return {'token_kind': 'gpt2'}
    where = f'no meta file for its dataset {dataset!r}' if dataset else 'no dataset named in it'
    notes.append(f'tokenizer: unknown (no vocabulary stored, and {where}); the tools take '
                 '--meta PATH, train.py the vocabulary of its --dataset')
    return None


def read_meta_file(path):
    """ the tokenizer spec of a data/<dataset>/meta.json (ours) or meta.pkl (nanoGPT's) """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f'{path} is a directory; expected a meta.json or nanoGPT meta.pkl vocabulary file '
                              f'(e.g. {path / "meta.json"})')
    if not path.is_file():
        raise CheckpointError(f'{path} does not exist; expected a meta.json or nanoGPT meta.pkl vocabulary')
    if path.suffix != '.json':
        return read_meta_pkl(path)
    meta = read_json(path)
    if not (isinstance(meta, dict) and isinstance(meta.get('tokenizer'), dict)):
        raise CheckpointError(f'{path} has no "tokenizer" entry: expected the meta.json that data/prepare.py writes')
    return meta['tokenizer']


def read_meta_pkl(path):
    """ nanoGPT's data/<dataset>/meta.pkl ({'vocab_size', 'itos', 'stoi'}) as a char tokenizer spec """
    try:
        with open(path, 'rb') as f:
            meta = NoClassesUnpickler(f).load()
        return {'token_kind': 'char', 'chars': [meta['itos'][i] for i in range(len(meta['itos']))]}
    except Exception as e:
        raise CheckpointError(f'{path} is not a nanoGPT meta.pkl with an itos vocabulary: {e}') from None


class NoClassesUnpickler(pickle.Unpickler):
    """ reads plain dicts, lists, strings and numbers; any class or function reference is refused """

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f'refusing to load {module}.{name}: meta.pkl should hold only plain values')


# -----------------------------------------------------------------------------
# writing nanoGPT's ckpt.pt

def export_nanogpt(model, path, step=0, best_val_loss=None, named_optimizer=None, tokenizer=None, weight_decay=0.1,
                   learning_rate=6e-4, betas=(0.9, 0.95), run_config=None, replace_vocabulary=False):
    """
    A ckpt.pt that nanoGPT's sample.py and train.py --init_from=resume read unchanged: its seven model_args,
    the merged weights, and an AdamW state positioned the way its configure_optimizers orders parameters
    (empty moments when the checkpoint had none). Plain tensors, numbers, strings only. A char vocabulary also
    goes beside it as nanoGPT's meta.pkl, which its sample.py reads from data/<dataset>/. Returns the files written.
    """
    if Path(path).is_dir() or str(path).endswith(('/', os.sep)):
        raise CheckpointError(f'{path} names a directory: a nanoGPT checkpoint is one file; name it, e.g. {Path(path) / "ckpt.pt"}')
    config = model.config
    extra = [f for f in ('n_hidden', 'activation') if getattr(config, f) != {'n_hidden': 4 * config.n_embd,
                                                                              'activation': 'gelu'}[f]]
    if extra:
        raise CheckpointError(f'cannot export to nanoGPT: its GPT has no {", ".join(extra)} setting (this model has '
                              + ', '.join(f'{f}={getattr(config, f)}' for f in extra) + ')')
    standard = type(model).on_meta(type(config)(**{f: getattr(config, f) for f in NANOGPT_ARGS}))
    groups, state, position = [], {}, 0
    for params, decay in zip(standard.optimizer_groups(), (weight_decay, 0.0)):
        names = [n for n, _ in params]
        for i, name in enumerate(names):
            moments = (named_optimizer or {}).get('state', {}).get(name)
            if moments is not None:
                state[position + i] = moments
        groups.append({'lr': learning_rate, 'betas': betas, 'eps': 1e-8, 'weight_decay': decay, 'amsgrad': False,
                       'foreach': None, 'maximize': False, 'capturable': False, 'differentiable': False,
                       'fused': None, 'params': list(range(position, position + len(names)))})
        position += len(names)
    checkpoint = {'model': model.get_merged_state_dict(), 'optimizer': {'state': state, 'param_groups': groups},
                  'model_args': {f: getattr(config, f) for f in NANOGPT_ARGS}, 'iter_num': int(step),
                  'best_val_loss': float(best_val_loss) if best_val_loss is not None else 1e9,
                  'config': {k: v for k, v in (run_config or {}).items() if isinstance(v, (int, float, str, bool))},
                  # one key more than nanoGPT's (its scripts ignore it): checked when the file is read back
                  'probe': make_probe(model, spec_vocab_size(tokenizer) if tokenizer else None)}
    meta = None
    if tokenizer and tokenizer.get('token_kind') == 'char':
        meta = {'vocab_size': len(tokenizer['chars']), 'itos': dict(enumerate(tokenizer['chars'])),
                'stoi': {ch: i for i, ch in enumerate(tokenizer['chars'])}}
        meta_path = Path(path).parent / 'meta.pkl'
        if meta_path.is_file() and not replace_vocabulary and meta_path.read_bytes() != pickle.dumps(meta):
            # another export's vocabulary: replacing it would make that export decode with ours
            raise CheckpointError(f'{meta_path} holds another vocabulary (an earlier export beside it reads it); '
                                  'export into a folder of its own, or pass --force to replace it')
    Path(path).parent.mkdir(parents=True, exist_ok=True) # nanoGPT's layout is out_dir/ckpt.pt: make out_dir
    # torch's zip CRC stays on here (unlike our bundles): the readers may run an older torch that checks it
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    written = [str(path)]
    if meta is not None:
        # the one pickle we write, because it is the target's format: builtin types only, as nanoGPT's prepare.py
        atomic_write(meta_path, lambda f: pickle.dump(meta, f))
        written.append(str(meta_path))
    return written


def write_nanogpt(ck, model, out, force=False):
    export_nanogpt(model, out, ck.step, ck.best_val_loss, ck.optimizer_state(), ck.tokenizer,
                   run_config=ck.training_state.get('config'), replace_vocabulary=force)


LEGACY = Kind('legacy', 'Legacy single file', legacy_file, read_legacy, None,
              looks=f'a directory holding one of {", ".join(LEGACY_NAMES)}, or a checkpoint file')
NANOGPT = Kind('nanogpt', 'Legacy single file (nanoGPT ckpt.pt)', None, None, write_nanogpt)
