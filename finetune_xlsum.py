"""
Generative fine-tuning of a modded-nanogpt checkpoint (train_gpt_small.py / train_gpt_medium.py / large-lite), the
twin of finetune_hindi_xnli.py: supervised fine-tuning on (source, target) pairs, XLSum summarisation in six
languages by default, with the command line of the fork's train_gpt_xlsum_sft_accelerate.py, e.g.
$ python finetune_xlsum.py --representation text --size small --pretrained_ckpt best_state_step010000_val3.2100.pt \
    --tokenizer_json bpe-8lang-text-100k-tokenizer.json --output_root out-xlsum
and its evaluate_xlsum_generation.py as --eval_only (beam search with a key/value cache, ROUGE that reads every
script, BLEU, the next-token loss):
$ python finetune_xlsum.py --eval_only --model_ckpt out-xlsum/text/small/RUN/best --output_json results.json

The loss is the *next* token's (the fork's is not shifted: it trains each position to copy the token it sees).
The outputs, in <output_root>/<representation>/<size>/<run_name>:
  best/   the model with the lowest validation token loss: model.pt (merged weights, LM head included),
          config.json, tokenizer.json, training_state.json
  last/   the same plus optimizer.pt (and adapter.pt with LoRA), for --resume; run_config.json, summary.json
"""

import csv
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from finetune_hindi_xnli import autocast, same_file, scale_lrs
from core.args import Parser
from core.beam_search import beam_search
from core.bundle import rng_state, set_rng_state
from core.classifier import lora_config
from core.generative_models import family_of
from core.cli import SetupError, check_device, run
from core.distributed import end_process_group
from core.commit import CheckpointError, recover, write_json
from core.finetune_data import DataError, find_tokenizer
from core.generation_data import (LANGUAGES, PROMPT, REPRESENTATIONS, SIZES, encode_pair, encode_prompt,
                                  encode_split, eos_id, pack_settings, read_packs, read_pairs, training_pairs,
                                  write_packs)
from core.text_metrics import bleu, rouge_for_language
from core.tokenizer import TokenizerError, load_tokenizer

DTYPES = {'no': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}  # --mixed_precision -> autocast dtype


