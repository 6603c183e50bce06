"""
Synthetic XLSum data for the summarisation tests and examples, generated into a directory (no data files in the
repo): articles in six languages (english, spanish, hindi, russian, tamil, urdu) with the columns of the users'
mugezhang/xlsum_6lang_multirepr, each text in three representations

  text, summary                               the real script (Latin, Latin with accents, Devanagari, Cyrillic,
                                              Tamil, Arabic-script Urdu)
  text_ipa_stripped, summary_ipa_stripped     an IPA-looking rendering by a small per-language letter table
                                              (deterministic, not linguistically real)
  text_romanized, summary_romanized           ASCII: english / spanish with accents stripped, the others folded
                                              from their IPA
  id, url                                     XLSum-like, e.g. india-48213370, https://www.bbc.com/hindi/india-48213370

and the learnable rule: an article is 2-4 sentences of a subject, a verb and an object (SVO in english, spanish and
russian, SOV in hindi, tamil and urdu) from per-language word lists of 10 words each, and its summary is the
article's first sentence. A tiny model learns to copy the first sentence and stop; a language's sentences use that
language's words only.
The default train sizes are unbalanced (english 30 ... urdu 6) so that balanced mixing (upsampling to the largest
language) and natural mixing give different streams.
"""

import random
import unicodedata
from pathlib import Path

from data.synthetic_xnli import train_tokenizer

LANGUAGES = ('english', 'spanish', 'hindi', 'russian', 'tamil', 'urdu')
TRAIN_SIZES = {'english': 30, 'spanish': 24, 'hindi': 18, 'russian': 12, 'tamil': 12, 'urdu': 6}
SPLITS = ('train', 'validation', 'test')
COLUMNS = ['id', 'url', 'text', 'summary', 'text_ipa_stripped', 'summary_ipa_stripped', 'text_romanized',
           'summary_romanized']

# (subjects, objects, verbs, sentence template); subjects all take the same verb form, so no agreement is needed
WORDS = {
    'english': (['The farmer', 'The teacher', 'The doctor', 'The boy', 'The king', 'The minister', 'The driver',
                 'The singer', 'The writer', 'The soldier'],
                ['the bread', 'the book', 'the car', 'the house', 'the letter', 'the water', 'the phone', 'the door',
                 'the box', 'the map'],
                ['sells', 'buys', 'sees', 'finds', 'wants', 'carries', 'cleans', 'opens', 'brings', 'makes'],
                '{s} {v} {o}.'),
    'spanish': (['El granjero', 'El maestro', 'El médico', 'El niño', 'El rey', 'El ministro', 'El conductor',
                 'El cantante', 'El escritor', 'El policía'],
                ['el pan', 'el libro', 'el coche', 'la casa', 'la carta', 'el agua', 'el teléfono', 'la puerta',
                 'la caja', 'el mapa'],
                ['vende', 'compra', 've', 'encuentra', 'quiere', 'lleva', 'limpia', 'abre', 'trae', 'busca'],
                '{s} {v} {o}.'),
    'hindi': (['किसान', 'शिक्षक', 'डॉक्टर', 'लड़का', 'राजा', 'मंत्री', 'ड्राइवर', 'गायक', 'लेखक', 'सिपाही'],
              ['रोटी', 'किताब', 'गाड़ी', 'घर', 'चिट्ठी', 'पानी', 'मोबाइल', 'दरवाजा', 'डिब्बा', 'नक्शा'],
              ['बेचता है', 'खरीदता है', 'देखता है', 'ढूंढता है', 'चाहता है', 'उठाता है', 'साफ करता है', 'खोलता है',
               'लाता है', 'बनाता है'],
              '{s} {o} {v}।'),
    'russian': (['Фермер', 'Учитель', 'Врач', 'Мальчик', 'Король', 'Министр', 'Водитель', 'Певец', 'Писатель',
                 'Солдат'],
                ['хлеб', 'книгу', 'машину', 'дом', 'письмо', 'воду', 'телефон', 'дверь', 'коробку', 'карту'],
                ['продаёт', 'покупает', 'видит', 'находит', 'хочет', 'несёт', 'моет', 'открывает', 'приносит',
                 'ищет'],
                '{s} {v} {o}.'),
    'tamil': (['விவசாயி', 'ஆசிரியர்', 'மருத்துவர்', 'அமைச்சர்', 'ஓட்டுநர்', 'பாடகர்', 'எழுத்தாளர்', 'காவலர்',
               'தலைவர்', 'மாணவர்'],
              ['ரொட்டியை', 'புத்தகத்தை', 'காரை', 'வீட்டை', 'கடிதத்தை', 'தண்ணீரை', 'தொலைபேசியை', 'கதவை',
               'பெட்டியை', 'வரைபடத்தை'],
              ['விற்கிறார்', 'வாங்குகிறார்', 'பார்க்கிறார்', 'கண்டுபிடிக்கிறார்', 'விரும்புகிறார்', 'சுமக்கிறார்',
               'சுத்தம் செய்கிறார்', 'திறக்கிறார்', 'கொண்டுவருகிறார்', 'தேடுகிறார்'],
              '{s} {o} {v}.'),
    'urdu': (['کسان', 'استاد', 'ڈاکٹر', 'لڑکا', 'بادشاہ', 'وزیر', 'ڈرائیور', 'گلوکار', 'مصنف', 'سپاہی'],
             ['روٹی', 'کتاب', 'گاڑی', 'گھر', 'خط', 'پانی', 'موبائل', 'دروازہ', 'ڈبہ', 'نقشہ'],
             ['بیچتا ہے', 'خریدتا ہے', 'دیکھتا ہے', 'ڈھونڈتا ہے', 'چاہتا ہے', 'اٹھاتا ہے', 'صاف کرتا ہے',
              'کھولتا ہے', 'لاتا ہے', 'بناتا ہے'],
             '{s} {o} {v}۔'),
}

