"""
Fine-tune a pretrained modded-nanogpt checkpoint (train_gpt_small.py / train_gpt_medium.py) for 3-way natural
language inference on XNLI Hindi, e.g.
$ python finetune_hindi_xnli.py --dataset hindi_xnli --pretrained_ckpt_path best_state_step010000_val3.2100.pt \
    --tokenizer_name bpe-hin-urd-owt-tokenizer.json --n_layer 12 --n_head 6 --n_embd 768 --batch_size 16 --num_epochs 3

Data comes from local files only: the XNLI 1.0 release (--data_dir holding xnli.dev.tsv and xnli.test.tsv, rows of
--language kept), or JSON lines / CSV files with premise, hypothesis and label columns (--train_file, ...).
XNLI 1.0 ships no Hindi training set, so unless --train_file/--valid_file say otherwise, a seeded 90/10 split of
xnli.dev.tsv trains and validates, and xnli.test.tsv tests. The outputs, in --out_dir:
  best/   the best model by validation accuracy: model.pt, config.json, tokenizer.json, training_state.json
  last/   the same plus optimizer.pt, written at every evaluation, for --resume
  results.json   best/ scored on the test set: accuracy, macro-F1, per-class accuracy, confusion matrix
"""

import csv
import json
import math
import os
import random
import sys
import time
import traceback
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from load_checkpoint_helper import ModdedCheckpointError, load_pretrained_checkpoint
from core.checkpoint import (JSON_FILES, CheckpointError, check_sizes, commit_directory, load_verified, read_json,
                             rng_state, save_tensors, set_rng_state, write_json)
from core.args import Parser
from core.cli import SetupError, check_device, start_wandb
from core.commit import recover
from core.tokenizer import TokenizerError, hf_spec_from_file, load_tokenizer

LABELS = ('entailment', 'neutral', 'contradiction')  # class ids 0, 1, 2, as in XNLI / Hugging Face datasets
FORMAT_VERSION = 1


class DataError(ValueError):
    """ a data file that cannot be used: the message names the file, what was expected and what was found """