def get_args(argv=None):
    p = Parser(description='Generative fine-tuning (and --eval_only) of a modded-nanogpt checkpoint: XLSum by default.')
    a = p.add_argument
    # the fork's flags, with its defaults
    a('--dataset_repo', default='mugezhang/xlsum_6lang_multirepr', help='a hub dataset (or local folder) with one '
      'config per language; with --from_disk, a save_to_disk DatasetDict with a language column')
    a('--dataset_cache_dir', help="the datasets cache folder (default: datasets' own)")
    a('--packed_data_dir', help='tokenised packs (a save_to_disk folder + metadata.json): read when there, else '
      'built with --build_packs_if_missing; without it the data is tokenised in memory')
    a('--build_packs_if_missing', action='store_true')
    a('--representation', default='text', choices=list(REPRESENTATIONS), help='the (source, target) columns')
    a('--size', choices=list(SIZES), help='checked against the checkpoint: (layers, heads, dim) = '
      + ', '.join(f'{k} {v}' for k, v in SIZES.items()))
    a('--mix_mode', default='balanced', choices=['balanced', 'natural'], help='balanced upsamples every language\'s '
      'train split to the largest one')
    a('--tokenizer_json', help='the tokenizer.json the checkpoint was pretrained with (or gpt2)')
    a('--pretrained_ckpt', help='a modded-nanogpt checkpoint (.pt), or a best/ or last/ of this script')
    a('--context_len', type=int, default=2048, help='max tokens of prompt + target')
    a('--target_max_tokens', type=int, default=256, help='the target is cut to this many tokens, then EOS')
    a('--num_train_epochs', type=float, default=3.0)
    a('--max_steps', type=int, default=-1, help='at most this many optimizer steps (-1: the epochs decide)')
    a('--train_sample_frac', type=float, default=1.0, help='keep this fraction of each language\'s train rows')
    a('--per_device_batch_size', type=int, default=1)
    a('--gradient_accumulation_steps', type=int, default=16)
    a('--learning_rate', type=float, default=1e-5)
    a('--weight_decay', type=float, default=0.01, help='on matrices; vectors (the modded scalars) never decay')
    a('--warmup_ratio', type=float, default=0.06, help='linear warmup over this share of the steps, then linear decay to 0')
    a('--max_grad_norm', type=float, default=1.0, help='0: no clipping')
    a('--eval_every_steps', type=int, default=200, help='validation token loss (and best/, last/) every N steps and at step 1')
    a('--save_every_steps', type=int, default=0, help='also keep a step_NNNNNNN/ bundle every N steps')
    a('--num_workers', type=int, default=4, help="accepted for the fork; the examples are in memory")
    a('--dataloader_pin_memory', action='store_true', help='accepted for the fork')
    a('--mixed_precision', default='bf16', choices=list(DTYPES), help='autocast on CUDA; float32 on a CPU')
    a('--seed', type=int, default=42)
    a('--output_root', default='out-xlsum')
    a('--run_name', help='default: <size>_<representation>_<mix_mode>_lr.._wd.._wr.._s<seed>, as the fork names it')
    # ours
    a('--lora_rank', type=int, default=0, help='LoRA of this rank on every attention and MLP weight (0: full fine-tuning)')
    a('--lora_alpha', type=float, help='LoRA scale alpha / rank (default: alpha = rank)')
    a('--resume', action='store_true', help='continue from <run dir>/last exactly where it stopped')
    a('--stop_after_steps', type=int, help='stop at this step (counted from the start of the run, not of this '
      'process), as if interrupted; the schedule stays the whole run\'s: --resume goes on')
    a('--n_head', type=int, help="the head count (default: --size's, else the known table's)")
    a('--from_disk', action='store_true', help='--dataset_repo is a save_to_disk DatasetDict with a language column')
    a('--train_file'); a('--valid_file'); a('--test_file')
    a('--source_column'); a('--target_column')
    a('--language_column', default='language')
    a('--languages', nargs='+', default=list(LANGUAGES), help='the languages (configs) to read, in this order')
    a('--prompt_template', default=PROMPT, help='the prompt, with {language} and {source}: the fork\'s by default')
    a('--log_interval', type=int, default=10)
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    a('--debug', action='store_true', help='show the full traceback on errors')
    # --eval_only: the fork's evaluate_xlsum_generation.py
    a('--eval_only', action='store_true', help='no training: beam search on --split, ROUGE, BLEU, token loss')
    a('--model_ckpt', help='--eval_only: a best/ or last/ of this script, or a pretraining checkpoint (.pt)')
    a('--split', default='test', choices=['validation', 'test'])
    a('--max_eval_samples_per_lang', type=int, default=0, help='0: every example')
    a('--num_beams', type=int, default=4, help='1: greedy')
    a('--max_new_tokens', type=int, default=256)
    a('--batch_size_token_loss', type=int, default=4)
    a('--output_json'); a('--output_csv', help='default: --output_json with .csv')
    a('--rouge_tokenizer', default='unicode', choices=['unicode', 'ascii'], help="ascii: the fork's ROUGE, which "
      'keeps only [a-z0-9] (a Hindi, Tamil, Urdu or Russian summary scores 0)')
    a('--unshifted_loss', action='store_true', help="--eval_only: also the fork's unshifted token loss, to compare "
      'with its old numbers')
    args = p.parse_args(argv)
    if args.lora_alpha is not None and not args.lora_rank:
        p.error(f'--lora_alpha {args.lora_alpha} needs --lora_rank R (above 0): without it there are no adapters')
    if '{source}' not in args.prompt_template or args.prompt_template.count('{source}') != 1:
        p.error(f'--prompt_template must hold {{source}} once (and may hold {{language}}); found {args.prompt_template!r}')
    for flag, ok, expected in (  # each limit is written so that NaN fails it too
            ('context_len', args.context_len >= 8, 'at least 8'),
            ('target_max_tokens', args.target_max_tokens >= 1, 'at least 1'),
            ('num_train_epochs', 0 < args.num_train_epochs < math.inf, 'a number > 0'),
            ('max_steps', args.max_steps == -1 or args.max_steps >= 1, '-1 or at least 1'),
            ('train_sample_frac', 0 < args.train_sample_frac <= 1, 'above 0 and at most 1'),
            ('per_device_batch_size', args.per_device_batch_size >= 1, 'at least 1'),
            ('gradient_accumulation_steps', args.gradient_accumulation_steps >= 1, 'at least 1'),
            ('learning_rate', 0 <= args.learning_rate < math.inf, 'a finite number >= 0'),
            ('weight_decay', 0 <= args.weight_decay < math.inf, 'a finite number >= 0'),
            ('warmup_ratio', 0 <= args.warmup_ratio <= 1, 'between 0 and 1'),
            ('max_grad_norm', 0 <= args.max_grad_norm < math.inf, 'a finite number >= 0'),
            ('eval_every_steps', args.eval_every_steps >= 0, 'at least 0'),
            ('save_every_steps', args.save_every_steps >= 0, 'at least 0'),
            ('lora_rank', args.lora_rank >= 0, 'at least 0'),
            ('lora_alpha', args.lora_alpha is None or 0 < args.lora_alpha < math.inf, 'a number > 0'),
            ('stop_after_steps', args.stop_after_steps is None or args.stop_after_steps >= 1, 'at least 1'),
            ('n_head', args.n_head is None or args.n_head >= 1, 'at least 1'),
            ('log_interval', args.log_interval >= 1, 'at least 1'),
            ('num_beams', args.num_beams >= 1, 'at least 1'),
            ('max_new_tokens', 1 <= args.max_new_tokens and (args.max_new_tokens < args.context_len or
                                                              not args.eval_only), 'at least 1 and below --context_len'),
            ('max_eval_samples_per_lang', args.max_eval_samples_per_lang >= 0, 'at least 0'),
            ('batch_size_token_loss', args.batch_size_token_loss >= 1, 'at least 1')):
        if not ok:
            p.error(f'--{flag} must be {expected}, found {getattr(args, flag)}')
    if args.eval_only and not (args.model_ckpt and args.output_json):
        p.error('--eval_only needs --model_ckpt (a best/ of this script, or a pretraining .pt) and --output_json')
    if not (args.eval_only or args.resume or args.pretrained_ckpt):
        p.error('--pretrained_ckpt is required (unless --resume finds <run dir>/last, or --eval_only)')
    try:
        check_device(args.device)
    except SetupError as e:
        p.error(str(e))
    return args


