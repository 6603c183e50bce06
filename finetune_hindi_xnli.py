"""
Fine-tune a pretrained modded-nanogpt checkpoint (train_gpt_small.py / train_gpt_medium.py) for sequence
classification: 3-way natural language inference on XNLI Hindi by default, e.g.
$ python finetune_hindi_xnli.py --dataset hindi_xnli --pretrained_ckpt_path best_state_step010000_val3.2100.pt \
    --tokenizer_name bpe-hin-urd-owt-tokenizer.json --n_layer 12 --n_head 6 --n_embd 768 --batch_size 16 --num_epochs 3
and any task the modded-nanogpt fork's finetune.py runs, with its command line (core/finetune_data.py reads the data):
$ python finetune_hindi_xnli.py --no_subset --dataset xnli-en-es-normal --parent_dataset mugezhang/xnli-en-es-ipa \
    --text_column premise hypothesis --label_column label --num_classes 3 --batch_size 16 --num_epochs 3 ...

Local XNLI 1.0 files: --data_dir holding xnli.dev.tsv and xnli.test.tsv (rows of --language, default hi). XNLI 1.0
ships no Hindi training set, so unless --train_file/--valid_file say otherwise, a seeded 90/10 split of xnli.dev.tsv
trains and validates, and xnli.test.tsv tests. --lora_rank R trains LoRA adapters instead of every weight. The
outputs, in --out_dir:
  best/   the best model by validation accuracy: model.pt (merged weights), config.json, tokenizer.json,
          training_state.json
  last/   the same plus optimizer.pt (and adapter.pt with LoRA), written at every evaluation, for --resume
  results.json   best/ scored on the test set: accuracy, macro-F1, the fork's F1/F2/recall, confusion matrix
--eval_only scores best/ on other data, as the fork's evaluate.py: results_<label>.json.
"""

import argparse
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from load_checkpoint_helper import load_pretrained_checkpoint
from model import add_modded_lora, set_modded_lora_factors
from core.args import Parser
from core.bundle import rng_state, set_rng_state
from core.classifier import CLASSIFIER_KIND, load_bundle_weights, lora_config, read_bundle_tensors, save_classifier
from core.cli import DEFAULT_DTYPE, DTYPES, SetupError, check_device, run, start_wandb
from core.commit import CheckpointError, is_plain_name, read_json, recover, write_json
from core.finetune_data import (LABELS, DataError, dataset_splits, find_tokenizer, load_splits,
                                 read_examples)
from core.tokenizer import TokenizerError, load_tokenizer

FORMAT_VERSION = 1


