"""
The data of finetune_hindi_xnli.py: sequence-classification examples as flat tuples (text, ..., label id), one text
per --text_column, with the names of the labels. They come from
- local files: the XNLI 1.0 TSV (rows of one --language), JSON lines, JSON lists and CSV, read here as before;
  parquet and arrow files through Hugging Face `datasets`;
- `datasets` itself, as the modded-nanogpt fork's finetune.py loads them: load_dataset(--parent_dataset, --dataset)
  from the hub or its cache (--hf_cache), a local dataset directory, or a save_to_disk directory (--from_disk).
`datasets` is imported only when one of those is used. Also the fork's tokenizer lookup (--tokenizer_dir).
"""

import csv
import json
import os
import random
from collections import namedtuple

from core.errors import ClearError
from core.tokenizer import TokenizerError, hf_spec_from_file

LABELS = ('entailment', 'neutral', 'contradiction')  # XNLI's class ids 0, 1, 2, as in Hugging Face datasets
TEXT_FILES = ('.tsv', '.csv', '.jsonl', '.json')  # read by read_table
DATASETS_FILES = ('.parquet', '.arrow')  # read by `datasets`
VALID_SPLITS = ('validation', 'valid', 'dev')  # the names datasets on the hub give a validation split


# what read_examples returns: the examples (text, ..., label id), the label names, and the columns they came from
Examples = namedtuple('Examples', 'rows names text_columns label_column')


class DataError(ClearError):
    """ data that cannot be used: the message names the file or dataset, what was expected and what was found """


# -----------------------------------------------------------------------------
# tables: (column names, [(where, row dict)], {column: ClassLabel names}), from a file or a `datasets` split


def read_table(path):
    """ a .tsv (XNLI release), .csv, .jsonl / .json (JSON lines or a list) file; parquet / arrow via `datasets` """
    ext = os.path.splitext(path)[1].lower()
    if ext not in TEXT_FILES + DATASETS_FILES:
        raise DataError(f'{path}: unknown file type {ext or "(none)"!r}; expected .tsv (the XNLI 1.0 release), '
                        '.jsonl/.json (JSON lines), .csv, .parquet or .arrow')
    if not os.path.isfile(path):
        raise DataError(f'{path} does not exist; expected a {ext} file of examples (point --data_dir at the folder '
                        'holding xnli.dev.tsv and xnli.test.tsv, or name files with --train_file, --valid_file, '
                        '--test_file)')
    if ext in DATASETS_FILES:
        datasets = import_datasets()
        try: # read in place: no copy in the datasets cache (the features, ClassLabel names too, are in the file)
            if ext == '.parquet':
                import pyarrow.parquet
                split = datasets.Dataset(pyarrow.parquet.read_table(path))
            else:
                split = datasets.Dataset.from_file(path)
        except Exception as e:  # pyarrow's and datasets' own errors: the message is theirs, the file is named
            raise DataError(f'{path} could not be read as {ext} by datasets: {e}') from None
        return dataset_table(split)
    try:
        with open(path, encoding='utf-8', newline='') as f:
            if ext in ('.tsv', '.csv'):
                # XNLI's TSV has stray quote characters inside sentences: it must be read without quoting
                tsv = dict(delimiter='\t', quoting=csv.QUOTE_NONE) if ext == '.tsv' else {}
                reader = csv.DictReader(f, **tsv)
                rows = [(f'line {reader.line_num}', row) for row in reader]
                return list(reader.fieldnames or []), rows, {}
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f'{path} is not UTF-8 text (byte {e.object[e.start]:#04x}: {e.reason}); expected a '
                        f'UTF-8 {ext} file of examples') from None
    except csv.Error as e:
        raise DataError(f'{path} is not a readable {ext} file ({e}); expected {ext} rows of examples') from None
    if text.lstrip().startswith('['):
        try:
            rows = [(f'item {i}', r) for i, r in enumerate(json.loads(text), 1)]
        except ValueError as e:
            raise DataError(f'{path} is not a valid JSON list ({e}); expected a list of JSON objects') from None
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            try:
                rows += [(f'line {i}', json.loads(line))] if line.strip() else []
            except ValueError as e:
                raise DataError(f'{path} line {i} is not valid JSON ({e}); expected one JSON object per line') from None
    if not all(isinstance(r, dict) for _, r in rows):
        raise DataError(f'{path}: expected JSON objects (one example each), found {type(rows[0][1]).__name__}s')
    return list(dict.fromkeys(k for _, r in rows for k in r)), rows, {}