def get_args(argv=None):
    p = Parser(description='Fine-tune a modded-nanogpt checkpoint on XNLI (3-way NLI).')
    a = p.add_argument
    a('--dataset', default='hindi_xnli', help='data name; without --data_dir the files are read from data/<dataset>')
    a('--data_dir', help='a folder with the XNLI 1.0 xnli.dev.tsv (train + valid) and xnli.test.tsv')
    a('--train_file'); a('--valid_file'); a('--test_file')
    a('--language', default='hi', help='rows of this language are kept when a file has a language column')
    a('--premise_column', help='default: sentence1 in a .tsv (XNLI release), premise otherwise')
    a('--hypothesis_column', help='default: sentence2 in a .tsv, hypothesis otherwise')
    a('--label_column', help='default: gold_label in a .tsv, label otherwise')
    a('--pretrained_ckpt_path', help='a modded-nanogpt checkpoint (.pt)')
    a('--tokenizer_name', help='the Hugging Face tokenizers JSON file the checkpoint was trained with')
    a('--n_layer', type=int, help='optional: checked against the checkpoint')
    a('--n_head', type=int, help="the head count; needed when the checkpoint's (layers, dim) is not a known size")
    a('--n_embd', type=int, help='optional: checked against the checkpoint')
    a('--block_size', type=int, default=256, help='max tokens per example (premise + separator + hypothesis)')
    a('--batch_size', type=int, default=16)
    a('--num_epochs', type=int, default=3)
    a('--max_steps', type=int, help='stop after this many optimizer steps in all')
    a('--learning_rate', type=float, default=3e-5, help='peak lr of the pretrained weights')
    a('--head_learning_rate', type=float, default=1e-3, help='peak lr of the new classification head')
    a('--weight_decay', type=float, default=0.01)
    a('--warmup_ratio', type=float, default=0.1, help='fraction of the steps with linear warmup; then cosine decay')
    a('--grad_clip', type=float, default=1.0)
    a('--dropout', type=float, default=0.1, help='dropout on the pooled features, before the head')
    a('--class_weights', action='store_true', help='weight the loss by inverse class frequency')
    a('--eval_interval', type=int, help='evaluate (and save) every N steps; default: once per epoch')
    a('--log_interval', type=int, default=10)
    a('--out_dir', default='out-xnli')
    a('--resume', action='store_true', help='continue from <out_dir>/last when it exists')
    a('--seed', type=int, default=1337)
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a('--dtype', choices=['float32', 'bfloat16', 'float16'],
      default='bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float32')
    a('--wandb_log', action='store_true'); a('--wandb_project', default='hindi-xnli'); a('--wandb_run_name')
    a('--debug', action='store_true', help='show the full traceback on errors')
    args = p.parse_args(argv)
    if not args.resume and not (args.pretrained_ckpt_path and args.tokenizer_name):
        p.error('--pretrained_ckpt_path and --tokenizer_name are required (unless --resume finds <out_dir>/last)')
    # each limit is written so that NaN fails it too
    for flag, ok, expected in (
            ('batch_size', args.batch_size >= 1, 'at least 1'), ('num_epochs', args.num_epochs >= 1, 'at least 1'),
            ('max_steps', args.max_steps is None or args.max_steps >= 1, 'at least 1'),
            ('eval_interval', args.eval_interval is None or args.eval_interval >= 1, 'at least 1'),
            ('log_interval', args.log_interval >= 1, 'at least 1'), ('block_size', args.block_size >= 3, 'at least 3'),
            ('n_layer', args.n_layer is None or args.n_layer >= 1, 'at least 1'),
            ('n_head', args.n_head is None or args.n_head >= 1, 'at least 1'),
            ('n_embd', args.n_embd is None or args.n_embd >= 1, 'at least 1'),
            ('learning_rate', 0 <= args.learning_rate < math.inf, 'a finite number >= 0'),
            ('head_learning_rate', 0 <= args.head_learning_rate < math.inf, 'a finite number >= 0'),
            ('weight_decay', 0 <= args.weight_decay < math.inf, 'a finite number >= 0'),
            ('warmup_ratio', 0 <= args.warmup_ratio <= 1, 'between 0 and 1'),
            ('grad_clip', 0 < args.grad_clip <= math.inf, 'a number > 0'),
            ('dropout', 0 <= args.dropout < 1, 'at least 0 and below 1')):
        if not ok:
            p.error(f'--{flag} must be {expected}, found {getattr(args, flag)}')
    try:
        check_device(args.device)
    except SetupError as e:
        p.error(str(e))
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f'--out_dir {args.out_dir} is a file; expected a directory (new or from an earlier run)')
    return args

# -----------------------------------------------------------------------------
# data


