"""
The data of finetune_xlsum.py: (language, source, target) pairs of a generation task, XLSum summarisation in six
languages by default, read and tokenised as the modded-nanogpt fork's utils/xlsum_sft_common.py and
build_xlsum_sft_packs.py do (languages as dataset configs, three representations' columns, natural or balanced
mixing, per-language sampling, its prompt template, target cut + EOS, labels -100 on the prompt), with one
difference: an example too long for --context_len loses the end of its *article*, never the template's
`Summary:\n`. Tokenised examples can be cached as "packs": a save_to_disk folder with metadata.json.
"""

import hashlib
import json
import os
import random
from argparse import Namespace

import numpy as np

from core.commit import write_json
from core.finetune_data import DataError, dataset_splits, dataset_table, import_datasets, read_table

LANGUAGES = ('english', 'spanish', 'hindi', 'russian', 'tamil', 'urdu')  # the fork's configs, in its order
REPRESENTATIONS = {'text': ('text', 'summary'), 'ipa_stripped': ('text_ipa_stripped', 'summary_ipa_stripped'),
                   'romanized': ('text_romanized', 'summary_romanized')}  # --representation -> (source, target)
SIZES = {'small': (12, 6, 768), 'medium': (16, 8, 1024), 'large': (24, 18, 1152)}  # --size -> (layers, heads, dim)
PROMPT = '[LANG={language}] Summarize the following article.\nArticle:\n{source}\nSummary:\n'
EOS_TOKENS = ('<|endoftext|>', '<|eot_id|>', '<eos>', '</s>')  # the fork's order; none of them: id 50256
SPLITS = ('train', 'validation', 'test')
# what packs record and must agree with the flags; the fork's packs hold the first eight
PACK_SETTINGS = ('dataset_repo', 'representation', 'mix_mode', 'context_len', 'target_max_tokens', 'train_sample_frac',
                 'eos_id', 'languages', 'seed', 'source_column', 'target_column', 'prompt_template', 'tokenizer_sha256')


def eos_id(tok):
    """ the fork's EOS: the first of EOS_TOKENS the tokenizer has, else 50256 (GPT-2's) when that is a token """
    hf = getattr(tok, 'tok', None)
    found = [hf.token_to_id(t) for t in EOS_TOKENS] if hf is not None else []
    eos = next((i for i in found if i is not None), None)
    if eos is None and tok.eot_id is not None:
        eos = tok.eot_id
    if eos is None:
        eos = 50256
    if eos >= tok.vocab_size:
        raise DataError(f'the tokenizer ({tok.spec.get("token_kind")}, {tok.vocab_size} tokens) has none of the end '
                        f'tokens {", ".join(EOS_TOKENS)}, and the fork\'s fallback id 50256 is not one of its ids: a '
                        'generated summary could never end. Fine-tune a model whose tokenizer has one (a modded-nanogpt '
                        'checkpoint with its tokenizer.json, or a GPT trained on data that data/prepare.py --tokenizer '
                        'tokenised)')
    return eos


def encode_prompt(tok, template, language, source, room):
    """ the prompt's ids in at most `room` tokens: whole if it fits, else the article cut from its end """
    ids = tok.encode(template.format(language=language, source=source))
    if len(ids) <= room:
        return ids
    before, after = template.split('{source}')
    head, tail = tok.encode(before.format(language=language)), tok.encode(after.format(language=language))
    keep = room - len(head) - len(tail)
    return head + tok.encode(source)[:keep] + tail if keep > 0 else None


def encode_pair(tok, pair, settings, eos):
    """ {input_ids, labels, language, prompt_len, target_len} of one pair, or None when even the template and the
    target do not fit --context_len (the fork skips those too) """
    target = tok.encode(pair['target'])[:settings['target_max_tokens']] + [eos]
    prompt = encode_prompt(tok, settings['prompt_template'], pair['language'], pair['source'],
                           settings['context_len'] - len(target))
    if prompt is None:
        return None
    return {'input_ids': prompt + target, 'labels': [-100] * len(prompt) + target, 'language': pair['language'],
            'prompt_len': len(prompt), 'target_len': len(target)}