def run_dir(args):
    """ <output_root>/<representation>/<size>/<run_name>, as the fork lays its runs out """
    name = args.run_name or (f'{args.size or "model"}_{args.representation}_{args.mix_mode}_lr{args.learning_rate:g}'
                             f'_wd{args.weight_decay:g}_wr{args.warmup_ratio:g}_s{args.seed}')
    return os.path.join(args.output_root, args.representation, args.size or 'model', name)

# -----------------------------------------------------------------------------
# the loss: the next token's, summed over the target tokens and divided by their count, as the fork reduces it


def token_loss(logits, labels, shifted=True):
    """ (sum of cross-entropies over the target tokens, their count); shifted: position t is scored on token t + 1,
    as a causal LM predicts; unshifted: on token t itself (the fork's loss: copying scores best) """
    if shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100,
                            reduction='sum')
    return total, (labels != -100).sum()


def collate(examples, pad_id=0):
    """ right-padded input ids and labels (-100 on the prompt and the padding), as the fork's pad_collate """
    T = max(len(e['input_ids']) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        x[i, :len(e['input_ids'])] = torch.tensor(e['input_ids'])
        y[i, :len(e['labels'])] = torch.tensor(e['labels'])
    return x, y


@torch.no_grad()
def evaluate_loss(model, examples, batch_size, device, ctx, shifted=True):
    """ the mean token loss over all examples, and per language (under torchrun each process scores its share) """
    model.eval()
    languages = list(dict.fromkeys(e['language'] for e in examples))
    sums = {lang: [0.0, 0] for lang in languages}
    if dist.is_initialized():
        examples = examples[dist.get_rank()::dist.get_world_size()]
    for i in range(0, len(examples), batch_size):
        batch = examples[i:i + batch_size]
        for lang in dict.fromkeys(e['language'] for e in batch): # one language's rows at a time: counted apart
            mine = [e for e in batch if e['language'] == lang]
            x, y = collate(mine)
            with ctx:
                logits = model(x.to(device))
            total, count = token_loss(logits, y.to(device), shifted)
            s = sums[lang]
            s[0], s[1] = s[0] + total.item(), s[1] + count.item()
    if dist.is_initialized():
        every = torch.tensor([sums[lang] for lang in languages], dtype=torch.float64, device=device)
        dist.all_reduce(every)
        sums = dict(zip(languages, every.tolist()))
    model.train()
    overall = sum(s for s, _ in sums.values()) / max(1, sum(n for _, n in sums.values()))
    return overall, {lang: s / max(1, n) for lang, (s, n) in sums.items()}

# -----------------------------------------------------------------------------
# optimizer and schedule, as the fork's


def make_optimizer(model, args):
    """ AdamW, betas (0.9, 0.95): weight decay on the trainable matrices, none on vectors """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW([{**g, 'base_lr': args.learning_rate, 'lr': args.learning_rate} for g in groups
                              if g['params']], betas=(0.9, 0.95))


def lr_factor(step, warmup_steps, total_steps):
    """ the fork's schedule at optimizer step `step` (0 first): linear warmup from 0, then linear decay to 0 """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if step >= total_steps:
        return 0.0
    return (total_steps - step) / max(1, total_steps - warmup_steps)


def step_counts(args, num_train, world=1):
    """ (steps per epoch, total steps), as the fork counts them: batches of --per_device_batch_size on each of `world`
    processes, steps of --gradient_accumulation_steps batches, a fractional number of epochs rounded up """
    batches = math.ceil(num_train / (args.per_device_batch_size * world))
    steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
    total = math.ceil(steps_per_epoch * args.num_train_epochs)
    return steps_per_epoch, min(total, args.max_steps) if args.max_steps > 0 else total

def train_step(model, optimizer, scaler, micro_batches, ctx, device, max_grad_norm, step_size=None):
    """
    One optimizer step over micro-batches of examples: each one's mean token loss, averaged over the step's
    step_size micro-batches (default: these; under torchrun, every process's), as accelerate accumulates the fork's;
    the gradient clipped to max_grad_norm (0: not clipped). Returns this process's share of the step's loss.
    """
    step_loss = 0.0
    for examples in micro_batches:
        x, y = collate(examples)
        with ctx:
            logits = model(x.to(device))
        total, count = token_loss(logits, y.to(device))
        loss = total / count.clamp(min=1) / (step_size or len(micro_batches))
        scaler.scale(loss).backward()
        step_loss += loss.item()
    if dist.is_initialized():  # the sum of every process's share: a process without a micro-batch adds zeros
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(p.grad)
        total = torch.tensor(step_loss, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        step_loss = total.item()
    scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss

# -----------------------------------------------------------------------------
# models: a modded-nanogpt checkpoint or our GPT (core/generative_models.py: how each is read, run and saved)


def check_size(args, family, model, source):
    got = family.shape(model)
    if args.size and SIZES[args.size] != got:
        known = [name for name, shape in SIZES.items() if shape == got]
        raise CheckpointError(f'--size {args.size} expects (layers, heads, dim) = {SIZES[args.size]}, but {source} has '
                              f'{got}: ' + (f'it is --size {known[0]}' if known else 'drop --size (the shape is read from '
                                            'the checkpoint; --n_head gives the heads of a shape outside the table)'))


def tokenizer_for(args, spec, source):
    """ the tokenizer: --tokenizer_json, else the one the checkpoint stored """
    if args.tokenizer_json:
        given = find_tokenizer(args.tokenizer_json, flag='--tokenizer_json')[0]
        if spec is not None and given != spec:
            print(f'note: --tokenizer_json {args.tokenizer_json} is not the tokenizer {source} stored; using '
                  '--tokenizer_json')
        return given
    if spec is None:
        raise TokenizerError(f'{source} stores no tokenizer: name the one it was pretrained with (--tokenizer_json)')
    return spec


def check_vocabulary(tok, family, model, source):
    rows = family.vocab_rows(model)
    if tok.vocab_size > rows:
        raise TokenizerError(f'the tokenizer has {tok.vocab_size} tokens, but {source} has only {rows} embedding rows: '
                             'it is not the tokenizer this checkpoint was pretrained with (--tokenizer_json)')
    if -(-tok.vocab_size // 128) * 128 < rows:  # more rows than padding to a multiple of 128 explains
        print(f'note: the tokenizer has {tok.vocab_size} tokens and {source} {rows} embedding rows, more than padding '
              'explains: is it the tokenizer the checkpoint was pretrained with?')


def load_model(path, args, lora=None):
    """ (family, Loaded, tokenizer spec) of the checkpoint at path, checked against --size and the tokenizer """
    family = family_of(path)
    loaded = family.load(path, args, args.device, lora)
    check_size(args, family, loaded.model, path)
    spec = tokenizer_for(args, loaded.spec, path)
    return family, loaded, spec


def build_model(args, last_dir):
    """ (family, Loaded, tokenizer spec, training state or None): from last/ on --resume, else --pretrained_ckpt """
    resuming = args.resume and os.path.isdir(last_dir)
    if args.resume and not resuming:
        print(f'--resume: nothing in {last_dir} yet, starting from the pretrained checkpoint')
    if not resuming and not args.pretrained_ckpt:
        raise CheckpointError(f'nothing to resume in {last_dir}; name --pretrained_ckpt')
    family, loaded, spec = load_model(last_dir if resuming else args.pretrained_ckpt, args, lora_config(args))
    if not resuming:
        return family, loaded, spec, None
    started = (loaded.info or {}).get('path')
    if args.pretrained_ckpt and started and not same_file(args.pretrained_ckpt, started):
        raise CheckpointError(f'--resume continues {last_dir}, which was fine-tuned from {started}, but '
                              f'--pretrained_ckpt names {args.pretrained_ckpt}: drop --pretrained_ckpt to continue that '
                              'run, or start the new one with another --run_name (or without --resume)')
    return family, loaded, spec, loaded.state

# -----------------------------------------------------------------------------
# data


def load_examples(args, tok, spec):
    """ {split: [example]}: from --packed_data_dir when it is there, else read, mixed and tokenised here """
    eos = eos_id(tok)
    settings = pack_settings(args, eos, spec)
    path = args.packed_data_dir
    if path and os.path.exists(os.path.join(path, 'metadata.json')):
        examples = read_packs(path, settings)
        where = f'the packs in {path}'
    elif path and not args.build_packs_if_missing:
        raise DataError(f'--packed_data_dir {path} holds no packs (no metadata.json); pass --build_packs_if_missing to '
                        'build them there, or leave out --packed_data_dir to tokenise in memory')
    else:
        pairs = training_pairs(read_pairs(args), args)
        examples = {s: encode_split(tok, rows, settings, eos, f'{args.dataset_repo} [{s}]') for s, rows in pairs.items()}
        where = args.dataset_repo
        if path:
            write_packs(path, examples, settings)
            where += f' (packs written to {path})'
    for split in ('train', 'validation'):
        if not examples.get(split):
            raise DataError(f'{where}: the {split} split is empty')
    top = max(max(e['input_ids']) for rows in examples.values() for e in rows)
    counts = ', '.join(f'{s} {len(r)}' for s, r in examples.items())
    print(f'data: {counts} examples from {where}; EOS id {eos}; languages {", ".join(args.languages)}')
    return examples, eos, top

# -----------------------------------------------------------------------------


def start_distributed(args):
    """ (rank, number of processes): under torchrun one process group (nccl on CUDA, gloo on a CPU), one GPU each;
    only process 0 prints and saves """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return 0, 1
    if args.eval_only:
        raise SetupError(f'--eval_only runs as one process (WORLD_SIZE={world} here): start it with plain python')
    rank, cuda = int(os.environ['RANK']), torch.device(args.device).type == 'cuda'
    if cuda:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(args.device)
    dist.init_process_group('nccl' if cuda else 'gloo')
    if rank:
        sys.stdout = open(os.devnull, 'w')
    return rank, world


def main(args):
    rank, world = start_distributed(args)
    try:
        train(args, rank, world) if not args.eval_only else evaluate_only(args)
    finally:
        if dist.is_initialized():
            end_process_group()


def train(args, rank, world):
    for flag in ('num_workers', 'dataloader_pin_memory'):
        if getattr(args, flag) not in (4, False):
            print(f'note: --{flag} is accepted for the fork; the examples are in memory, no loader workers are used')
    torch.manual_seed(args.seed)
    out = run_dir(args)
    last_dir, best_dir = os.path.join(out, 'last'), os.path.join(out, 'best')
    if rank == 0:
        for d in (last_dir, best_dir):
            recover(d)  # finish a save that a crash interrupted
    if world > 1:
        dist.barrier()
    ctx, scaler = mixed_precision(args)
    family, loaded, spec, state = build_model(args, last_dir)
    model = loaded.model
    tok = load_tokenizer(spec)
    check_vocabulary(tok, family, model, args.pretrained_ckpt or last_dir)
    if rank:  # process 0 builds the packs (when asked to), the others read them
        dist.barrier()
    examples, eos, top = load_examples(args, tok, spec)
    if world > 1 and rank == 0:
        dist.barrier()
    if top >= family.vocab_rows(model):
        raise TokenizerError(f'the data has token id {top}, but the model has {family.vocab_rows(model)} embedding '
                             'rows: the packs were made with another tokenizer')
    train, valid = examples['train'], examples['validation']
    optimizer = make_optimizer(model, args)
    steps_per_epoch, total_steps = step_counts(args, len(train), world)
    warmup_steps = int(total_steps * args.warmup_ratio)
    stop_at = min(total_steps, args.stop_after_steps or total_steps)
    if args.max_steps > total_steps:
        print(f'note: --max_steps {args.max_steps} is more than --num_train_epochs {args.num_train_epochs:g} take '
              f'({total_steps} steps): the epochs end the run (raise --num_train_epochs for more)')
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = lora_config(args)
    print(f'trainable: {trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters of a '
          f'{family.name} model (' + (f"LoRA rank {lora['rank']} on attention and MLP)" if lora else 'full fine-tuning)'))
    step, best, history = 0, None, []
    if state is not None:
        groups = [dict(g) for g in optimizer.param_groups]
        if family.load_optimizer(optimizer, last_dir, model, loaded.fresh):
            for g, f in zip(optimizer.param_groups, groups):  # this run's lr and decay, the checkpoint's moments
                g.update(base_lr=f['base_lr'], weight_decay=f['weight_decay'])
        step, best, history = state['step'], state.get('best'), state.get('history', [])
        if (state.get('data'), state.get('total_steps')) != (pack_settings(args, eos, spec), total_steps):
            print(f'warning: the data or the step count differ from the run saved in {last_dir}: from step {step} on, '
                  'the batches and learning rates are not the ones that run would have had')
        set_rng_state(state['rng'])
        print(f'resuming from {last_dir} at step {step} of {total_steps}; best validation token loss so far: '
              + ('none' if best is None else f"{best['loss']:.4f} at step {best['step']}"))
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, 'run_config.json'), {**vars(args), 'processes': world})

    def training_state(val):
        return {'step': step, 'epoch': step / steps_per_epoch, 'total_steps': total_steps, 'best': best,
                'history': history, 'metrics': val, 'data': pack_settings(args, eos, spec), 'args': vars(args)}

    def evaluate_and_save():
        nonlocal best
        loss, per_language = evaluate_loss(model, valid, args.per_device_batch_size, args.device, ctx)
        val = {'loss': loss, 'per_language': per_language}
        is_best = best is None or loss < best['loss']
        history.append({'step': step, 'val_loss': loss})
        print(f'eval step {step}: val token loss {loss:.4f} ('
              + ', '.join(f'{k} {v:.3f}' for k, v in per_language.items()) + ')' + ('  [best]' if is_best else ''))
        if is_best:
            best = {'loss': loss, 'step': step}
        if rank == 0:
            if is_best:
                family.save(best_dir, model, spec, args, loaded.info, training_state(val))
            family.save(last_dir, model, spec, args, loaded.info, {**training_state(val), 'rng': rng_state()},
                        optimizer)

    model.train()
    order_epoch, window, t0 = None, [], time.time()
    per_step = args.per_device_batch_size * args.gradient_accumulation_steps * world
    while step < stop_at:
        epoch, b = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # the order depends on (seed, epoch) only: a resumed run sees the same batches
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
            order_epoch = epoch
        picked = order[b * per_step:(b + 1) * per_step]
        scale_lrs(optimizer, lr_factor(step, warmup_steps, total_steps))
        micro = [[train[i] for i in picked[m:m + args.per_device_batch_size]]
                 for m in range(0, len(picked), args.per_device_batch_size)]
        mine = micro[rank * args.gradient_accumulation_steps:(rank + 1) * args.gradient_accumulation_steps]
        window.append(train_step(model, optimizer, scaler, mine, ctx, args.device, args.max_grad_norm, len(micro)))
        step += 1
        if step % args.log_interval == 0 or step == stop_at:
            print(f"step {step}/{total_steps} (epoch {epoch + 1}): train loss {sum(window) / len(window):.4f}, lr "
                  f"{optimizer.param_groups[0]['lr']:.2e}, {(time.time() - t0) * 1000 / len(window):.0f} ms/step")
            window, t0 = [], time.time()
        if (args.eval_every_steps and (step % args.eval_every_steps == 0 or step == 1)) or step == stop_at:
            evaluate_and_save()
            t0 = time.time()
        if args.save_every_steps and step % args.save_every_steps == 0 and rank == 0:
            family.save(os.path.join(out, f'step_{step:07d}'), model, spec, args, loaded.info, training_state(None))
    if step < total_steps:
        print(f'stopped at step {step} of {total_steps} (--stop_after_steps): --resume continues from {last_dir}')
    elif state is not None and state['step'] >= total_steps:
        print(f'note: {last_dir} is already at step {step}, not below this run\'s {total_steps} steps: nothing trained')
    if rank:
        return
    summary = {'global_step': step, 'total_steps': total_steps, 'best_val_token_loss': best and best['loss'],
               'best_step': best and best['step'], 'output_dir': out, 'pretrained_ckpt': args.pretrained_ckpt}
    write_json(os.path.join(out, 'summary.json'), summary)
    print(f"best: step {summary['best_step']}, val token loss {summary['best_val_token_loss']:.4f}; written to {out}")


def mixed_precision(args):
    """ finetune_hindi_xnli.autocast for --mixed_precision """
    from argparse import Namespace
    return autocast(Namespace(device=args.device, dtype=DTYPES[args.mixed_precision]),
                    f'--mixed_precision {args.mixed_precision}')

# -----------------------------------------------------------------------------
# --eval_only: beam search, ROUGE, BLEU and the token loss per language


def progress(lang, done, total, tokens, seconds):
    """ one line per language, rewritten in place (stderr): examples done and tokens generated per second """
    end = '\n' if done == total else ''
    print(f'\r[{lang}] {done}/{total} examples, {tokens / max(seconds, 1e-9):.0f} tokens/s', end=end, file=sys.stderr,
          flush=True)


def evaluate_only(args):
    family, loaded, spec = load_model(args.model_ckpt, args)
    model, info = loaded.model, loaded.info
    tok = load_tokenizer(spec)
    check_vocabulary(tok, family, model, args.model_ckpt)
    eos = eos_id(tok)
    model.eval()
    ctx, _ = mixed_precision(args)
    # the prompt the model was fine-tuned with
    args.prompt_template = (loaded.state.get('args') or {}).get('prompt_template', args.prompt_template)
    settings = {'context_len': args.context_len, 'target_max_tokens': args.target_max_tokens,
                'prompt_template': args.prompt_template}
    vocab = tok.vocab_size
    by_language = read_pairs(args, splits=(args.split,))[args.split]
    rows, examples = [], []
    for lang, pairs in by_language.items():
        if args.max_eval_samples_per_lang:
            pairs = pairs[:args.max_eval_samples_per_lang]
        preds, refs, generated, t0 = [], [], 0, time.time()
        for i, pair in enumerate(pairs):
            prompt = encode_prompt(tok, args.prompt_template, lang, pair['source'],
                                   args.context_len - args.max_new_tokens)
            if prompt is None:
                raise DataError(f'--context_len {args.context_len} minus --max_new_tokens {args.max_new_tokens} leaves '
                                'no room even for the prompt template; raise --context_len or lower --max_new_tokens')
            with ctx:
                ids = beam_search(model, prompt, args.max_new_tokens, args.num_beams, eos, vocab)
            generated += len(ids)
            preds.append(tok.decode(ids[:ids.index(eos)] if eos in ids else ids))
            refs.append(pair['target'])
            progress(lang, i + 1, len(pairs), generated, time.time() - t0)
        encoded = [e for e in (encode_pair(tok, p, settings, eos) for p in pairs) if e is not None]
        loss = evaluate_loss(model, encoded, args.batch_size_token_loss, args.device, ctx)[0]
        scores = rouge_for_language(preds, refs, lang, args.rouge_tokenizer, ipa=args.representation == 'ipa_stripped')
        row = {'language': lang, 'split': args.split, 'num_examples': len(refs), **scores, 'bleu': bleu(preds, refs),
               'token_loss': loss}
        if args.unshifted_loss:
            row['token_loss_unshifted'] = evaluate_loss(model, encoded, args.batch_size_token_loss, args.device, ctx,
                                                        shifted=False)[0]
        rows.append(row)
        examples += [{'language': lang, 'prediction': p, 'reference': r} for p, r in zip(preds, refs)]
        print(f"[{lang}] rougeL={row['rougeL']:.4f} bleu={row['bleu']:.2f} token_loss={row['token_loss']:.4f}"
              + (f" (unshifted, the fork's: {row['token_loss_unshifted']:.4f})" if args.unshifted_loss else ''))
    write_results(args, rows, examples, spec, info)


def write_results(args, rows, examples, spec, info):
    """ the fork's JSON and CSV: a row per language, their macro average and the example-weighted one """
    keys = [k for k in rows[0] if k not in ('language', 'split', 'num_examples')]
    total = sum(r['num_examples'] for r in rows)
    macro = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    weighted = {k: sum(r[k] * r['num_examples'] for r in rows) / max(total, 1) for k in keys}
    write_json(args.output_json, {
        'model_ckpt': args.model_ckpt, 'representation': args.representation, 'size': args.size, 'split': args.split,
        'tokenizer_json': args.tokenizer_json, 'num_beams': args.num_beams, 'max_new_tokens': args.max_new_tokens,
        'max_eval_samples_per_lang': args.max_eval_samples_per_lang, 'rouge_tokenizer': args.rouge_tokenizer,
        'loss': 'next token (shifted)', 'pretrained': info, 'per_language': rows, 'macro': macro, 'weighted': weighted,
        'examples': examples})
    csv_path = args.output_csv or os.path.splitext(args.output_json)[0] + '.csv'
    with open(csv_path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=['language', 'split', 'num_examples', *keys])
        writer.writeheader()
        writer.writerows(rows)
        for name, avg in (('macro', macro), ('weighted', weighted)):
            writer.writerow({'language': name, 'split': args.split, 'num_examples': total, **avg})
    print(f"macro: rougeL {macro['rougeL']:.4f}, bleu {macro['bleu']:.2f}, token loss {macro['token_loss']:.4f}; "
          f'written to {args.output_json} and {csv_path}')


if __name__ == '__main__':
    run(main, get_args())