# (BBC service in the url, section of the id), as XLSum's urls have them
SERVICES = {'english': ('news', 'world'), 'spanish': ('mundo', 'noticias'), 'hindi': ('hindi', 'india'),
            'russian': ('russian', 'news'), 'tamil': ('tamil', 'india'), 'urdu': ('urdu', 'pakistan')}


def table(letters, sounds):
    """ {letter: sound} from a string of letters and their space-separated sounds ('_' for silent) """
    sounds = sounds.split()
    assert len(letters) == len(sounds), (letters, sounds)
    return {c: '' if s == '_' else s for c, s in zip(letters, sounds)}


HI_CONSONANTS = 'कखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह'
TA_CONSONANTS = 'கஙசஞடணதநபமயரலவழளறனஜஷஸஹ'
# (letter table, consonants that carry an inherent vowel, that vowel); digraphs are matched before single letters
IPA = {
    'english': ({**table('abcdefghijklmnopqrstuvwxyz', 'æ b k d ɛ f ɡ h ɪ dʒ k l m n ɒ p k ɹ s t ʌ v w ks j z'),
                 'th': 'ð', 'sh': 'ʃ', 'ch': 'tʃ', 'ng': 'ŋ', 'ee': 'iː', 'ea': 'iː', 'oo': 'uː', 'ck': 'k',
                 'ou': 'aʊ', 'er': 'ə', 'ar': 'ɑː', 'ph': 'f'}, '', ''),
    'spanish': ({**table('abcdefghijklmnñopqrstuvwxyzáéíóú',
                         'a b k ð e f ɡ _ i x k l m n ɲ o p k ɾ s t u β w ks ʝ θ a e i o u'),
                 'ch': 'tʃ', 'll': 'ʝ', 'rr': 'r', 'qu': 'k'}, '', ''),
    'hindi': ({**table(HI_CONSONANTS, 'k kʰ ɡ ɡʱ ŋ tʃ tʃʰ dʒ dʒʱ ɲ ʈ ʈʰ ɖ ɖʱ ɳ t tʰ d dʱ n p f b bʱ m j ɾ l ʋ ʃ ʂ s ɦ'),
               **table('अआइईउऊएऐओऔऑ', 'ə aː ɪ iː ʊ uː eː ɛː oː ɔː ɔ'),
               **table('ािीुूेैोौॉ्ंँः़', 'aː ɪ iː ʊ uː eː ɛː oː ɔː ɔ _ ŋ ̃ h _'), '।': '.', 'ड़': 'ɽ', 'ढ़': 'ɽʱ'},
              HI_CONSONANTS, 'ə'),
    'russian': (table('абвгдеёжзийклмнопрстуфхцчшщъыьэюя',
                      'a b v ɡ d je jo ʐ z i j k l m n o p r s t u f x ts tɕ ʂ ɕː _ ɨ ʲ ɛ ju ja'), '', ''),
    'tamil': ({**table(TA_CONSONANTS, 'k ŋ tʃ ɲ ʈ ɳ t n p m j ɾ l ʋ ɻ ɭ r n dʒ ʂ s h'),
               **table('அஆஇஈஉஊஎஏஐஒஓஔ', 'a aː i iː u uː e eː aj o oː aw'),
               **table('ாிீுூெேைொோௌ்', 'aː i iː u uː e eː aj o oː aw _')}, TA_CONSONANTS, 'a'),
    'urdu': (table('اآبپتٹثجچحخدڈذرڑزژسشصضطظعغفقکگلمنںوہھءئیےۃ۔،',
                   'aː aː b p t ʈ s dʒ tʃ ħ x d ɖ z ɾ ɽ z ʒ s ʃ s z t z ʔ ɣ f q k ɡ l m n ̃ oː ɦ ʰ ʔ j iː eː t . ,'),
             '', ''),
}
# IPA symbols to ASCII, for the romanisation of the non-Latin scripts
ASCII = {**table('əɪʊːʃʈɖɳŋɾʰʱɡɛɔæθðʒxɲʂɭɻʋjɽɦʔɣʝɒʌɹɨʲɐβħɕ\u0303',
                 'a i u _ sh t d n ng r h h g e o a th dh zh kh ny sh l zh v y r h _ gh y o u r y _ a b h sh n'),
         'tʃ': 'ch', 'dʒ': 'j', 'tɕ': 'ch', 'ɑ': 'a'}