def encode_split(tok, pairs, settings, eos, name):
    examples = [encode_pair(tok, p, settings, eos) for p in pairs]
    skipped = sum(e is None for e in examples)
    if skipped:
        print(f'note: {name}: {skipped} of {len(pairs)} examples do not fit --context_len {settings["context_len"]} '
              'even with no article at all (template + target), and are left out')
    examples = [e for e in examples if e is not None]
    if not examples:
        raise DataError(f'{name}: no examples left to train or evaluate on')
    return examples

# -----------------------------------------------------------------------------
# reading: {split: [pair]}, pair = {language, source, target}


def columns(args):
    source, target = REPRESENTATIONS[args.representation]
    return args.source_column or source, args.target_column or target


def pairs_of(rows, where, source, target, language_column, language=None):
    """ the (language, source, target) of every row; a row's language from its column, else `language` """
    if not rows:
        raise DataError(f'{where} has no examples (an empty split)')
    names = set().union(*(r.keys() for _, r in rows[:1]))
    wanted = [source, target] + ([] if language else [language_column])
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f'{where} has no column {", ".join(map(repr, missing))}; expected the source {source!r} and '
                        f'target {target!r} columns (--representation, or --source_column/--target_column)'
                        + ('' if language else f' and the language column {language_column!r} (--language_column; '
                           'data of one language: --languages NAME)')
                        + f'; found columns: {", ".join(sorted(names))}')
    return [{'language': language or str(r[language_column]), 'source': str(r[source] or ''),
             'target': str(r[target] or '')} for _, r in rows]


def read_pairs(args, splits=SPLITS):
    """ {split: {language: [pair]}} of the data the flags name, the languages in --languages order """
    source, target = columns(args)
    languages = list(args.languages)
    by_split = {s: {} for s in splits}
    files = {'train': args.train_file, 'validation': args.valid_file, 'test': args.test_file}
    saved = os.path.isfile(os.path.join(args.dataset_repo, 'dataset_dict.json'))  # what save_to_disk writes
    if saved and not args.from_disk and not any(files.values()):
        print(f'note: {args.dataset_repo} is a save_to_disk folder: read as one DatasetDict with a language column '
              '(as --from_disk says)')
    if any(files.values()) or args.from_disk or saved:
        if args.from_disk or saved:
            tables, where = dataset_splits(Namespace(from_disk=True, parent_dataset=args.dataset_repo))
            named = {s: f'{where} [{s}]' for s in tables}
        else:
            tables = {s: read_table(files[s]) for s in splits if files[s]}
            where, named = 'the data files', {s: files[s] for s in tables}
        for split in splits:
            if split not in tables:
                raise DataError(f'{where} has no {split} split; found {", ".join(tables) or "none"}'
                                + ('' if args.from_disk else f' (--{"valid" if split == "validation" else split}_file)'))
            one = languages[0] if len(languages) == 1 and args.language_column not in tables[split][0] else None
            for p in pairs_of(tables[split][1], named[split], source, target, args.language_column, one):
                by_split[split].setdefault(p['language'], []).append(p)
        for split, found in by_split.items():
            if not set(found) & set(languages):
                raise DataError(f'{named[split]} has no rows of the languages {", ".join(languages)} (--languages); '
                                f'its languages: {", ".join(sorted(found))}')
            by_split[split] = {lang: found.get(lang, []) for lang in languages if lang in found}
        return by_split
    for language in languages:  # a hub repo (or a local folder) with one config per language, as the fork reads it
        if os.path.isdir(args.dataset_repo) and not os.path.isdir(os.path.join(args.dataset_repo, language)):
            raise DataError(f'{args.dataset_repo} has no folder {language!r}: a local --dataset_repo holds a folder per '
                            f'language (--languages); found {", ".join(sorted(os.listdir(args.dataset_repo))) or "nothing"}'
                            '. A save_to_disk DatasetDict with a language column is read with --from_disk')
        tables, where = dataset_splits(Namespace(from_disk=False, parent_dataset=args.dataset_repo, dataset=language,
                                                 no_subset=False, hf_cache=args.dataset_cache_dir),
                                       '--dataset_cache_dir', '--from_disk --dataset_repo DIR')
        for split in splits:
            if split not in tables:
                raise DataError(f'{where} has no {split} split; found {", ".join(tables) or "none"}')
            by_split[split][language] = pairs_of(tables[split][1], f'{where} [{split}]', source, target,
                                                 args.language_column, language)
    return by_split


