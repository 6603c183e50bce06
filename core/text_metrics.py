"""
Scores for generated summaries (XL-Sum in english, spanish, hindi, russian, tamil, urdu; as text, IPA or romanised):
ROUGE-1/2/L and corpus BLEU, offline.

rouge() tokenises every script by default: rouge-score's own tokenizer (the one Hugging Face evaluate's "rouge"
uses) keeps only [a-z0-9], so a Hindi, Tamil, Urdu or Russian summary identical to its reference scores 0.0 there,
and IPA is scored on its ASCII letters alone. tokenizer='ascii' gives that number anyway, to compare with the fork.
"""

import itertools
import unicodedata

import sacrebleu

ROUGE_KEYS = ('rouge1', 'rouge2', 'rougeL')
STEMMED_LANGUAGES = ('english',)  # rouge-score's only stemmer is Porter's, which is for English
# invisible format characters that sit inside words (soft hyphen, ZWNJ, ZWJ, LRM, RLM, word joiner, BOM): dropped,
# so that they neither split a word nor make it differ from the same word without them
INVISIBLE = dict.fromkeys(map(ord, '\u00ad\u200c\u200d\u200e\u200f\u2060\ufeff'))


def is_word_char(ch):
    # letters (Lm too: IPA's ː ˈ ʰ), combining marks (vowel signs, viramas, diacritics) and digits, of any script
    return unicodedata.category(ch)[0] in 'LMN'


class UnicodeTokenizer:
    """ for rouge_score's RougeScorer(tokenizer=...): casefolded maximal runs of letters, marks and digits """

    def __init__(self, stem=False):
        self.stemmer = None
        if stem:
            from nltk.stem import porter  # the Porter stemmer rouge-score's default tokenizer uses
            self.stemmer = porter.PorterStemmer()

    def tokenize(self, text):
        # NFC first, so a precomposed é and e + combining acute are the same token
        text = unicodedata.normalize('NFC', text).casefold().translate(INVISIBLE)
        tokens = [''.join(run) for word, run in itertools.groupby(text, is_word_char) if word]
        if self.stemmer:
            # as rouge-score: stem only tokens longer than 3 characters; and only English-looking (ASCII) ones
            tokens = [self.stemmer.stem(t) if len(t) > 3 and t.isascii() and t.isalpha() else t for t in tokens]
        return tokens


def check_pairs(predictions, references):
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references must be lists of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: "
                         f"they must pair up one to one")
    if not predictions:
        raise ValueError("no predictions to score: predictions and references are empty")


def rouge(predictions, references, tokenizer='unicode', stem=False):
    """
    {'rouge1', 'rouge2', 'rougeL'}: the mean over the pairs of rouge-score's F-measure (no bootstrap resampling).
    tokenizer='unicode': UnicodeTokenizer(stem); 'ascii': rouge-score's default tokenizer with use_stemmer=True,
    the fork's per-pair scores (evaluate.load("rouge")), and `stem` is ignored. evaluate's default aggregate, the
    median of bootstrap means, lies close to this mean but is random; use_aggregator=False gives the pairs' scores.
    """
    from rouge_score import rouge_scorer  # imports nltk: about a second
    check_pairs(predictions, references)
    if tokenizer == 'ascii':
        scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    elif tokenizer == 'unicode':
        scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), tokenizer=UnicodeTokenizer(stem))
    else:
        raise ValueError(f"tokenizer must be 'unicode' or 'ascii', not {tokenizer!r}")
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    return {key: total / len(predictions) for key, total in totals.items()}


def rouge_for_language(predictions, references, language, tokenizer='unicode', ipa=False):
    """ rouge() with Porter stemming for English words only: not for IPA, whose ASCII-only words are not English """
    return rouge(predictions, references, tokenizer, stem=language.casefold() in STEMMED_LANGUAGES and not ipa)


def bleu(predictions, references):
    """ sacrebleu's corpus BLEU (default 13a tokenisation), one reference per prediction: the fork's number """
    check_pairs(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