def get_args(argv=None):
    p = Parser(description='Fine-tune a modded-nanogpt checkpoint for sequence classification (XNLI Hindi by default).')
    a = p.add_argument
    a('--dataset', default='hindi_xnli', help='data name: data/<dataset> for local files, the subset of --parent_dataset')
    a('--data_dir', help='a folder with the XNLI 1.0 xnli.dev.tsv (train + valid) and xnli.test.tsv')
    a('--train_file'); a('--valid_file'); a('--test_file')
    a('--parent_dataset', help='Hugging Face datasets: a hub name (load_dataset(PARENT, DATASET)) or a local dataset folder')
    a('--no_subset', action='store_true', help='load_dataset(PARENT) without --dataset as its subset')
    a('--from_disk', action='store_true', help='load_from_disk(--parent_dataset, else --data_dir/--dataset)')
    a('--hf_cache', help="the datasets cache folder (default: datasets' own)")
    a('--force_tokenization', action='store_true', help='accepted for the fork; examples are tokenized on every run')
    a('--language', help='keep the rows of this language (of a language column); default: hi in an XNLI release '
      '.tsv, all rows otherwise')
    a('--text_column', nargs='+', help='one column (a single text) or several (joined by the separator token); '
      'default: premise hypothesis (sentence1 sentence2 in a .tsv), or sentence')
    a('--premise_column', help='the first of two text columns (same as --text_column PREMISE HYPOTHESIS)')
    a('--hypothesis_column', help='the second of two text columns')
    a('--label_column', help='default: gold_label in a .tsv, label otherwise')
    a('--num_classes', type=int, help="default: the ClassLabel's count, else 3 (XNLI); checked against the labels found")
    a('--pretrained_ckpt_path', help='a modded-nanogpt checkpoint (.pt)')
    a('--tokenizer_name', help='a tokenizer.json path, a name looked up in --tokenizer_dir, or gpt2 (the default)')
    a('--tokenizer_dir', default='tokenizers', help='where --tokenizer_name is looked up: NAME, NAME.json, '
      'NAME-tokenizer.json, NAME-vocab.json')
    a('--n_layer', type=int, help='optional: checked against the checkpoint')
    a('--n_head', type=int, help="the head count; needed when the checkpoint's (layers, dim) is not a known size")
    a('--n_embd', type=int, help='optional: checked against the checkpoint')
    a('--vocab_size', type=int, help='optional: checked against the checkpoint')
    a('--block_size', type=int, default=256, help='max tokens per example (all texts and separators)')
    a('--batch_size', type=int, default=16)
    a('--gradient_accumulation_steps', type=int, default=1, help='micro-batches of --batch_size per optimizer step')
    a('--num_epochs', type=int, default=3)
    a('--max_steps', type=int, help='stop after this many optimizer steps in all')
    a('--learning_rate', type=float, default=3e-5, help='peak lr of the pretrained weights')
    a('--head_learning_rate', type=float, default=1e-3, help='peak lr of the new classification head')
    a('--weight_decay', type=float, default=0.01)
    a('--warmup_ratio', type=float, default=0.1, help='fraction of the steps with linear warmup; then cosine decay')
    a('--no_decay_lr', action='store_true', help='a constant learning rate: no warmup, no decay')
    a('--grad_clip', type=float, default=1.0)
    a('--dropout', type=float, default=0.1, help='dropout on the pooled features, before the head')
    a('--class_weights', action='store_true', help='weight the loss by inverse class frequency')
    a('--lora_rank', type=int, default=0, help='LoRA of this rank on every attention and MLP weight, the rest frozen '
      '(0: full fine-tuning)')
    a('--lora_alpha', type=float, help='LoRA scale alpha / rank (default: alpha = rank, a scale of 1)')
    a('--eval_interval', type=int, help='evaluate (and save) every N steps; default: once per epoch')
    a('--eval_iters', type=int, help='accepted for the fork; every evaluation covers the whole validation split')
    a('--log_interval', type=int, default=10)
    a('--out_dir', default='out-xnli')
    a('--resume', action='store_true', help='continue from <out_dir>/last when it exists')
    a('--eval_only', action='store_true', help='no training: evaluate --checkpoint_path (default <out_dir>/best)')
    a('--checkpoint_path', help='--eval_only: the fine-tuned bundle to evaluate (default <out_dir>/best)')
    a('--datasets', nargs='+', help='--eval_only: datasets to evaluate (hub names or local folders; default: the data flags)')
    a('--dataset_labels', nargs='+', help='--eval_only: a name per --datasets entry, for results_<label>.json')
    a('--dataset_config', help='--eval_only: the subset of each --datasets entry')
    a('--split', default='test', help='--eval_only: the split to evaluate (test, validation, train)')
    a('--output_dir', help='--eval_only: where results_<label>.json go (default: the folder holding the checkpoint)')
    a('--seed', type=int, default=1337)
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a('--no_cuda', action='store_true', help='same as --device cpu')
    a('--dtype', choices=DTYPES, default=DEFAULT_DTYPE)
    a('--wandb_log', action='store_true'); a('--wandb_project', default='hindi-xnli'); a('--wandb_run_name')
    a('--debug', action='store_true', help='show the full traceback on errors')
    args = p.parse_args(argv)
    if args.no_cuda:
        args.device = 'cpu'
    if args.lora_alpha is not None and not args.lora_rank:
        p.error(f'--lora_alpha {args.lora_alpha} needs --lora_rank R (above 0): without it there are no adapters')
    if args.text_column and (args.premise_column or args.hypothesis_column):
        p.error('--text_column and --premise_column/--hypothesis_column both name the text columns: pass one of them')
    if not args.text_column and (args.premise_column or args.hypothesis_column):
        args.text_column = [args.premise_column, args.hypothesis_column]
    if not (args.resume or args.eval_only or args.pretrained_ckpt_path):
        p.error('--pretrained_ckpt_path is required (unless --resume finds <out_dir>/last, or --eval_only)')
    if args.dataset_labels and len(args.dataset_labels) != len(args.datasets or []):
        p.error(f'--dataset_labels names {len(args.dataset_labels)} labels for {len(args.datasets or [])} --datasets')
    # each limit is written so that NaN fails it too
    for flag, ok, expected in (
            ('batch_size', args.batch_size >= 1, 'at least 1'), ('num_epochs', args.num_epochs >= 1, 'at least 1'),
            ('gradient_accumulation_steps', args.gradient_accumulation_steps >= 1, 'at least 1'),
            ('num_classes', args.num_classes is None or args.num_classes >= 2, 'at least 2'),
            ('lora_rank', args.lora_rank >= 0, 'at least 0'),
            ('lora_alpha', args.lora_alpha is None or 0 < args.lora_alpha < math.inf, 'a number > 0'),
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


def separator(tok):
    """ what joins the texts of an example: the tokenizer's own end-of-text token (one id), else a newline """
    return [tok.eot_id] if tok.eot_id is not None else tok.encode('\n')


def encode_texts(tok, texts, sep, block_size, cut=None):
    """ the texts joined by sep in at most block_size ids: the first text is cut first, then the next, the last last
    (a premise goes before its hypothesis, which decides the label); a cut example is counted in cut['examples'] """
    ids = [tok.encode(t) for t in texts]
    room = block_size - len(sep) * (len(texts) - 1)
    if cut is not None and sum(map(len, ids)) > room:
        cut['examples'] += 1
    kept = []
    for piece in reversed(ids):
        kept.insert(0, piece[:max(0, room)])
        room -= len(kept[0])
    out = kept[0]
    for piece in kept[1:]:
        out = out + sep + piece
    return out


def encode_dataset(examples, tok, sep, block_size, vocab_size, name):
    """ [(ids, label)] of examples (text, ..., label) """
    cut = {'examples': 0}
    data = [(encode_texts(tok, ex[:-1], sep, block_size, cut), ex[-1]) for ex in examples]
    if cut['examples']:
        print(f"note: {name}: {cut['examples']} of {len(data)} examples are longer than --block_size {block_size} "
              'tokens and were cut (the first text first)')
    if any(len(ids) == len(sep) * (len(ex) - 2) for (ids, _), ex in zip(data, examples)):
        raise DataError(f'{name}: an example encodes to no tokens at all (all of its texts are empty)')
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


def step_counts(args, num_train):
    """ (optimizer steps per epoch, total steps): an epoch is every example once, batch_size x accumulation a step """
    steps_per_epoch = math.ceil(num_train / (args.batch_size * args.gradient_accumulation_steps))
    return steps_per_epoch, min(args.num_epochs * steps_per_epoch, args.max_steps or math.inf)


def lr_schedule(args, total_steps):
    """ step -> the factor of every group's base lr: --warmup_ratio of the steps warm up, then cosine decay """
    if args.no_decay_lr:
        return lambda step: 1.0
    warmup_steps = int(args.warmup_ratio * total_steps)
    return lambda step: lr_factor(step, total_steps, warmup_steps)


def scale_lrs(optimizer, factor):
    # every group scales its OWN base lr by the same factor, so the pretrained : head ratio holds at every step
    for g in optimizer.param_groups:
        g['lr'] = g['base_lr'] * factor


def class_weights(labels, num_classes):
    """ --class_weights: inverse class frequency, n / (classes x count), scikit-learn's 'balanced' (an absent class
    counts 1) """
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))