def read_table(path):
    """ (column names, [(where, row dict)]) of a .tsv (XNLI release), .csv, .jsonl or .json (JSON lines or a list) """
    ext = os.path.splitext(path)[1].lower()
    if ext not in ('.tsv', '.csv', '.jsonl', '.json'):
        raise DataError(f'{path}: unknown file type {ext or "(none)"!r}; expected .tsv (the XNLI 1.0 release), '
                        '.jsonl/.json (JSON lines) or .csv')
    if not os.path.isfile(path):
        raise DataError(f'{path} does not exist; expected a {ext} file of NLI examples (point --data_dir at the folder '
                        'holding xnli.dev.tsv and xnli.test.tsv, or name files with --train_file, --valid_file, '
                        '--test_file)')
    try:
        with open(path, encoding='utf-8', newline='') as f:
            if ext in ('.tsv', '.csv'):
                # XNLI's TSV has stray quote characters inside sentences: it must be read without quoting
                tsv = dict(delimiter='\t', quoting=csv.QUOTE_NONE) if ext == '.tsv' else {}
                reader = csv.DictReader(f, **tsv)
                rows = [(f'line {reader.line_num}', row) for row in reader]
                return list(reader.fieldnames or []), rows
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f'{path} is not UTF-8 text (byte {e.object[e.start]:#04x}: {e.reason}); expected a '
                        f'UTF-8 {ext} file of NLI examples') from None
    except csv.Error as e:
        raise DataError(f'{path} is not a readable {ext} file ({e}); expected {ext} rows of NLI examples') from None
    try:
        if text.lstrip().startswith('['):
            rows = [(f'item {i}', r) for i, r in enumerate(json.loads(text), 1)]
        else:
            rows = [(f'line {i}', json.loads(line)) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    except ValueError as e:
        raise DataError(f'{path} is not valid JSON lines ({e}); expected one JSON object per line') from None
    if not all(isinstance(r, dict) for _, r in rows):
        raise DataError(f'{path}: expected JSON objects (one example each), found {type(rows[0][1]).__name__}s')
    return list(dict.fromkeys(k for _, r in rows for k in r)), rows


def parse_label(value):
    """ 0/1/2 (numbers or strings) or the label words -> class id; None if it is neither """
    v = str(value).strip().lower()
    return int(v) if v in ('0', '1', '2') else LABELS.index(v) if v in LABELS else None


def read_examples(path, language='hi', premise_column=None, hypothesis_column=None, label_column=None):
    """ [(premise, hypothesis, label id)] of one file; with a language column, only the rows of `language` """
    columns, rows = read_table(path)
    xnli = path.lower().endswith('.tsv')
    want = [premise_column or ('sentence1' if xnli else 'premise'), hypothesis_column or
            ('sentence2' if xnli else 'hypothesis'), label_column or ('gold_label' if xnli else 'label')]
    missing = [c for c in want if c not in columns]
    if missing:
        raise DataError(f'{path} has no column {", ".join(map(repr, missing))}; expected premise, hypothesis and label '
                        f'columns {want} (set --premise_column/--hypothesis_column/--label_column); found columns: '
                        f'{", ".join(map(repr, columns)) or "none (is the file empty?)"}')
    examples, languages = [], set()
    for where, row in rows:
        if row.get('language') is not None:  # the XNLI release holds all 15 languages in one file
            languages.add(row['language'])
            if row['language'] != language:
                continue
        label = parse_label(row.get(want[2]))
        if label is None:
            raise DataError(f'{path} {where}: unknown label {row.get(want[2])!r} in column {want[2]!r}; expected '
                            '0, 1, 2 or entailment, neutral, contradiction')
        examples.append((row.get(want[0]) or '', row.get(want[1]) or '', label))
    if not examples:
        found = f'languages found: {", ".join(sorted(languages))}' if languages else 'it has no data rows'
        raise DataError(f'{path} has no examples for language {language!r} (--language); {found}')
    return examples


def load_splits(args):
    """ train, valid, test (None when there is none) and a description of where each came from """
    data_dir = args.data_dir or os.path.join('data', args.dataset)
    columns = (args.premise_column, args.hypothesis_column, args.label_column)
    read = lambda path: read_examples(path, args.language, *columns)
    train_path = args.train_file or os.path.join(data_dir, 'xnli.dev.tsv')
    train = read(train_path)
    if args.valid_file:
        valid, where = read(args.valid_file), args.valid_file
    else:  # hold out 10% of the training source, shuffled with the seed so the split is the same on every run
        if len(train) < 2:
            raise DataError(f'{train_path} has {len(train)} example for {args.language!r}: too few to hold out '
                            'a validation set')
        order = list(range(len(train)))
        random.Random(args.seed).shuffle(order)
        n_valid = max(1, len(train) // 10)
        valid, train = [train[i] for i in order[:n_valid]], [train[i] for i in order[n_valid:]]
        where = f'10% of {train_path} (seed {args.seed})'
    test_path = args.test_file or os.path.join(data_dir, 'xnli.test.tsv')
    test = read(test_path) if args.test_file or os.path.isfile(test_path) else None
    return train, valid, test, {'train': train_path, 'valid': where, 'test': test_path if test else None}


def separator(tok):
    """ what joins premise and hypothesis: the tokenizer's own end-of-text token (one id), else a newline """
    return [tok.eot_id] if tok.eot_id is not None else tok.encode('\n')


def encode_pair(tok, premise, hypothesis, sep, block_size):
    """ premise + sep + hypothesis in at most block_size ids: the premise is cut first, the hypothesis if need be """
    h = tok.encode(hypothesis)[:block_size - len(sep)]
    p = tok.encode(premise)[:block_size - len(sep) - len(h)]
    return p + sep + h


def encode_dataset(examples, tok, sep, block_size, vocab_size, name):
    data = [(encode_pair(tok, p, h, sep, block_size), y) for p, h, y in examples]
    if any(not ids for ids, _ in data):
        raise DataError(f'{name}: an example encodes to no tokens at all (empty premise and hypothesis?)')
    top = max(max(ids) for ids, _ in data)
    if top >= vocab_size:
        raise TokenizerError(f'the tokenizer produced token id {top} on the {name} data, but the checkpoint has '
                             f'only {vocab_size} embedding rows: this tokenizer ({tok.vocab_size} tokens) does not '
                             'belong to this checkpoint (pass the tokenizer it was pretrained with)')
    return data


def collate(batch, pad_id=0):
    """ right-padded ids [B, T], real lengths [B], labels [B]; the pad id may well be a real token: lengths tell """
    lengths = torch.tensor([len(ids) for ids, _ in batch])
    x = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.long)
    for i, (ids, _) in enumerate(batch):
        x[i, :len(ids)] = torch.tensor(ids)
    return x, lengths, torch.tensor([y for _, y in batch])

# -----------------------------------------------------------------------------
# model, optimizer, schedule, metrics


def pool_last(hidden, lengths):
    """ each sequence's hidden state at its real last token, index length-1 (causal: later padding can't change it) """
    return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths.to(hidden.device) - 1]


