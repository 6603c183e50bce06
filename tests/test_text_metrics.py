"""
core/text_metrics.py: ROUGE that tokenises every script (Devanagari, Tamil, Arabic, Cyrillic, IPA), the fork's
ASCII-only ROUGE reproduced exactly, Porter stemming for English only, and sacrebleu's corpus BLEU. Expected
values follow from the definitions (token overlaps counted by hand) or from rouge-score called directly.
"""

import pytest
from rouge_score import rouge_scorer, tokenizers

from core.text_metrics import ROUGE_KEYS, UnicodeTokenizer, bleu, rouge, rouge_for_language

# (summary, an unrelated summary in the same language)
SAME_LANGUAGE = {
    'hindi': ('राष्ट्रपति ने नई शिक्षा नीति की घोषणा की।', 'बारिश के कारण मुंबई में स्कूल बंद रहे'),
    'tamil': ('பிரதமர் புதிய கல்விக் கொள்கையை அறிவித்தார்.', 'சென்னையில் கனமழை காரணமாக பள்ளிகள் மூடப்பட்டன'),
    'urdu': ('وزیر اعظم نے نئی تعلیمی پالیسی کا اعلان کیا۔', 'کراچی میں شدید بارش کے باعث اسکول بند رہے'),
    'russian': ('Президент Объявил о новой Образовательной политике.', 'В Москве из-за сильного дождя закрыли школы'),
    'ipa': ('ðə prɛzɪdənt ənaʊnst ə nuː ɛdʒəkeɪʃən pɑləsi ɪn sprɪŋ', 'hɛvi reɪn kloʊzd skulz θruaʊt mʊmbaɪ'),
}
ENGLISH = [
    ('the cat sat on the mat', 'a cat was sitting on the mat'),
    ('police arrested two men after the robbery', 'two men were arrested by police following a robbery'),
    ('Stocks fell sharply on Monday, traders said.', 'shares dropped on monday'),
    ('the cats were running', 'the cat was runs'),  # scored differently stemmed: the fork's ROUGE stems
]


def tokenize(text, stem=False):
    return UnicodeTokenizer(stem).tokenize(text)


@pytest.mark.parametrize('language', SAME_LANGUAGE)
def test_identical_summary_scores_one_and_unrelated_below_a_tenth(language):
    summary, unrelated = SAME_LANGUAGE[language]
    assert rouge([summary], [summary]) == dict.fromkeys(ROUGE_KEYS, 1.0)
    assert all(score < 0.1 for score in rouge([unrelated], [summary]).values())


@pytest.mark.parametrize('language', ['hindi', 'russian'])
def test_ascii_tokenizer_scores_identical_non_latin_summary_zero_as_the_fork_reports(language):
    summary = SAME_LANGUAGE[language][0]
    assert rouge([summary], [summary], tokenizer='ascii') == dict.fromkeys(ROUGE_KEYS, 0.0)


def test_ascii_tokenizer_scores_ipa_on_its_ascii_letters_only():
    # 'ðə kæt' and 'θə kʌt' share no word, but keep the same ASCII letters: k, t
    assert rouge(['ðə kæt'], ['θə kʌt'], tokenizer='ascii') == dict.fromkeys(ROUGE_KEYS, 1.0)
    assert rouge(['ðə kæt'], ['θə kʌt']) == dict.fromkeys(ROUGE_KEYS, 0.0)


def test_marks_stay_inside_their_word():
    # vowel signs (Mc), viramas / pulli (Mn) and IPA's modifier letters (Lm) do not split a word
    for word in ('राष्ट्रपति', 'शिक्षा', 'கொள்கையை', 'பிரதமர்', 'پالیسی', 'ʃiːp', 'tʰɪŋ', 'nĩ̞'):
        assert tokenize(word) == [word]


def test_punctuation_separates_words():
    assert tokenize('नीति।घोषणा') == ['नीति', 'घोषणा']
    assert tokenize('کیا۔اعلان،پالیسی') == ['کیا', 'اعلان', 'پالیسی']
    assert tokenize('«Москва»,“Kazan”') == ['москва', 'kazan']
    assert tokenize("a,b'c\"d 42") == ['a', 'b', 'c', 'd', '42']