def is_better(val, best):
    """ the best model: the highest validation accuracy, and at equal accuracy the lower validation loss """
    return best is None or (val['accuracy'], -val['loss']) > (best['accuracy'], -best['loss'])


def metrics(gold, pred, names=LABELS):
    """
    scikit-learn's metrics. accuracy; macro_f1 over every class (a class absent from gold and predictions counts 0);
    f1_score, f2_score and recall as the fork's evaluate.py reports them (macro over the classes that occur);
    per-class accuracy (recall; None for a class with no examples) and F1; the confusion matrix [gold][pred].
    """
    # imported here: scikit-learn takes as long to import as torch, and a run refused at its start never needs it
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, fbeta_score, recall_score
    labels = list(range(len(names)))
    cm = confusion_matrix(gold, pred, labels=labels).tolist()
    f1 = f1_score(gold, pred, labels=labels, average=None, zero_division=0).tolist()
    return {'accuracy': accuracy_score(gold, pred), 'macro_f1': sum(f1) / len(f1),
            'f1_score': f1_score(gold, pred, average='macro', zero_division=0),
            'f2_score': fbeta_score(gold, pred, beta=2, average='macro', zero_division=0),
            'recall': recall_score(gold, pred, average='macro', zero_division=0),
            'per_class': {n: cm[c][c] / sum(cm[c]) if sum(cm[c]) else None for c, n in enumerate(names)},
            'per_class_f1': dict(zip(names, f1)), 'confusion_matrix': cm, 'num_examples': len(gold)}