class NLIClassifier(nn.Module):
    """ the pretrained GPTBatched backbone + a linear head on the features of each example's last real token """

    def __init__(self, backbone, num_classes=3, dropout=0.0):
        super().__init__()
        self.backbone, self.drop = backbone, nn.Dropout(dropout)
        self.head = nn.Linear(backbone.model_dim, num_classes)

    def forward(self, idx, lengths):
        # the features come RMS-normed, as the LM head saw them in pretraining
        return self.head(self.drop(pool_last(self.backbone.forward_features(idx), lengths)))


def make_optimizer(model, args):
    """ AdamW: the pretrained weights at --learning_rate, the new head at --head_learning_rate; vectors don't decay """
    groups = []
    for name, module, lr in (('pretrained', model.backbone, args.learning_rate),
                             ('head', model.head, args.head_learning_rate)):
        params = [p for p in module.parameters() if p.requires_grad]
        matrices, vectors = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
        groups.append(dict(name=name, params=matrices, weight_decay=args.weight_decay, base_lr=lr, lr=lr))
        # the modded scalars (block / attention lambdas, skip weights) and biases must not be pulled towards 0
        groups.append(dict(name=name, params=vectors, weight_decay=0.0, base_lr=lr, lr=lr))
    return torch.optim.AdamW([g for g in groups if g['params']], betas=(0.9, 0.98), eps=1e-8)


def lr_factor(step, total_steps, warmup_steps):
    """ linear warmup, then cosine decay to 10% of the peak """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, factor):
    # every group scales its OWN base lr by the same factor, so the pretrained : head ratio holds at every step
    for g in optimizer.param_groups:
        g['lr'] = g['base_lr'] * factor