def dataset_table(split):
    """ a `datasets` split as a table, with the names of its ClassLabel columns """
    names = {c: list(f.names) for c, f in split.features.items() if type(f).__name__ == 'ClassLabel'}
    # to_list reads the arrow columns in batches: row by row took 3.05 s for 200k rows, to_list 0.09 s
    return list(split.column_names), [(f'row {i}', r) for i, r in enumerate(split.to_list(), 1)], names


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError('reading this data needs Hugging Face datasets, which is not installed: '
                        'pip install datasets') from None
    datasets.disable_progress_bars()
    return datasets


# -----------------------------------------------------------------------------
# examples: (text, ..., label id)


def default_columns(path, columns):
    """ the XNLI release's columns for a .tsv, else premise / hypothesis, or GLUE's single sentence """
    if path.lower().endswith('.tsv'):
        return ['sentence1', 'sentence2'], 'gold_label'
    if 'sentence' in columns and 'premise' not in columns:
        return ['sentence'], 'label'
    return ['premise', 'hypothesis'], 'label'


def parse_label(value, names):
    """ a class id (a whole number, a string of one, a bool) or a label name -> the id; None if it is neither """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    v = str(value).strip().lower()
    if v in ('true', 'false'):
        return int(v == 'true')
    if v.lstrip('-').isdigit():
        return int(v)
    lowered = [n.lower() for n in names]
    return lowered.index(v) if v in lowered else None


def read_examples(path, language=None, text_columns=None, label_column=None, num_classes=None, table=None, names=None):
    """
    Examples: [(text, ..., label id)] of one file (or of `table`, already read, named by `path`), label names, columns.
    The label names: `names` when given (the train split's, for the other splits), else the ClassLabel's, else XNLI's
    for label words or 3 classes, else '0', '1', ... for num_classes (default: the largest id found + 1).
    With `language` and a language column, only the rows of that language are kept (the XNLI release holds 15).
    """
    columns, rows, class_label_names = table or read_table(path)
    default_texts, default_label = default_columns(path, columns)
    texts = list(text_columns or default_texts)
    if len(texts) == len(default_texts): # --premise_column / --hypothesis_column may name one of the two
        texts = [c or d for c, d in zip(texts, default_texts)]
    want = texts + [label_column or default_label]
    missing = [c for c in want if c not in columns]
    if missing:
        raise DataError(f'{path} has no column {", ".join(map(repr, missing))}; expected the text column(s) '
                        f'{want[:-1]} and the label column {want[-1]!r} (set --text_column and --label_column); found '
                        f'columns: {", ".join(map(repr, columns)) or "none (is the file empty?)"}')
    languages = {row.get('language') for _, row in rows} - {None}
    if language and languages:
        rows = [(where, row) for where, row in rows if row.get('language') == language]
        if not rows:
            raise DataError(f'{path} has no examples for language {language!r} (--language); languages found: '
                            f'{", ".join(sorted(languages))}')
    if not rows:
        raise DataError(f'{path} has no examples: it has no data rows')
    labels = [row.get(want[-1]) for _, row in rows]
    names = names or label_names(class_label_names.get(want[-1]), num_classes, labels)
    examples, empty = [], 0
    for (where, row), value in zip(rows, labels):
        label = parse_label(value, names)
        if label is None or not 0 <= label < len(names):
            unlabeled = ' (-1 marks an unlabeled example, as in GLUE test splits)' if label == -1 else ''
            raise DataError(f'{path} {where}: unknown label {value!r} in column {want[-1]!r}{unlabeled}; expected '
                            f'0 to {len(names) - 1} or {", ".join(names)} ({len(names)} classes, --num_classes)')
        texts = tuple(row.get(c) for c in want[:-1])
        empty += sum(t is None for t in texts)
        examples.append(tuple(t or '' for t in texts) + (label,))
    if empty:
        print(f'note: {path}: {empty} empty (None) text value(s), read as empty text')
    return Examples(examples, names, want[:-1], want[-1])