@torch.no_grad()
def evaluate(model, data, batch_size, device, ctx, names=LABELS, keep_outputs=False):
    """ loss and metrics over the WHOLE set, in order; with keep_outputs, also each example's logits and prediction """
    model.eval()
    gold, pred, loss_sum, all_logits = [], [], 0.0, []
    for i in range(0, len(data), batch_size):
        x, lengths, y = collate(data[i:i + batch_size])
        with ctx:
            logits = model(x.to(device), lengths).float()
        loss_sum += F.cross_entropy(logits, y.to(device), reduction='sum').item()
        gold += y.tolist()
        pred += logits.argmax(-1).tolist()
        if keep_outputs:
            all_logits += logits.cpu().tolist()
    model.train()
    outputs = {'predictions': pred, 'labels': gold, 'logits': all_logits} if keep_outputs else {}
    return {'loss': loss_sum / len(data), **metrics(gold, pred, names), **outputs}


def describe_metrics(m):
    per_class = ' '.join(f'{k} {"-" if v is None else f"{v:.3f}"}' for k, v in m['per_class'].items())
    return f"loss {m['loss']:.4f}, accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} ({per_class})"

# -----------------------------------------------------------------------------
# bundles: <out_dir>/best and <out_dir>/last (a GPT bundle's files: BUNDLE_FILES)


def load_classifier(path, device='cpu'):
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
    return load_bundle_weights(path, model).to(device), config, read_json(os.path.join(path, 'tokenizer.json'))


def bundle_config(info, arch, args, names=LABELS):
    """ config.json: all it takes to rebuild the classifier (GPTBatched(...) + head) without the pretrained file """
    return {'format_version': FORMAT_VERSION, 'kind': CLASSIFIER_KIND, 'vocab_size': info['vocab_size'],
            'num_layers': info['num_layers'], 'num_heads': info['num_heads'], 'model_dim': info['model_dim'],
            'head_dim': info['head_dim'], 'max_seq_len': args.block_size, 'arch': arch, 'num_classes': len(names),
            'labels': list(names), 'dropout': args.dropout, 'lora': lora_config(args),
            'pretrained': {'path': args.pretrained_ckpt_path, 'format': info['format'], 'step': info['step'],
                           'val_loss': info['val_loss']}}


def check_arch(args, arch, source):
    """ the optional architecture flags must agree with the checkpoint: they are checks, never settings """
    for flag, key in (('n_layer', 'num_layers'), ('n_head', 'num_heads'), ('n_embd', 'model_dim'),
                      ('vocab_size', 'vocab_size')):
        value = getattr(args, flag)
        if value is not None and value != arch[key]:
            raise CheckpointError(f'--{flag} {value} does not match {source}, which has {key} = {arch[key]}; '
                                  f'drop --{flag} (the architecture is read from the checkpoint) or name the right '
                                  'checkpoint')

# -----------------------------------------------------------------------------


