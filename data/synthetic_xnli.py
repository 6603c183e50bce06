"""
Synthetic XNLI data for the fine-tuning tests, the benchmarks and the README's examples, generated into a
directory (no data files in the repo): Hindi sentences from templates with a learnable rule, written as the XNLI 1.0
release's TSV (with rows of other languages that must be filtered out), and a small byte-level BPE tokenizer trained
on that text.

  entailment     the hypothesis is the premise's own sentence
  contradiction  the premise's sentence with नहीं inserted before the verb
  neutral        a different sentence
(A tiny random-weight model learns this to ~0.8 test accuracy in about a hundred steps: contradiction is easy,
entailment vs neutral needs the hypothesis compared with the premise.)
"""

import csv
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# (subject, verb ending: m = masculine singular, f = feminine singular, p = plural / honorific)
SUBJECTS = [('राम', 'm'), ('सीता', 'f'), ('बच्चे', 'p'), ('शिक्षक', 'p'), ('मोहन', 'm'), ('गीता', 'f'),
            ('किसान', 'p'), ('मेरी बहन', 'f'), ('लड़का', 'm'), ('दादी', 'f'), ('डॉक्टर', 'p'), ('अमित', 'm')]
# (object or place, verb stem)
PREDICATES = [('खाना', 'खा'), ('स्कूल', 'जा'), ('किताब', 'पढ़'), ('गाना', 'गा'), ('पानी', 'पी'), ('चिट्ठी', 'लिख'),
              ('क्रिकेट', 'खेल'), ('चाय', 'बना'), ('बाज़ार', 'जा'), ('घर की सफ़ाई', 'कर'), ('फल', 'बेच'),
              ('हिंदी', 'सीख')]
ENDINGS = {'m': 'ता है', 'f': 'ती है', 'p': 'ते हैं'}
LABELS = ('entailment', 'neutral', 'contradiction')
ENGLISH = ['The man eats food.', 'Children go to "school".', 'She reads a book.', 'It is not raining.']

# the columns of xnli.dev.tsv / xnli.test.tsv in the XNLI 1.0 release, in order
XNLI_COLUMNS = ['language', 'gold_label', 'sentence1_binary_parse', 'sentence2_binary_parse', 'sentence1_parse',
                'sentence2_parse', 'sentence1', 'sentence2', 'promptID', 'pairID', 'genre', 'label1', 'label2',
                'label3', 'label4', 'label5', 'sentence1_tokenized', 'sentence2_tokenized', 'match']


def sentence(s, p, negated=False):
    (subject, form), (obj, stem) = SUBJECTS[s], PREDICATES[p]
    return f"{subject} {obj} {'नहीं ' if negated else ''}{stem}{ENDINGS[form]}।"


def make_examples(n, seed):
    """ n balanced Hindi (premise, hypothesis, label id) triples """
    rng = random.Random(seed)
    pairs = [(s, p) for s in range(len(SUBJECTS)) for p in range(len(PREDICATES))]
    out = []
    for i in range(n):
        label = i % 3
        a, c = rng.sample(pairs, 2)
        hypothesis = {0: sentence(*a), 1: sentence(*c), 2: sentence(*a, negated=True)}[label]
        out.append((sentence(*a), hypothesis, label))
    rng.shuffle(out)
    return out


def write_xnli_tsv(path, examples, other_languages=('en', 'fr'), n_other=30, seed=0):
    """ an XNLI 1.0 release TSV: the Hindi examples plus rows of other languages (which the reader must drop) """
    rng = random.Random(seed)
    rows = [('hi', p, h, LABELS[y]) for p, h, y in examples]
    rows += [(rng.choice(other_languages), rng.choice(ENGLISH), rng.choice(ENGLISH), rng.choice(LABELS))
             for _ in range(n_other)]
    rng.shuffle(rows)
    with open(path, 'w', encoding='utf-8', newline='') as f:
        w = csv.writer(f, delimiter='\t', quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None, lineterminator='\n')
        w.writerow(XNLI_COLUMNS)
        for i, (lang, p, h, gold) in enumerate(rows):
            record = dict(language=lang, gold_label=gold, sentence1=p, sentence2=h, promptID=i, pairID=i,
                          genre='fiction', label1=gold, sentence1_tokenized=p, sentence2_tokenized=h, match='True')
            w.writerow([record.get(c, '') for c in XNLI_COLUMNS])
    return path


def train_tokenizer(texts, path, vocab_size=500):
    """ a byte-level BPE tokenizer like the users' bpe-hin-urd-owt-tokenizer.json; <|endoftext|> gets id 0 """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


def make_xnli_data(root, n_dev=1200, n_test=300, seed=0):
    """ root/xnli/{xnli.dev.tsv, xnli.test.tsv} and root/tokenizer.json; returns (data_dir, tokenizer path) """
    data_dir = root / 'xnli'
    data_dir.mkdir(parents=True, exist_ok=True)
    dev, test = make_examples(n_dev, seed), make_examples(n_test, seed + 1)
    write_xnli_tsv(data_dir / 'xnli.dev.tsv', dev, seed=seed)
    write_xnli_tsv(data_dir / 'xnli.test.tsv', test, seed=seed + 1)
    texts = [t for p, h, _ in dev for t in (p, h)] + ENGLISH
    return data_dir, train_tokenizer(texts, root / 'tokenizer.json')


def round_up(n, multiple=128):
    return -(-n // multiple) * multiple


def make_hf_datasets(root, n_train=240, n_valid=60, n_test=90, seed=0):
    """
    The same Hindi examples as Hugging Face `datasets` data, made by `datasets` itself, in root/hf/:
      xnli-hi/        a local dataset folder: {train,validation,test}.parquet (premise, hypothesis, label as int)
      xnli-hi-disk/   a DatasetDict.save_to_disk directory whose label column is a ClassLabel with XNLI's names
      negation/       a single-text binary task: sentence, label (1 when it holds नहीं), as parquet files
    Returns root/hf.
    """
    import datasets
    datasets.disable_progress_bars()
    out = root / 'hf'
    splits = {'train': make_examples(n_train, seed), 'validation': make_examples(n_valid, seed + 1),
              'test': make_examples(n_test, seed + 2)}
    features = datasets.Features({'premise': datasets.Value('string'), 'hypothesis': datasets.Value('string'),
                                  'label': datasets.ClassLabel(names=list(LABELS))})
    for folder in ('xnli-hi', 'negation'):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        columns = {'premise': [p for p, _, _ in examples], 'hypothesis': [h for _, h, _ in examples],
                   'label': [y for _, _, y in examples]}
        datasets.Dataset.from_dict(columns).to_parquet(str(out / 'xnli-hi' / f'{name}.parquet'))
        sentences = [h for _, h, _ in examples]
        datasets.Dataset.from_dict({'sentence': sentences, 'label': [int('नहीं' in s) for s in sentences]}).to_parquet(
            str(out / 'negation' / f'{name}.parquet'))
    datasets.DatasetDict({name: datasets.Dataset.from_dict(
        {'premise': [p for p, _, _ in ex], 'hypothesis': [h for _, h, _ in ex], 'label': [y for _, _, y in ex]},
        features=features) for name, ex in splits.items()}).save_to_disk(str(out / 'xnli-hi-disk'))
    return out