def convert(text, letters, consonants='', vowel=''):
    """ text letter by letter through a table (longest match first); a consonant before another letter gets the
    script's inherent vowel, as Devanagari and Tamil write it """
    out, i = [], 0
    while i < len(text):
        key = text[i:i + 2] if text[i:i + 2] in letters else text[i]
        out.append(letters.get(key, key))
        i += len(key)
        # no vowel sign or virama follows (those are marks): the consonant is pronounced with the inherent vowel
        if key in consonants and i < len(text) and unicodedata.category(text[i]).startswith('L'):
            out.append(vowel)
    return ''.join(out)


def to_ipa(language, text):
    letters, consonants, vowel = IPA[language]
    return convert(unicodedata.normalize('NFC', text).lower(), letters, consonants, vowel)


def romanize(language, text):
    if language in ('english', 'spanish'):
        # drop the combining accents NFD splits off: é -> e, ñ -> n
        return ''.join(c for c in unicodedata.normalize('NFD', text) if not unicodedata.combining(c))
    return convert(to_ipa(language, text), ASCII)


def xlsum_sentence(language, rng):
    subjects, objects, verbs, template = WORDS[language]
    return template.format(s=rng.choice(subjects), o=rng.choice(objects), v=rng.choice(verbs))


def xlsum_examples(language, split, n, seed):
    """ n rows of one language and split: an article of 2-4 sentences, its first sentence as the summary """
    # a string seed is hashed with sha512, so the rows are the same in every process
    rng = random.Random(f'{seed}-{language}-{split}')
    service, section = SERVICES[language]
    rows = []
    for _ in range(n):
        sentences = [xlsum_sentence(language, rng) for _ in range(rng.randint(2, 4))]
        text, summary = ' '.join(sentences), sentences[0]
        id_ = f'{section}-{rng.randrange(10 ** 7, 10 ** 8)}'
        rows.append({'id': id_, 'url': f'https://www.bbc.com/{service}/{id_}', 'text': text, 'summary': summary,
                     'text_ipa_stripped': to_ipa(language, text), 'summary_ipa_stripped': to_ipa(language, summary),
                     'text_romanized': romanize(language, text), 'summary_romanized': romanize(language, summary)})
    return rows


def make_xlsum_data(root, seed=0, train_sizes=None, valid=6, test=6):
    """
    In root:
      xlsum/<language>/{train,validation,test}.parquet  a local dataset folder per language (load_dataset reads
                                                       the splits by file name)
      xlsum-disk/                                      a DatasetDict.save_to_disk of all languages, with a
                                                       `language` column
      xlsum-tokenizer.json                             a byte-level BPE tokenizer on all representations
    train_sizes: None (TRAIN_SIZES, unbalanced), an int for every language, or {language: rows} (only those
    languages); a split of 0 rows is left out. Returns {'xlsum', 'disk', 'tokenizer': path}.
    """
    import datasets
    datasets.disable_progress_bars()
    root = Path(root)
    features = datasets.Features({c: datasets.Value('string') for c in COLUMNS})
    train_sizes = TRAIN_SIZES if train_sizes is None else train_sizes
    if isinstance(train_sizes, int):
        train_sizes = dict.fromkeys(LANGUAGES, train_sizes)
    splits = {name: [] for name in SPLITS}
    for language, n_train in train_sizes.items():
        folder = root / 'xlsum' / language
        folder.mkdir(parents=True, exist_ok=True)
        for name, n in zip(SPLITS, (n_train, valid, test)):
            rows = xlsum_examples(language, name, n, seed)
            # load_dataset fails on a split of no rows ('corresponds to no data'): such a split gets no file
            if rows:
                datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / f'{name}.parquet'))
            splits[name] += [{'language': language, **row} for row in rows]
    features = datasets.Features({'language': datasets.Value('string'), **features})
    # load_from_disk fails on a saved split of no rows too
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows, features=features)
                          for name, rows in splits.items() if rows}).save_to_disk(str(root / 'xlsum-disk'))
    texts = [row[c] for rows in splits.values() for row in rows for c in COLUMNS[2:]]
    tokenizer = train_tokenizer(texts, root / 'xlsum-tokenizer.json', vocab_size=1500)
    return {'xlsum': root / 'xlsum', 'disk': root / 'xlsum-disk', 'tokenizer': tokenizer}