def metrics(gold, pred, num_classes=len(LABELS)):
    """ accuracy, macro-F1, per-class accuracy (recall; None for a class with no examples), confusion [gold][pred] """
    cm = [[0] * num_classes for _ in range(num_classes)]
    for g, p in zip(gold, pred):
        cm[g][p] += 1
    per_class, f1 = {}, []
    for c in range(num_classes):
        support, predicted, hit = sum(cm[c]), sum(row[c] for row in cm), cm[c][c]
        per_class[LABELS[c]] = hit / support if support else None
        f1.append(2 * hit / (support + predicted) if hit else 0.0)  # = 2PR / (P + R)
    return {'accuracy': sum(cm[c][c] for c in range(num_classes)) / max(1, len(gold)),
            'macro_f1': sum(f1) / num_classes, 'per_class': per_class, 'per_class_f1': dict(zip(LABELS, f1)),
            'confusion_matrix': cm, 'num_examples': len(gold)}


@torch.no_grad()
def evaluate(model, data, batch_size, device, ctx):
    """ loss and metrics over the WHOLE set, in order """
    model.eval()
    gold, pred, loss_sum = [], [], 0.0
    for i in range(0, len(data), batch_size):
        x, lengths, y = collate(data[i:i + batch_size])
        with ctx:
            logits = model(x.to(device), lengths).float()
        loss_sum += F.cross_entropy(logits, y.to(device), reduction='sum').item()
        gold += y.tolist()
        pred += logits.argmax(-1).tolist()
    model.train()
    return {'loss': loss_sum / len(data), **metrics(gold, pred)}


def describe(m):
    per_class = ' '.join(f'{k} {"-" if v is None else f"{v:.3f}"}' for k, v in m['per_class'].items())
    return f"loss {m['loss']:.4f}, accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} ({per_class})"

# -----------------------------------------------------------------------------
# bundles: <out_dir>/best and <out_dir>/last


BUNDLE_FILES = ('model.pt', 'config.json', 'tokenizer.json', 'training_state.json', 'optimizer.pt')


def save_bundle(path, model, config, tokenizer_spec, state, optimizer=None):
    """ written whole into a hidden sibling directory, then swapped in: the old bundle stays until the new is whole """
    def write_files(tmp):
        save_tensors(tmp / 'model.pt', {k: v.detach().cpu() for k, v in model.state_dict().items()})
        write_json(tmp / 'config.json', config)
        write_json(tmp / 'tokenizer.json', tokenizer_spec)
        write_json(tmp / 'training_state.json', state)
        if optimizer is not None:
            save_tensors(tmp / 'optimizer.pt', optimizer.state_dict())
    commit_directory(path, write_files, replaces=BUNDLE_FILES)


def read_bundle_tensors(path, name):
    return load_verified(path, name, check_sizes(path, editable=JSON_FILES)) # sizes, then checksum, then load


def load_bundle(path, device='cpu'):
    """ (classifier, config, tokenizer spec) from a bundle written by this script """
    from model import GPTBatched
    config = read_json(os.path.join(path, 'config.json'))
    try:
        backbone = GPTBatched(config['vocab_size'], config['num_layers'], config['num_heads'], config['model_dim'],
                              config['max_seq_len'], head_dim=config['head_dim'], arch=config['arch'])
        model = NLIClassifier(backbone, config['num_classes'], config.get('dropout', 0.0))
    except KeyError as e:
        raise CheckpointError(f'{path}/config.json has no {e} field; expected the config that '
                              'finetune_hindi_xnli.py writes') from None
    try:
        model.load_state_dict(read_bundle_tensors(path, 'model.pt'))
    except RuntimeError as e:
        raise CheckpointError(f'{path}/model.pt does not fit its config.json: {str(e).splitlines()[0]}') from None
    return model.to(device), config, read_json(os.path.join(path, 'tokenizer.json'))