def build_classifier(args, last_dir, names):
    """ (classifier, config, tokenizer spec, training state): from last/ on --resume, else the pretrained file """
    if args.resume and os.path.isdir(last_dir):
        model, config, spec = load_classifier(last_dir, args.device)
        if config['labels'] != list(names):
            raise CheckpointError(f"{last_dir} was trained for the classes {', '.join(config['labels'])}, but the data "
                                  f"has {', '.join(names)}: resume it on its own task, or start in another --out_dir")
        model.drop.p = config['dropout'] = args.dropout
        check_arch(args, config, last_dir)
        started = (config.get('pretrained') or {}).get('path')
        if args.pretrained_ckpt_path and started and not same_file(args.pretrained_ckpt_path, started):
            raise CheckpointError(f'--resume continues {last_dir}, which was fine-tuned from {started}, but '
                                  f'--pretrained_ckpt_path names {args.pretrained_ckpt_path}: drop '
                                  '--pretrained_ckpt_path to continue that run, or start the new one in another '
                                  '--out_dir (or without --resume)')
        if args.tokenizer_name and find_tokenizer(args.tokenizer_name, args.tokenizer_dir)[0] != spec:
            raise TokenizerError(f'--tokenizer_name {args.tokenizer_name} is not the tokenizer {last_dir} was '
                                 'trained with')
        if args.block_size > config['max_seq_len']:
            raise CheckpointError(f"--block_size {args.block_size} exceeds the {config['max_seq_len']} tokens "
                                  f'{last_dir} was built for')
        state = read_json(os.path.join(last_dir, 'training_state.json'))
        # the weights are merged: any adapters go on top; the same adapters get their factors (and so their
        # optimizer state) back, others start fresh, and so does the optimizer
        saved, wanted = config.get('lora'), lora_config(args)
        if wanted:
            add_modded_lora(model.backbone, wanted['rank'], wanted['alpha'])
        if wanted and wanted == saved:
            set_modded_lora_factors(model, read_bundle_tensors(last_dir, 'adapter.pt'))
        elif wanted != saved:
            describe_lora = lambda c: f"LoRA rank {c['rank']} alpha {c['alpha']}" if c else 'full fine-tuning'
            print(f'note: {last_dir} was trained with {describe_lora(saved)}, this run asks for {describe_lora(wanted)}: '
                  'the merged weights go on with fresh adapters (if any) and a fresh optimizer state')
            config['lora'], state = wanted, {**state, 'fresh_optimizer': True}
        return model.to(args.device), config, spec, state
    if not args.pretrained_ckpt_path:
        raise CheckpointError(f'nothing to resume in {last_dir}; name --pretrained_ckpt_path')
    if args.resume:
        print(f'--resume: nothing in {last_dir} yet, starting from the pretrained checkpoint')
    elif os.path.isdir(last_dir):
        step = read_json(os.path.join(last_dir, 'training_state.json')).get('step')
        print(f'note: {args.out_dir} holds an earlier run (step {step}): this run replaces its best/ and last/ '
              '(--resume continues it; another --out_dir keeps it)')
    backbone, info, _ = load_pretrained_checkpoint(args.pretrained_ckpt_path, device=args.device,
                                                   num_heads=args.n_head, max_seq_len=args.block_size)
    spec, where = find_tokenizer(args.tokenizer_name or 'gpt2', args.tokenizer_dir)
    print(f'tokenizer: {where}' + ('' if args.tokenizer_name else ' (the default; --tokenizer_name names another)'))
    check_arch(args, info, args.pretrained_ckpt_path)
    model = NLIClassifier(backbone, len(names), args.dropout)
    if args.lora_rank:
        add_modded_lora(model.backbone, args.lora_rank, lora_config(args)['alpha'])
    return model.to(args.device), bundle_config(info, backbone.arch, args, names), spec, None


def same_file(a, b):
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def refuse_distributed_launch():
    """ no DDP here: under torchrun every process would train its own copy and all would write the same out_dir """
    world_size = os.environ.get('WORLD_SIZE', '1')
    if world_size != '1':
        raise SetupError(f"finetune_hindi_xnli.py was started as one of several processes (WORLD_SIZE={world_size}, "
                 f"RANK={os.environ.get('RANK')}, e.g. by torchrun), but it has no distributed (DDP) support: each "
                 'process would train its own copy of the model and all would write the same --out_dir. Run it as a '
                 'single process, with plain `python finetune_hindi_xnli.py ...`.')


def accepted_flags(args):
    """ the fork's flags that mean nothing here are said so, never silently ignored """
    if args.force_tokenization:
        print('note: --force_tokenization: this script keeps no tokenized cache; it tokenizes on every run')
    if args.eval_iters is not None:
        print(f'note: --eval_iters {args.eval_iters} is not used: every evaluation covers the whole validation split')
    evaluation = ('checkpoint_path', 'datasets', 'dataset_labels', 'dataset_config', 'output_dir')
    unused = [f'--{k}' for k in evaluation if getattr(args, k) is not None] + (
        ['--split'] if args.split != 'test' else [])
    if unused and not args.eval_only:
        print(f'note: {", ".join(unused)} apply to --eval_only only, and are not used by this training run')


def autocast(args, flag=None):
    """ (autocast context, GradScaler) for --device / --dtype (named in the note as `flag`, e.g. the fork's) """
    cuda = torch.device(args.device).type == 'cuda'
    if args.dtype != 'float32' and not cuda:
        print(f'note: {flag or "--dtype " + args.dtype} autocasts on cuda only; computing in float32 on {args.device}')
    ctx = torch.autocast('cuda', dtype=getattr(torch, args.dtype)) if cuda and args.dtype != 'float32' else nullcontext()
    return ctx, torch.amp.GradScaler('cuda', enabled=cuda and args.dtype == 'float16')