def permutation(n, seed):
    # what datasets' Dataset.shuffle(seed=seed) draws, so the order is the fork's
    return np.random.default_rng(seed).permutation(n).tolist()


def mix(train, mode, seed):
    """ --mix_mode: natural concatenates the languages and shuffles; balanced first upsamples each language with
    replacement to the largest one's size (seed + the language's index) """
    if mode == 'balanced':
        most = max(len(rows) for rows in train.values())
        train = {lang: rows if len(rows) == most else
                 [rows[r.randrange(len(rows))] for r in [random.Random(seed + i)] for _ in range(most)]
                 for i, (lang, rows) in enumerate(train.items())}
    rows = [p for lang_rows in train.values() for p in lang_rows]
    return [rows[i] for i in permutation(len(rows), seed)]


def subsample(rows, languages, frac, seed):
    """ --train_sample_frac: max(1, int(n * frac)) rows of each language, each shuffled with seed + its index """
    if frac >= 1.0:
        return rows
    kept = []
    for i, lang in enumerate(languages):
        mine = [p for p in rows if p['language'] == lang]
        kept += [mine[j] for j in permutation(len(mine), seed + i)[:max(1, int(len(mine) * frac))]] if mine else []
    return [kept[i] for i in permutation(len(kept), seed)]


def training_pairs(by_split, args):
    """ {split: [pair]}: train mixed and sampled; validation and test concatenated in language order """
    train = subsample(mix(by_split['train'], args.mix_mode, args.seed), list(by_split['train']),
                      args.train_sample_frac, args.seed)
    return {'train': train, **{s: [p for rows in by_split[s].values() for p in rows] for s in SPLITS[1:]}}

# -----------------------------------------------------------------------------
# packs: the tokenised splits, cached as a save_to_disk DatasetDict with metadata.json


def pack_settings(args, eos, tokenizer_spec):
    source, target = columns(args)
    spec = json.dumps(tokenizer_spec, sort_keys=True).encode()
    return {'dataset_repo': args.dataset_repo, 'representation': args.representation, 'mix_mode': args.mix_mode,
            'context_len': args.context_len, 'target_max_tokens': args.target_max_tokens,
            'train_sample_frac': args.train_sample_frac, 'eos_id': eos, 'languages': list(args.languages),
            'seed': args.seed, 'source_column': source, 'target_column': target,
            'prompt_template': args.prompt_template, 'tokenizer_sha256': hashlib.sha256(spec).hexdigest()}


def read_packs(path, settings):
    """ {split: [example]} of packs whose metadata agrees with this run's settings """
    meta_path = os.path.join(path, 'metadata.json')
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f'--packed_data_dir {path}: {meta_path} could not be read ({e}); expected the metadata.json '
                        'written beside the packs (or pass --build_packs_if_missing to build them)') from None
    differ = [k for k in PACK_SETTINGS if k in meta and meta[k] != settings[k]]
    if differ:
        raise DataError(f'--packed_data_dir {path} was built with other settings: '
                        + '; '.join(f'{k} {meta[k]!r} there, {settings[k]!r} here' for k in differ)
                        + '. Build packs for this run in another --packed_data_dir (--build_packs_if_missing), or '
                        'run with the settings the packs were built with')
    datasets = import_datasets()
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f'--packed_data_dir {path} could not be read by datasets.load_from_disk: {e}') from None
    return {s: [row for _, row in dataset_table(loaded[s])[1]] for s in SPLITS if s in loaded}


def write_packs(path, examples, settings):
    """ save_to_disk into a sibling folder, then renamed: a cut-off build never passes for packs """
    datasets = import_datasets()
    tmp = f'{path.rstrip(os.sep)}.building'
    datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s, rows in examples.items()}).save_to_disk(tmp)
    write_json(os.path.join(tmp, 'metadata.json'), {**settings, 'splits': {s: len(r) for s, r in examples.items()}})
    os.replace(tmp, path)