def bundle_config(info, arch, args):
    """ config.json: all it takes to rebuild the classifier (GPTBatched(...) + head) without the pretrained file """
    return {'format_version': FORMAT_VERSION, 'kind': 'nli_classifier', 'vocab_size': info['vocab_size'],
            'num_layers': info['num_layers'], 'num_heads': info['num_heads'], 'model_dim': info['model_dim'],
            'head_dim': info['head_dim'], 'max_seq_len': args.block_size, 'arch': arch, 'num_classes': len(LABELS),
            'labels': list(LABELS), 'dropout': args.dropout,
            'pretrained': {'path': args.pretrained_ckpt_path, 'format': info['format'], 'step': info['step'],
                           'val_loss': info['val_loss']}}


def check_arch(args, arch, source):
    """ the optional architecture flags must agree with the checkpoint: they are checks, never settings """
    for flag, key in (('n_layer', 'num_layers'), ('n_head', 'num_heads'), ('n_embd', 'model_dim')):
        value = getattr(args, flag)
        if value is not None and value != arch[key]:
            raise CheckpointError(f'--{flag} {value} does not match {source}, which has {key} = {arch[key]}; '
                                  f'drop --{flag} (the architecture is read from the checkpoint) or name the right '
                                  'checkpoint')

# -----------------------------------------------------------------------------


def build_model(args, last_dir):
    """ (classifier, config, tokenizer spec, training state): from last/ on --resume, else the pretrained file """
    if args.resume and os.path.isdir(last_dir):
        model, config, spec = load_bundle(last_dir, args.device)
        model.drop.p = config['dropout'] = args.dropout
        check_arch(args, config, last_dir)
        started = (config.get('pretrained') or {}).get('path')
        if args.pretrained_ckpt_path and started and not same_file(args.pretrained_ckpt_path, started):
            raise CheckpointError(f'--resume continues {last_dir}, which was fine-tuned from {started}, but '
                                  f'--pretrained_ckpt_path names {args.pretrained_ckpt_path}: drop '
                                  '--pretrained_ckpt_path to continue that run, or start the new one in another '
                                  '--out_dir (or without --resume)')
        if args.tokenizer_name and hf_spec_from_file(args.tokenizer_name) != spec:
            raise TokenizerError(f'--tokenizer_name {args.tokenizer_name} is not the tokenizer {last_dir} was '
                                 'trained with')
        if args.block_size > config['max_seq_len']:
            raise CheckpointError(f"--block_size {args.block_size} exceeds the {config['max_seq_len']} tokens "
                                  f'{last_dir} was built for')
        return model, config, spec, read_json(os.path.join(last_dir, 'training_state.json'))
    if args.resume:
        print(f'--resume: nothing in {last_dir} yet, starting from the pretrained checkpoint')
    if not (args.pretrained_ckpt_path and args.tokenizer_name):
        raise CheckpointError(f'nothing to resume in {last_dir}; name --pretrained_ckpt_path and --tokenizer_name')
    backbone, info, _ = load_pretrained_checkpoint(args.pretrained_ckpt_path, device=args.device,
                                                   num_heads=args.n_head, max_seq_len=args.block_size)
    check_arch(args, info, args.pretrained_ckpt_path)
    model = NLIClassifier(backbone, len(LABELS), args.dropout).to(args.device)
    return model, bundle_config(info, backbone.arch, args), hf_spec_from_file(args.tokenizer_name), None


def same_file(a, b):
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def refuse_distributed_launch():
    """ no DDP here: under torchrun every process would train its own copy and all would write the same out_dir """
    world_size = os.environ.get('WORLD_SIZE', '1')
    if world_size != '1':
        sys.exit(f"error: finetune_hindi_xnli.py was started as one of several processes (WORLD_SIZE={world_size}, "
                 f"RANK={os.environ.get('RANK')}, e.g. by torchrun), but it has no distributed (DDP) support: each "
                 'process would train its own copy of the model and all would write the same --out_dir. Run it as a '
                 'single process, with plain `python finetune_hindi_xnli.py ...`.')