def main(args):
    refuse_distributed_launch()  # before any work
    accepted_flags(args)
    if args.eval_only:
        return evaluate_only(args)
    torch.manual_seed(args.seed)
    device, last_dir, best_dir = args.device, os.path.join(args.out_dir, 'last'), os.path.join(args.out_dir, 'best')
    ctx, scaler = autocast(args)
    for d in (last_dir, best_dir):
        recover(d)  # finish a save that a crash interrupted

    examples, valid, test, sources = load_splits(args)
    train, names = examples.rows, examples.names
    model, config, spec, state = build_classifier(args, last_dir, names)
    config.update(text_columns=examples.text_columns, label_column=examples.label_column) # what --eval_only reads
    tok = load_tokenizer(spec)
    sep = separator(tok)
    encode = lambda data, name: encode_dataset(data, tok, sep, args.block_size, config['vocab_size'], name)
    train, valid, test = encode(train, 'train'), encode(valid, 'valid'), test and encode(test, 'test')
    language = f" ({sources['language']})" if sources['language'] else ''
    print(f"data{language}: train {len(train)} from {sources['train']}, valid {len(valid)} from "
          f"{sources['valid']}, test {len(test) if test else 0} from {sources['test'] or '(no test set)'}; "
          f"classes {', '.join(names)}; separator ids {sep}")

    weight = class_weights([y for _, y in train], len(names)).to(device) if args.class_weights else None
    optimizer = make_optimizer(model, args)
    steps_per_epoch, total_steps = step_counts(args, len(train))
    schedule = lr_schedule(args, total_steps)
    eval_interval = args.eval_interval or steps_per_epoch
    step, best, history = 0, None, []
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f'trainable: {trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters ('
          + (f"LoRA rank {config['lora']['rank']} on attention and MLP, and the head)" if config['lora'] else
             'full fine-tuning)'))
    if state is not None and not state.get('fresh_optimizer'):
        fresh = [dict(g) for g in optimizer.param_groups]
        optimizer.load_state_dict(read_bundle_tensors(last_dir, 'optimizer.pt'))
        for g, f in zip(optimizer.param_groups, fresh):  # this run's lrs and decay, the checkpoint's moments
            g.update(base_lr=f['base_lr'], weight_decay=f['weight_decay'])
    if state is not None:
        step, history = state['step'], state.get('history', [])
        # best/ on disk is the truth about the best model; last/ records it too, in case best/ was removed
        best_state = os.path.join(best_dir, 'training_state.json')
        best = read_json(best_state)['best'] if os.path.isfile(best_state) else state.get('best')
        if (state.get('data'), state.get('steps_per_epoch')) != (sources, steps_per_epoch):
            print(f'warning: the data, its split (--seed), --batch_size or --gradient_accumulation_steps differ from '
                  f'the run saved in {last_dir}: from step {step} on, the batches are not the ones that run would '
                  'have seen')
        set_rng_state(state['rng'])
        so_far = 'none' if best is None else f"accuracy {best['accuracy']:.4f} at step {best['step']}"
        print(f'resuming from {last_dir} at step {step} (epoch {step / steps_per_epoch:.2f}) of {total_steps}; '
              f'best so far: {so_far}')
        if step >= total_steps:
            print(f'note: {last_dir} is already at step {step}, not below this run\'s {total_steps} steps '
                  '(--num_epochs, --max_steps): nothing is trained; best/ is scored again')

    run = None
    if args.wandb_log:
        run = start_wandb(args.wandb_project, args.wandb_run_name, vars(args))

    def training_state(kind, val):
        return {'step': step, 'epoch': step / steps_per_epoch, 'steps_per_epoch': steps_per_epoch,
                'total_steps': total_steps, 'kind': kind, 'metrics': val, 'best': best, 'history': history,
                'data': sources, 'args': vars(args)}

    model.train()
    order_epoch, window, since_eval, t0 = None, [], [], time.time()
    per_step = args.batch_size * args.gradient_accumulation_steps
    while step < total_steps:
        epoch, b = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # the order depends on (seed, epoch) only: a resumed run sees the same batches
            generator = torch.Generator().manual_seed(args.seed + epoch)
            order = torch.randperm(len(train), generator=generator).tolist()
            order_epoch = epoch
        examples = order[b * per_step:(b + 1) * per_step]
        scale_lrs(optimizer, schedule(step))
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        # micro-batches; the loss is the (weighted) mean over the whole step, as one batch of them would give
        total = len(examples) if weight is None else weight[[train[i][1] for i in examples]].sum()
        for m in range(0, len(examples), args.batch_size):
            x, lengths, y = collate([train[i] for i in examples[m:m + args.batch_size]])
            with ctx:
                logits = model(x.to(device), lengths)
            loss = F.cross_entropy(logits.float(), y.to(device), weight=weight, reduction='sum') / total
            scaler.scale(loss).backward()
            loss_sum += loss.item()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        window.append(loss_sum)
        since_eval.append(window[-1])
        if step % args.log_interval == 0 or step == total_steps:
            lrs, mean = {g['name']: g['lr'] for g in optimizer.param_groups}, sum(window) / len(window)
            print(f"step {step}/{total_steps} (epoch {epoch + 1}): train loss {mean:.4f}, lr {lrs['pretrained']:.2e} "
                  f"/ head {lrs['head']:.2e}, {(time.time() - t0) * 1000 / len(window):.0f} ms/step")
            if run:
                run.log({'train/loss': mean, 'lr/pretrained': lrs['pretrained'], 'lr/head': lrs['head']}, step=step)
            window, t0 = [], time.time()
        if step % eval_interval == 0 or step == total_steps:
            val = evaluate(model, valid, args.batch_size * 2, device, ctx, names)
            history.append({'step': step, 'train_loss': sum(since_eval) / len(since_eval),
                            **{k: val[k] for k in ('loss', 'accuracy', 'macro_f1')}})
            since_eval = []
            is_best = is_better(val, best)
            print(f'eval step {step} (epoch {step / steps_per_epoch:.2f}): val {describe_metrics(val)}'
                  + ('  [best]' if is_best else ''))
            if is_best:
                best = {**val, 'step': step}
                save_classifier(best_dir, model, config, spec, training_state('best', val))
            save_classifier(last_dir, model, config, spec, {**training_state('last', val), 'rng': rng_state()}, optimizer)
            if run:
                run.log({**{f'val/{k}': val[k] for k in ('loss', 'accuracy', 'macro_f1')},
                         **{f'val/acc_{k}': v for k, v in val['per_class'].items() if v is not None},
                         'checkpoint/saved_last': step, **({'checkpoint/saved_best': step} if is_best else {})},
                        step=step)
            t0 = time.time()

    # the test set is scored by best/ as reloaded from disk: exactly what a user would deploy
    if not os.path.isdir(best_dir):
        raise CheckpointError(f'{best_dir} does not exist: no evaluation has run (nothing was trained)')
    model = load_classifier(best_dir, device)[0]
    print(f"best: step {best['step']}, val {describe_metrics(best)}")
    if test:
        res = {'split': 'test', 'test_file': sources['test'], **evaluate(model, test, args.batch_size * 2, device, ctx, names)}
    else:
        res = {'split': 'validation', 'note': 'no test set was given, so these are the best validation metrics',
               **{k: v for k, v in best.items() if k != 'step'}}
    res.update(labels=list(names), language=sources['language'], best_step=best['step'], checkpoint=best_dir,
               best_validation=best)
    write_json(os.path.join(args.out_dir, 'results.json'), res)
    print(f"{res['split']} ({res['num_examples']} examples): {describe_metrics(res)}")
    print('confusion matrix (rows gold, columns predicted):')
    print(f"{'':>14}" + ''.join(f'{l:>14}' for l in names))
    for label, row in zip(names, res['confusion_matrix']):
        print(f'{label:>14}' + ''.join(f'{n:>14}' for n in row))
    print(f"results written to {os.path.join(args.out_dir, 'results.json')}")
    if run:
        run.summary.update({f"{res['split']}/{k}": res[k] for k in ('accuracy', 'macro_f1', 'loss')})
        run.finish()