def label_names(class_label_names, num_classes, labels):
    """ the names reports use, for a split whose label values are `labels` """
    if class_label_names is not None:
        if num_classes is not None and num_classes != len(class_label_names):
            raise DataError(f'--num_classes {num_classes}, but the label column is a ClassLabel with '
                            f'{len(class_label_names)} classes: {", ".join(class_label_names)}')
        return list(class_label_names)
    if num_classes is None:
        words = any(str(v).strip().lower() in LABELS for v in labels)
        ids = [i for i in (parse_label(v, ()) for v in labels) if i is not None]
        num_classes = len(LABELS) if words or not ids else max(2, max(ids) + 1)
    return list(LABELS) if num_classes == len(LABELS) else [str(i) for i in range(num_classes)]


def unlabeled(table, label_column):
    """ a split whose labels are all -1: GLUE's test splits, which are scored on its server, not here """
    labels = [row.get(label_column or 'label') for _, row in table[1]]
    return bool(labels) and all(parse_label(v, ()) == -1 for v in labels)


# -----------------------------------------------------------------------------
# splits: train, valid, test


def load_splits(args):
    """ (train Examples, valid rows, test rows or None, sources: where each came from) for the data the flags name """
    if args.from_disk or args.parent_dataset:
        tables, origin = dataset_splits(args)
        pick = lambda names: next((n for n in names if n in tables), None)
        train_name, valid_name, test_name = pick(('train',)), pick(VALID_SPLITS), pick(('test',))
        if train_name is None:
            raise DataError(f'{origin} has no train split; found splits: {", ".join(tables) or "none"}')
        if test_name and unlabeled(tables[test_name], args.label_column):
            print(f'note: {origin} [{test_name}] is unlabeled (every label is -1, as in GLUE): it is not scored here')
            test_name = None
        language = args.language
        read = lambda name, names=None: read_examples(f'{origin} [{name}]', language, args.text_column,
                                                      args.label_column, args.num_classes, tables[name], names)
        where = {k: f'{origin} [{n}]' if n else None for k, n in (('train', train_name), ('valid', valid_name),
                                                                    ('test', test_name))}
    else:
        data_dir = args.data_dir or os.path.join('data', args.dataset)
        paths = {'train': args.train_file or os.path.join(data_dir, 'xnli.dev.tsv'), 'valid': args.valid_file,
                 'test': args.test_file or os.path.join(data_dir, 'xnli.test.tsv')}
        if not (args.train_file or os.path.isfile(paths['train']) or args.data_dir):
            raise DataError(f"no data for --dataset {args.dataset}: {paths['train']} does not exist. Local XNLI files go "
                            'in --data_dir (xnli.dev.tsv, xnli.test.tsv) or --train_file/--valid_file/--test_file; a '
                            'Hugging Face dataset is named with --parent_dataset (the fork\'s default was '
                            f'nyu-mll/glue: --parent_dataset nyu-mll/glue --dataset {args.dataset})')
        if not (args.test_file or os.path.isfile(paths['test'])):
            paths['test'] = None
        # the XNLI release holds 15 languages in one file: there --language (default hi) picks one
        language = args.language or ('hi' if paths['train'].lower().endswith('.tsv') else None)
        # local files are XNLI's 3 classes unless --num_classes says otherwise; `datasets` data tells its own
        classes = args.num_classes or len(LABELS)
        read = lambda path, names=None: read_examples(path, language, args.text_column, args.label_column,
                                                      classes, None, names)
        where = paths
        train_name, valid_name, test_name = paths['train'], paths['valid'], paths['test']
    examples = read(train_name)
    train = examples.rows
    if valid_name:
        valid = read(valid_name, examples.names).rows
    else:  # hold out 10% of the training source, shuffled with the seed so the split is the same on every run
        if len(train) < 2:
            raise DataError(f'{where["train"]} has {len(train)} example: too few to hold out a validation set')
        order = list(range(len(train)))
        random.Random(args.seed).shuffle(order)
        n_valid = max(1, len(train) // 10)
        valid, train = [train[i] for i in order[:n_valid]], [train[i] for i in order[n_valid:]]
        where['valid'] = f'10% of {where["train"]} (seed {args.seed})'
    test = read(test_name, examples.names).rows if test_name else None
    for name, rows in (('valid', valid), ('test', test)):
        if rows is not None and len(rows[0]) != len(train[0]):
            raise DataError(f'{where[name]} has {len(rows[0]) - 1} text column(s), {where["train"]} has '
                            f'{len(train[0]) - 1}: the splits must hold the same kind of examples')
    return examples._replace(rows=train), valid, test, {**where, 'language': language}


def dataset_splits(args, cache_flag='--hf_cache', folder_flags='--from_disk --parent_dataset DIR'):
    """ ({split name: table}, a description) of the `datasets` source the flags name (named as the caller's are) """
    datasets = import_datasets()
    if args.from_disk:
        if getattr(args, 'dataset_config', None):
            print(f'note: --dataset_config {args.dataset_config} is not used with --from_disk: a saved folder has no '
                  'subsets (name the subset\'s own folder)')
        path = args.parent_dataset or os.path.join(args.data_dir or 'datasets', args.dataset)
        if not os.path.isdir(path):
            raise DataError(f'--from_disk: {path} is not a directory; expected what Dataset(Dict).save_to_disk '
                            'wrote (name it with --parent_dataset, or it is --data_dir/--dataset, default datasets/<dataset>)')
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:  # datasets' own errors (no dataset_dict.json / state.json): its message, our file
            raise DataError(f'--from_disk: {path} could not be read by datasets.load_from_disk: {e}') from None
        origin = path
    else:
        parent, name = args.parent_dataset, None if args.no_subset else args.dataset
        if os.path.isdir(parent) and name and os.path.isdir(os.path.join(parent, name)):
            parent, name = os.path.join(parent, name), None  # a local copy: one folder per subset
        elif os.path.isdir(parent) and name:
            print(f'note: {parent} is a local directory with no subset folder {name!r}: it is read as a whole '
                  '(--no_subset says so)')
            name = None
        cache = args.hf_cache or ('cache' if os.path.isdir('cache') else None) # the fork's default: ./cache
        try:
            loaded = datasets.load_dataset(parent, name, cache_dir=cache)
        except Exception as e:  # offline hub names end here as ConnectionError; unknown names as FileNotFoundError
            hint = '' if os.path.isdir(parent) else (
                ' Offline, a hub dataset loads only from the datasets cache where it was downloaded before '
                f'({cache_flag} DIR, default ./cache when it exists, with HF_DATASETS_OFFLINE=1); or save it on a '
                f'machine that is online with save_to_disk and pass that directory with {folder_flags}')
            raise DataError(f'datasets could not load {parent!r}{f" (subset {name!r})" if name else ""}: {e}.{hint}') from None
        origin = parent + (f' ({name})' if name else '')
    splits = loaded if isinstance(loaded, dict) else {'train': loaded}
    return {k: dataset_table(v) for k, v in splits.items()}, origin


# -----------------------------------------------------------------------------
# tokenizer lookup, as the fork's finetune.py does it


def find_tokenizer(name, tokenizer_dir='tokenizers', flag='--tokenizer_name'):
    """ the tokenizer spec `flag` names: a path, a file in --tokenizer_dir, or 'gpt2' (tiktoken's); a file is a
    Hugging Face tokenizer.json, or the tokenizer.json of one of our checkpoints (a spec with its token_kind) """
    candidates = [name] + [os.path.join(tokenizer_dir, f) for f in (name, f'{name}.json', f'{name}-tokenizer.json',
                                                                       f'{name}-vocab.json')]
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path, encoding='utf-8') as f:
                    ours = json.load(f)
                if isinstance(ours, dict) and 'token_kind' in ours:
                    return ours, path
                return hf_spec_from_file(path), path
            except (TokenizerError, ValueError) as e:
                raise TokenizerError(f'{path} ({flag} {name}): {e}') from None
    if name == 'gpt2':
        return {'token_kind': 'gpt2'}, 'gpt2 (tiktoken)'
    raise TokenizerError(f'no tokenizer {name!r}: expected a Hugging Face tokenizer.json file at one of '
                         f'{", ".join(candidates)} ({flag}, --tokenizer_dir), or {flag} gpt2')