def test_casefold_nfc_and_invisible_joiners():
    assert tokenize('ПОЛИТИКА Straße') == ['политика', 'strasse']
    assert tokenize('café') == tokenize('cafe\u0301') == ['café']  # precomposed é == e + combining acute
    assert tokenize('\u095b') == tokenize('\u091c\u093c')  # Devanagari za: precomposed == ja + nukta
    assert tokenize('می\u200cخواهم') == ['میخواهم']  # a zero-width non-joiner does not split the word


def test_ascii_tokenizer_is_rouge_score_with_stemmer():
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for prediction, reference in ENGLISH]
    expected = {key: sum(s[key].fmeasure for s in scores) / len(scores) for key in ROUGE_KEYS}
    predictions, references = zip(*ENGLISH)
    assert rouge(list(predictions), list(references), tokenizer='ascii') == pytest.approx(expected, abs=1e-12)


def test_unicode_tokenizer_with_stem_matches_rouge_score_on_english_words():
    default = tokenizers.DefaultTokenizer(use_stemmer=True)
    for prediction, reference in ENGLISH:
        for text in (prediction, reference):
            assert tokenize(text, stem=True) == default.tokenize(text)


def test_english_stemming():
    # Porter: cats -> cat, running / runs -> run; 'were' is left alone; 'was' has 3 characters, so it is not stemmed
    assert tokenize('the cats were running was', stem=True) == ['the', 'cat', 'were', 'run', 'was']
    # unstemmed the pair shares only 'the' (1 of 4 words each side); stemmed, 'the', 'cat' and 'run' (3 of 4)
    assert rouge(['the cats were running'], ['the cat was runs'])['rouge1'] == pytest.approx(1 / 4)
    assert rouge(['the cats were running'], ['the cat was runs'], stem=True)['rouge1'] == pytest.approx(3 / 4)
    assert tokenize('ðings niños', stem=True) == ['ðings', 'niños']  # no Porter for non-ASCII words


def test_stemming_for_english_only():
    assert rouge_for_language(['cats'], ['cat'], 'english')['rouge1'] == 1.0
    assert rouge_for_language(['cats'], ['cat'], 'spanish')['rouge1'] == 0.0
    assert rouge_for_language(['cats'], ['cat'], 'english', ipa=True)['rouge1'] == 0.0  # IPA words are not English


def test_rouge2_and_rougeL_see_word_order():
    # reference bigrams: AB BC CD; the prediction's: CD DA AB, so 2 of 3 shared; longest common subsequence AB: 2 of 4
    reference = 'राष्ट्रपति नई शिक्षा नीति'
    prediction = 'शिक्षा नीति राष्ट्रपति नई'
    assert rouge([prediction], [reference]) == pytest.approx({'rouge1': 1.0, 'rouge2': 2 / 3, 'rougeL': 2 / 4})


def test_rouge_is_the_mean_over_pairs():
    # an identical pair (1.0) and a pair with no shared word (0.0)
    summary, unrelated = SAME_LANGUAGE['tamil']
    assert rouge([summary, unrelated], [summary, summary]) == dict.fromkeys(ROUGE_KEYS, 0.5)


def test_bleu():
    summaries = [SAME_LANGUAGE[language][0] for language in SAME_LANGUAGE] + [reference for _, reference in ENGLISH]
    assert bleu(summaries, summaries) == pytest.approx(100.0)  # exp of a sum of logs: not exactly 100
    unrelated = [SAME_LANGUAGE[language][1] for language in SAME_LANGUAGE]
    assert bleu(unrelated, summaries[:len(unrelated)]) < 5


@pytest.mark.parametrize('score', [rouge, bleu])
def test_wrong_input(score):
    with pytest.raises(ValueError, match=r'^2 predictions but 1 references: '):
        score(['a b', 'c d'], ['a b'])
    with pytest.raises(ValueError, match='empty'):
        score([], [])
    with pytest.raises(ValueError, match='not a single string'):
        score('a b', 'a b')


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match=r"tokenizer must be 'unicode' or 'ascii', not 'nltk'"):
        rouge(['a'], ['a'], tokenizer='nltk')