def evaluate_only(args):
    """ the fork's evaluate.py: a fine-tuned bundle scored on one or more datasets' splits, results_<label>.json each """
    checkpoint = args.checkpoint_path or os.path.join(args.out_dir, 'best')
    if not os.path.isdir(checkpoint):
        found = 'is a file' if os.path.exists(checkpoint) else 'does not exist'
        raise CheckpointError(f'--eval_only: {checkpoint} {found}; expected the best/ (or last/) directory this '
                              'script writes (--checkpoint_path DIR, or the --out_dir of the training run)')
    recover(checkpoint)
    model, config, spec = load_classifier(checkpoint, args.device)
    # the columns the model was trained on, unless named here: phonemized runs read other columns than plain ones
    args = argparse.Namespace(**{**vars(args), 'text_column': args.text_column or config.get('text_columns'),
                                 'label_column': args.label_column or config.get('label_column')})
    ctx, _ = autocast(args)
    tok = load_tokenizer(spec)
    sep, names = separator(tok), config['labels']
    val = read_json(os.path.join(checkpoint, 'training_state.json')).get('metrics') or {}
    # beside the training run's results.json: in the out_dir of the checkpoint's run
    output_dir = args.output_dir or (os.path.dirname(os.path.normpath(checkpoint)) or '.')
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise CheckpointError(f'--output_dir {output_dir} is a file; expected a directory for results_<label>.json')
    for label, examples, where in evaluation_sets(args, names):
        os.makedirs(output_dir, exist_ok=True)
        data = encode_dataset(examples.rows, tok, sep, config['max_seq_len'], config['vocab_size'], where)
        r = evaluate(model, data, args.batch_size * 2, args.device, ctx, names, keep_outputs=True)
        result = {'dataset': where, 'config': args.dataset_config, 'split': args.split, 'class_names': names,
                  **{k: r[k] for k in ('num_examples', 'predictions', 'labels', 'logits', 'accuracy', 'f1_score',
                                       'f2_score', 'recall', 'confusion_matrix', 'loss', 'macro_f1', 'per_class')}}
        path = os.path.join(output_dir, f'results_{label}.json')
        write_json(path, {'checkpoint_path': checkpoint, 'checkpoint_info': {
            'val_loss': val.get('loss'), 'val_accuracy': val.get('accuracy'), 'val_f2': val.get('f2_score')},
            'text_columns': examples.text_columns, 'label_column': examples.label_column, 'split': args.split,
            'results': {label: result}})
        print(f"{label}: {where}, {r['num_examples']} examples: accuracy {r['accuracy']:.4f}, f1 {r['f1_score']:.4f}, "
              f"f2 {r['f2_score']:.4f}, recall {r['recall']:.4f}; written to {path}")