def main(args):
    refuse_distributed_launch()  # before any work
    torch.manual_seed(args.seed)
    device, last_dir, best_dir = args.device, os.path.join(args.out_dir, 'last'), os.path.join(args.out_dir, 'best')
    cuda = torch.device(device).type == 'cuda'
    if args.dtype != 'float32' and not cuda:
        print(f'note: --dtype {args.dtype} autocasts on cuda only; computing in float32 on {device}')
    ptdtype = getattr(torch, args.dtype)
    ctx = torch.autocast('cuda', dtype=ptdtype) if cuda and args.dtype != 'float32' else nullcontext()
    scaler = torch.amp.GradScaler('cuda', enabled=cuda and args.dtype == 'float16')
    for d in (last_dir, best_dir):
        recover(d)  # finish a save that a crash interrupted

    model, config, spec, state = build_model(args, last_dir)
    tok = load_tokenizer(spec)
    sep = separator(tok)
    train, valid, test, sources = load_splits(args)
    encode = lambda data, name: encode_dataset(data, tok, sep, args.block_size, config['vocab_size'], name)
    train, valid, test = encode(train, 'train'), encode(valid, 'valid'), test and encode(test, 'test')
    print(f"data ({args.language}): train {len(train)} from {sources['train']}, valid {len(valid)} from "
          f"{sources['valid']}, test {len(test) if test else 0} from {sources['test'] or '(no test set)'}; "
          f'separator ids {sep}')

    counts = torch.bincount(torch.tensor([y for _, y in train]), minlength=len(LABELS)).float()
    weight = (counts.sum() / (len(LABELS) * counts.clamp(min=1))).to(device) if args.class_weights else None
    optimizer = make_optimizer(model, args)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total_steps = min(args.num_epochs * steps_per_epoch, args.max_steps or math.inf)
    warmup_steps = int(args.warmup_ratio * total_steps)
    eval_interval = args.eval_interval or steps_per_epoch
    step, best, history = 0, None, []
    if state is not None:
        fresh = [dict(g) for g in optimizer.param_groups]
        optimizer.load_state_dict(read_bundle_tensors(last_dir, 'optimizer.pt'))
        for g, f in zip(optimizer.param_groups, fresh):  # this run's lrs and decay, the checkpoint's moments
            g.update(base_lr=f['base_lr'], weight_decay=f['weight_decay'])
        step, history = state['step'], state.get('history', [])
        # best/ on disk is the truth about the best model; last/ records it too, in case best/ was removed
        best_state = os.path.join(best_dir, 'training_state.json')
        best = read_json(best_state)['best'] if os.path.isfile(best_state) else state.get('best')
        if (state.get('data'), state.get('steps_per_epoch')) != (sources, steps_per_epoch):
            print(f'warning: the data, its split (--seed) or --batch_size differ from the run saved in {last_dir}: '
                  f'from step {step} on, the batches are not the ones that run would have seen')
        set_rng_state(state['rng'])
        so_far = 'none' if best is None else f"accuracy {best['accuracy']:.4f} at step {best['step']}"
        print(f'resuming from {last_dir} at step {step} (epoch {step / steps_per_epoch:.2f}) of {total_steps}; '
              f'best so far: {so_far}')

    run = None
    if args.wandb_log:
        run = start_wandb(args.wandb_project, args.wandb_run_name, vars(args))

    def training_state(kind, val):
        return {'step': step, 'epoch': step / steps_per_epoch, 'steps_per_epoch': steps_per_epoch,
                'total_steps': total_steps, 'kind': kind, 'metrics': val, 'best': best, 'history': history,
                'data': sources, 'args': vars(args)}

    model.train()
    order_epoch, window, since_eval, t0 = None, [], [], time.time()
    while step < total_steps:
        epoch, b = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # the order depends on (seed, epoch) only: a resumed run sees the same batches
            generator = torch.Generator().manual_seed(args.seed + epoch)
            order = torch.randperm(len(train), generator=generator).tolist()
            order_epoch = epoch
        x, lengths, y = collate([train[i] for i in order[b * args.batch_size:(b + 1) * args.batch_size]])
        set_lr(optimizer, lr_factor(step, total_steps, warmup_steps))
        with ctx:
            logits = model(x.to(device), lengths)
        loss = F.cross_entropy(logits.float(), y.to(device), weight=weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        window.append(loss.item())
        since_eval.append(window[-1])
        if step % args.log_interval == 0 or step == total_steps:
            lrs, mean = {g['name']: g['lr'] for g in optimizer.param_groups}, sum(window) / len(window)
            print(f"step {step}/{total_steps} (epoch {epoch + 1}): train loss {mean:.4f}, lr {lrs['pretrained']:.2e} "
                  f"/ head {lrs['head']:.2e}, {(time.time() - t0) * 1000 / len(window):.0f} ms/step")
            if run:
                run.log({'train/loss': mean, 'lr/pretrained': lrs['pretrained'], 'lr/head': lrs['head']}, step=step)
            window, t0 = [], time.time()
        if step % eval_interval == 0 or step == total_steps:
            val = evaluate(model, valid, args.batch_size * 2, device, ctx)
            history.append({'step': step, 'train_loss': sum(since_eval) / len(since_eval),
                            **{k: val[k] for k in ('loss', 'accuracy', 'macro_f1')}})
            since_eval = []
            is_best = best is None or (val['accuracy'], -val['loss']) > (best['accuracy'], -best['loss'])
            print(f'eval step {step} (epoch {step / steps_per_epoch:.2f}): val {describe(val)}'
                  + ('  [best]' if is_best else ''))
            if is_best:
                best = {**val, 'step': step}
                save_bundle(best_dir, model, config, spec, training_state('best', val))
            save_bundle(last_dir, model, config, spec, {**training_state('last', val), 'rng': rng_state()}, optimizer)
            if run:
                run.log({**{f'val/{k}': val[k] for k in ('loss', 'accuracy', 'macro_f1')},
                         **{f'val/acc_{k}': v for k, v in val['per_class'].items() if v is not None},
                         'checkpoint/saved_last': step, **({'checkpoint/saved_best': step} if is_best else {})},
                        step=step)
            t0 = time.time()

    # the test set is scored by best/ as reloaded from disk: exactly what a user would deploy
    if not os.path.isdir(best_dir):
        raise CheckpointError(f'{best_dir} does not exist: no evaluation has run (nothing was trained)')
    model = load_bundle(best_dir, device)[0]
    print(f"best: step {best['step']}, val {describe(best)}")
    if test:
        res = {'split': 'test', 'test_file': sources['test'], **evaluate(model, test, args.batch_size * 2, device, ctx)}
    else:
        res = {'split': 'validation', 'note': 'no test set was given, so these are the best validation metrics',
               **{k: v for k, v in best.items() if k != 'step'}}
    res.update(labels=list(LABELS), language=args.language, best_step=best['step'], checkpoint=best_dir,
               best_validation=best)
    write_json(os.path.join(args.out_dir, 'results.json'), res)
    print(f"{res['split']} ({res['num_examples']} examples): {describe(res)}")
    print('confusion matrix (rows gold, columns predicted):')
    print(f"{'':>14}" + ''.join(f'{l:>14}' for l in LABELS))
    for label, row in zip(LABELS, res['confusion_matrix']):
        print(f'{label:>14}' + ''.join(f'{n:>14}' for n in row))
    print(f"results written to {os.path.join(args.out_dir, 'results.json')}")
    if run:
        run.summary.update({f"{res['split']}/{k}": res[k] for k in ('accuracy', 'macro_f1', 'loss')})
        run.finish()


if __name__ == '__main__':
    args = get_args()
    try:
        main(args)
    except (ModdedCheckpointError, CheckpointError, TokenizerError, DataError, SetupError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        sys.exit(f'error: {e}')