def evaluation_sets(args, names):
    """ (label, Examples, where) for each --datasets entry, or for the data the training flags name """
    if not args.datasets:
        train, valid, test, sources = load_splits(args)
        picked = {'test': test, 'validation': valid, 'valid': valid, 'train': train.rows}.get(args.split)
        key = {'validation': 'valid'}.get(args.split, args.split)
        if picked is None:
            raise DataError(f'--split {args.split}: the data has no such split (train, validation and test are '
                            f'read; test from {sources["test"] or "nowhere: no test set was found"})')
        check_classes(train.names, names, sources[key])
        yield args.dataset, train._replace(rows=picked), sources[key]
        return
    labels = args.dataset_labels or [os.path.basename(os.path.normpath(name)) for name in args.datasets]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise DataError(f'--datasets: two of them would both write results_{twice[0]}.json; name each with '
                        '--dataset_labels')
    for name, label in zip(args.datasets, labels):
        if not is_plain_name(label):
            raise DataError(f'--dataset_labels: {label!r} cannot name a file results_<label>.json; use letters, '
                            'digits, -, _ and .')
        source = argparse.Namespace(**{**vars(args), 'parent_dataset': name, 'dataset': args.dataset_config,
                                       'no_subset': args.dataset_config is None})
        tables, origin = dataset_splits(source)
        if args.split not in tables:
            raise DataError(f'--split {args.split}: {origin} has no such split; found {", ".join(tables)}')
        where = f'{origin} [{args.split}]'
        examples = read_examples(where, args.language, args.text_column, args.label_column, table=tables[args.split])
        check_classes(examples.names, names, where)
        yield label, examples, where


def check_classes(found, names, where):
    numbered = lambda n: list(n) == [str(i) for i in range(len(n))] # no names: the ids alone
    if len(found) != len(names) or (list(found) != list(names) and not (numbered(found) or numbered(names))):
        raise DataError(f'{where} has the classes {", ".join(found)}, but the model was fine-tuned for '
                        f'{", ".join(names)}: evaluate it on data of its own task')


if __name__ == '__main__':
    run(main, get_args())
