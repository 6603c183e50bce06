"""
Bad input to the command-line tools, as a user would type it: each case runs the script in a fresh directory and
expects exit code 1, no traceback, and a last paragraph that names the offending value or file.

CASES holds one list per script of (case id, build, expected text): build(tmp_path) writes the files the case needs
and returns the arguments. To cover another script, add its list (see the builders below for files to reuse).
A tool with a main function answers in this process (tests/helpers.run_in_process); the first case of each tool, the
top-level scripts (train.py and sample.py: their errors end through sys.excepthook) and the cases that depend on
variables libraries read when imported run as real processes.
"""

import json

import pytest
import torch

from core.tokenizer import hf_spec_from_file, load_tokenizer
from load_checkpoint_helper import make_random_checkpoint
from core.checkpoint import read_checkpoint, save_bundle
from model import GPT, GPTConfig
from tests.helpers import run_in_process, run_script
from data.synthetic_xnli import make_hf_datasets, make_xnli_data, round_up

# ----------------------------------------------------------------------------- files the cases use


def file(d, name, data='hello world\n'):
    """ a file of text or bytes; returns its name (the cases run in d) """
    (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return name


def folder(d, name='adir'):
    (d / name).mkdir()
    return name


def modded(d, name='tiny.pt', **kw):
    """ a valid small-layout modded-nanogpt checkpoint: 8 layers, dim 64, 2 heads (not in the known-heads table) """
    make_random_checkpoint(d / name, **kw)
    return name


def truncated(d, name='cut.pt'):
    data = (d / modded(d, 'whole.pt')).read_bytes()
    return file(d, name, data[:len(data) // 2])


def nanogpt_state_dict(d, name='gpt.pt'):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16))
    torch.save(model.state_dict(), d / name)
    return name


class Payload:
    # what a malicious checkpoint carries: unpickling it would call print (here harmless); it must never load
    def __reduce__(self):
        return print, ('this ran while loading',)


def pickled_class(d, name='evil.pt'):
    torch.save({'model': {}, 'step': Payload()}, d / name)
    return name


def missing_tensor(d, name='hole.pt'):
    checkpoint = torch.load(d / modded(d, 'whole.pt'), weights_only=True)
    del checkpoint['model']['_orig_mod.blocks.3.mlp.c_fc.weight']
    torch.save(checkpoint, d / name)
    return name


def xnli(d):
    """ tiny XNLI-format data, its tokenizer and a checkpoint that fits them: the arguments of a run that works """
    _, tokenizer = make_xnli_data(d, n_dev=30, n_test=9)
    modded(d, vocab_size=round_up(load_tokenizer(hf_spec_from_file(tokenizer)).vocab_size))
    # --max_steps 1: should a case stop failing, it ends quickly (and the test says so)
    return ['--data_dir', 'xnli', '--pretrained_ckpt_path', 'tiny.pt', '--tokenizer_name', 'tokenizer.json',
            '--n_head', '2', '--device', 'cpu', '--max_steps', '1', '--out_dir', 'out']


def bundle(d, name='b', bias=False, **kw):
    """ a tiny GPT bundle (2 layers, n_embd 16, the 96 printable characters) saved as train.py saves one """
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=96, bias=bias))
    model.tokenizer_spec = {'token_kind': 'char', 'chars': [chr(32 + i) for i in range(95)] + ['\n']}
    save_bundle(d / name, model, 3, None, run_config={'dataset': 'pydocs_char'}, **kw)
    return name


def legacy(d, name='final.pt'):
    """ a single-file checkpoint as an older version saved one (weights, model_args, step) """
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16))
    torch.save({'model': model.state_dict(), 'model_args': dict(n_layer=1, n_head=1, n_embd=8, block_size=8,
                                                                 vocab_size=16), 'iter_num': 1}, d / name)
    return name


def hf_dir(d, name='hf'):
    """ a Hugging Face GPT-2 directory of the tiny bundle's 96-token model: it stores no vocabulary """
    from core.hf import export_hf
    export_hf(read_checkpoint(d / bundle(d, 'biased', bias=True)).build_model()[0], d / name)
    return name


def cut_weights(d, directory, name):
    """ directory/name cut to half its bytes; returns the directory """
    data = (d / directory / name).read_bytes()
    (d / directory / name).write_bytes(data[:len(data) // 2])
    return directory


def edited(d, name, file_name, **fields):
    """ a bundle whose JSON file_name was edited by hand: fields replaced """
    path = d / bundle(d, name) / file_name
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return name


def hub(d, *more):
    """ a local dataset folder as --parent_dataset, the fork's way: hf/xnli-hi of data/synthetic_xnli.py """
    make_hf_datasets(d, 30, 9, 9)
    return ['--parent_dataset', 'hf/xnli-hi', '--no_subset', *more]


def empty_parquet(d):
    import datasets
    datasets.Dataset.from_dict({'premise': [], 'hypothesis': [], 'label': []}).to_parquet(str(d / 'empty.parquet'))
    return 'empty.parquet'


def nli_file(d, name, text):
    return ['--train_file', file(d, name, text)]

# ----------------------------------------------------------------------------- the table


CASES = {
    'test_checkpoint_loading.py': [
        ('text file', lambda d: [file(d, 'notes.txt'), '--n_head', '2'],
         "notes.txt is not a PyTorch checkpoint: expected a .pt file"),
        ('empty file', lambda d: [file(d, 'empty.pt', b''), '--n_head', '2'], 'empty.pt is empty (0 bytes)'),
        ('directory', lambda d: [folder(d), '--n_head', '2'], 'adir is a directory; expected a .pt file'),
        ('missing file', lambda d: ['nope.pt', '--n_head', '2'], 'nope.pt does not exist'),
        ('nanoGPT state dict', lambda d: [nanogpt_state_dict(d), '--n_head', '2'], 'nanoGPT / GPT-2 keys'),
        ('torch file holding a list', lambda d: [torch.save([torch.zeros(2)], d / 'list.pt') or 'list.pt'],
         'list.pt is not a modded-nanogpt checkpoint: expected a dict with a "model" state dict'),
        ('truncated file', lambda d: [truncated(d), '--n_head', '2'], 'cut.pt is truncated or damaged'),
        ('pickled class', lambda d: [pickled_class(d), '--n_head', '2'],
         'evil.pt holds more than tensors and plain containers, so it was not loaded'),
        ('missing tensor', lambda d: [missing_tensor(d), '--n_head', '2'], '1 keys are missing from hole.pt'),
        ('head count that does not fit', lambda d: [modded(d), '--n_head', '3'], 'tiny.pt: 3 heads do not fit'),
    ],
    'finetune_hindi_xnli.py': [
        ('missing checkpoint', lambda d: xnli(d) + ['--pretrained_ckpt_path', 'nope.pt'], 'nope.pt does not exist'),
        ('text file as checkpoint', lambda d: xnli(d) + ['--pretrained_ckpt_path', file(d, 'notes.txt')],
         'notes.txt is not a PyTorch checkpoint'),
        ('unknown flag', lambda d: xnli(d) + ['--bogus'], 'unrecognized arguments: --bogus'),
        ('abbreviated flag', lambda d: xnli(d) + ['--num_epoch', '2'], 'unrecognized arguments: --num_epoch'),
        ('--batch_size 0', lambda d: xnli(d) + ['--batch_size', '0'], '--batch_size must be at least 1, found 0'),
        ('--learning_rate abc', lambda d: xnli(d) + ['--learning_rate', 'abc'],
         "argument --learning_rate: invalid float value: 'abc'"),
        ('--device foo', lambda d: xnli(d) + ['--device', 'foo'], "--device 'foo' is not a torch device"),
        ('--out_dir is a file', lambda d: xnli(d) + ['--out_dir', file(d, 'notes.txt')], '--out_dir notes.txt is a file'),
        ('missing data dir', lambda d: xnli(d) + ['--data_dir', 'nodata'], 'nodata/xnli.dev.tsv does not exist'),
        ('data file missing a column', lambda d: xnli(d) + nli_file(d, 'train.csv', 'premise,label\na,0\n'),
         "train.csv has no column 'hypothesis'"),
        ('unknown label', lambda d: xnli(d) + nli_file(d, 'train.csv', 'premise,hypothesis,label\na,b,maybe\n'),
         "train.csv line 2: unknown label 'maybe'"),
        ('binary data file', lambda d: xnli(d) + nli_file(d, 'train.tsv', b'\xff\xfe\x00garbage'),
         'train.tsv is not UTF-8 text'),
        ('tokenizer file missing', lambda d: xnli(d) + ['--tokenizer_name', 'nope.json'],
         "no tokenizer 'nope.json': expected a Hugging Face tokenizer.json file at one of nope.json"),
        ('labels outside --num_classes', lambda d: xnli(d) + hub(d, '--num_classes', '2'),
         "hf/xnli-hi [train] row 1: unknown label 2 in column 'label'; expected 0 to 1 or 0, 1 (2 classes, --num_classes)"),
        ('a text column the data lacks', lambda d: xnli(d) + hub(d, '--text_column', 'premise-phoneme', 'hypothesis'),
         "hf/xnli-hi [train] has no column 'premise-phoneme'"),
        ('a broken JSON line', lambda d: xnli(d) + nli_file(d, 'train.jsonl', '{"premise": "a", "hypothesis": "b", '
                                                                '"label": 0}\n{"premise": oops}\n'),
         'train.jsonl line 2 is not valid JSON'),
        ('an empty split', lambda d: xnli(d) + ['--train_file', empty_parquet(d)],
         'empty.parquet has no examples: it has no data rows'),
        ('an unreadable parquet file', lambda d: xnli(d) + ['--train_file', file(d, 'train.parquet', b'not parquet')],
         'train.parquet could not be read as .parquet by datasets'),
        ('a hub dataset, offline', lambda d: xnli(d) + ['--parent_dataset', 'someone/nothing', '--no_subset'],
         "datasets could not load 'someone/nothing'"),
        ('--from_disk on a folder that is no saved dataset', lambda d: xnli(d) + ['--from_disk', '--parent_dataset',
                                                                                folder(d)],
         '--from_disk: adir could not be read by datasets.load_from_disk'),
        ('a ClassLabel that disagrees with --num_classes', lambda d: xnli(d) + [
            '--from_disk', '--parent_dataset', str(make_hf_datasets(d, 30, 9, 9) / 'xnli-hi-disk'), '--num_classes', '2'],
         '--num_classes 2, but the label column is a ClassLabel with 3 classes: entailment, neutral, contradiction'),
    ],
    'data/prepare.py': [
        ('unknown tokenizer', lambda d: ['--dataset', 'x', '--input', file(d, 'in.txt'), '--tokenizer', 'bpe', '--out_dir', 'out'],
         "argument --tokenizer: invalid choice: 'bpe'"),
        ('--input missing file', lambda d: ['--dataset', 'x', '--input', 'nope.txt', '--out_dir', 'out'],
         'the input nope.txt does not exist; expected a UTF-8 text file'),
        ('--input empty file', lambda d: ['--dataset', 'x', '--input', file(d, 'empty.txt', ''), '--out_dir', 'out'],
         'the input empty.txt is empty'),
        ('--input binary file', lambda d: ['--dataset', 'x', '--input', file(d, 'blob.bin', b'\x80\x02\xff' * 9),
                                           '--out_dir', 'out'], 'the input blob.bin is not UTF-8 text'),
        ('--input directory', lambda d: ['--dataset', 'x', '--input', folder(d), '--out_dir', 'out'],
         'the input adir is a directory'),
        ('dataset name with a path', lambda d: ['--dataset', '../x', '--input', file(d, 'in.txt'), '--out_dir', 'out'],
         "the dataset name '../x' is not a plain name"),
        ('unknown dataset', lambda d: ['--dataset', 'nope', '--out_dir', 'out'], "unknown dataset 'nope'"),
        ('--val_fraction 2', lambda d: ['--dataset', 'x', '--input', file(d, 'in.txt'), '--val_fraction', '2',
                                        '--out_dir', 'out'], 'val_fraction must be between 0 and 1 (exclusive), found 2.0'),
        ('--val_fraction abc', lambda d: ['--dataset', 'x', '--input', file(d, 'in.txt'), '--val_fraction', 'abc',
                                          '--out_dir', 'out'],
         "argument --val_fraction: invalid float value: 'abc'"),
        ('--out_dir is a file', lambda d: ['--dataset', 'x', '--input', file(d, 'in.txt'), '--out_dir', file(d, 'f')],
         'the output folder f is a file'),
        ('text too short to split', lambda d: ['--dataset', 'x', '--input', file(d, 'one.txt', 'a'), '--out_dir', 'out'],
         'the text of one.txt is too short'),
        ('unknown flag', lambda d: ['--bogus', '--out_dir', 'out'], 'unrecognized arguments: --bogus'),
    ],
    'train.py': [ # its checks of settings and of a resume's vocabulary are called as functions: tests/test_train_checks.py
        ('--adapter_from a bundle', lambda d: ['--adapter_from', bundle(d)], 'b is not a peft adapter directory'),
        ('--max_iters=-5', lambda d: ['--max_iters=-5'], 'max_iters = -5 cannot be used: it must be at least 0'),
        ('--learning_rate=abc', lambda d: ['--learning_rate=abc'], "Type mismatch for 'learning_rate'"),
        ('unknown key', lambda d: ['--max_iter=5'], "Unknown config key 'max_iter' (from the command line). Did you mean: max_iters"),
        ('config file missing', lambda d: ['config/nope.py'], "Config file not found: 'config/nope.py'"),
        ('config file that is not Python', lambda d: [file(d, 'notes.txt')], "Config file 'notes.txt' failed at line 1"),
        ('unknown dataset', lambda d: ['--dataset=nope'], 'python data/prepare.py --dataset NAME --input FILE'),
        ('a directory as config file', lambda d: [folder(d, 'config')], "Config file 'config' is a directory"),
        ('a modded checkpoint', lambda d: ['--resume_from=' + modded(d)], 'tiny.pt is a modded-nanogpt checkpoint'),
        ('block size longer than the data', lambda d: ['--block_size=1000000'], 'but a batch needs block_size + 1'),
        ('resume from nothing', lambda d: ['--resume_from=nope'], 'no checkpoint at nope'),
        ("nanoGPT's init_from=gpt2, offline and not cached", lambda d: ['--init_from=gpt2'],
         "init_from = 'gpt2': OpenAI's GPT-2 weights are neither in the Hugging Face cache nor downloadable here"),
        ('resume from a text file', lambda d: ['--resume_from=' + file(d, 'notes.txt')], 'notes.txt could not be read'),
        ('resume from an empty directory', lambda d: ['--resume_from=' + folder(d)], 'no checkpoint in the directory adir'),
        ('resume from a classifier', lambda d: ['--resume_from=' + edited(d, 'best', 'config.json', kind='nli_classifier')],
         'best is a fine-tuned classifier'),
        ('config.json that disagrees with model.pt', lambda d: ['--resume_from=' + edited(d, 'b', 'config.json', n_layer=9)],
         'it says n_layer 9 (the weights have 2)'),
    ],
    'generate.py': [
        ('no checkpoint named', lambda d: [], 'exactly one of PATH, --checkpoint PATH or --model_name NAME (found 0)'),
        ('missing checkpoint', lambda d: ['--checkpoint', 'nope'], 'no checkpoint at nope'),
        ('text file', lambda d: ['--checkpoint', file(d, 'notes.txt')], "it starts with b'hello world"),
        ('a config file', lambda d: ['--checkpoint', file(d, 'conf.py', '# a config\n')], "conf.py is not a PyTorch checkpoint: it starts with b'# a config"),
        ('a misspelt option', lambda d: ['--num_sample', '2'], 'unrecognized arguments: --num_sample. Did you mean --num_samples?'),
        ('empty directory', lambda d: ['--checkpoint', folder(d)], 'no checkpoint in the directory adir'),
        ('--num_samples -1', lambda d: ['--checkpoint', bundle(d), '--num_samples', '-1'], '-1 is too small'),
        ('--top_k 0', lambda d: ['--checkpoint', bundle(d), '--top_k', '0'], '0 is too small'),
        ('--temperature 0', lambda d: ['--checkpoint', bundle(d), '--temperature', '0'], '--temperature 0.0'),
        ('--dtype float8', lambda d: ['--checkpoint', bundle(d), '--dtype', 'float8'], "invalid choice: 'float8'"),
        ('--device cuda without a GPU', lambda d: ['--checkpoint', bundle(d), '--device', 'cuda'], 'no CUDA GPU'),
        ('prompt file missing', lambda d: ['--checkpoint', bundle(d), '--start', 'FILE:nope.txt'],
         '--start FILE:nope.txt: the prompt file could not be read (No such file or directory)'),
        ('prompt file empty', lambda d: ['--checkpoint', bundle(d), '--start', 'FILE:' + file(d, 'empty.txt', '')],
         '--start FILE:empty.txt: the prompt file is empty'),
        ('a character the vocabulary lacks', lambda d: ['--checkpoint', bundle(d), '--start', '€'], "the character '€'"),
        ('damaged model.pt', lambda d: ['--checkpoint', damaged(d)], 'model.pt does not match its checksum'),
        ('--meta names a directory', lambda d: ['--checkpoint', hf_dir(d), '--meta', folder(d)],
         'adir is a directory; expected a meta.json or nanoGPT meta.pkl vocabulary file'),
        ('--legacy_checkpoint missing', lambda d: ['--model_name', bundle(d), '--root', '.', '--legacy_checkpoint',
                                                   'final.pt'], '--legacy_checkpoint final.pt: there is no file final.pt'),
        ('a file inside a bundle', lambda d: ['--checkpoint', bundle(d) + '/model.pt'],
         'b/model.pt is one file of the checkpoint directory b'),
        ('a modded checkpoint', lambda d: ['--checkpoint', modded(d)],
         'tiny.pt is a modded-nanogpt checkpoint (blocks.N.attn.qkv_w / qkvo_w), not a nanoGPT GPT: check it with '
         'python test_checkpoint_loading.py tiny.pt'),
    ],
    'sample.py': [
        ('no checkpoint in out_dir', lambda d: ['--out_dir=nope'], 'no checkpoint at nope'),
        ('--num_samples=0', lambda d: ['--out_dir=' + bundle(d), '--num_samples=0'],
         'num_samples = 0 cannot be used: it must be at least 1'),
        ('a mistyped key', lambda d: ['--outdir=b'], "Unknown config key 'outdir' (from the command line). Did you mean: out_dir"),
        ('--init_from=gpt2, offline and not cached', lambda d: ['--init_from=gpt2'],
         "init_from = 'gpt2': OpenAI's GPT-2 weights are neither in the Hugging Face cache"),
    ],
    'inspect_model.py': [
        ('no checkpoint named', lambda d: [], 'exactly one of PATH, --checkpoint PATH or --model_name NAME (found 0)'),
        ('both named', lambda d: ['--checkpoint', 'x', '--model_name', 'y'], 'exactly one of'),
        ('missing checkpoint', lambda d: ['--checkpoint', 'nope'], 'no checkpoint at nope'),
        ('text file', lambda d: ['--checkpoint', file(d, 'notes.txt')], "it starts with b'hello world"),
        ('empty file', lambda d: ['--checkpoint', file(d, 'empty.pt', b'')], 'the file is empty'),
        ('empty directory', lambda d: ['--checkpoint', folder(d)], 'no checkpoint in the directory adir'),
        ('config.json not JSON', lambda d: ['--checkpoint', broken_json(d)], 'config.json is not valid JSON'),
        ('manifest naming a path outside', lambda d: ['--checkpoint', edited(d, 'b', 'manifest.json', files={
            '../../etc/passwd': {'size': 1}})], "'../../etc/passwd', which is not a plain file name"),
        ('pickled class', lambda d: ['--checkpoint', pickled_class(d)], 'evil.pt holds more than tensors'),
        ('unknown flag', lambda d: ['--bogus'], 'unrecognized arguments: --bogus'),
    ],
    'convert_checkpoints.py': [
        ('missing source', lambda d: ['nope'], 'no checkpoint at nope'),
        ('text file', lambda d: [file(d, 'notes.txt')], "it starts with b'hello world"),
        ('truncated file', lambda d: [truncated(d)], 'cut.pt'),
        ('unknown format', lambda d: [bundle(d), '--to', 'onnx', 'out'], '--to onnx: unknown format; it writes hf, '),
        ('--to with two sources', lambda d: [bundle(d), bundle(d, 'c'), '--to', 'hf', 'out'], '--to converts exactly one source, found 2'),
        ('--to without an output', lambda d: [bundle(d), '--to', 'hf'], 'argument --to: expected 2 arguments'),
        ('output that exists', lambda d: [bundle(d), '--to', 'nanogpt', file(d, 'notes.txt')], 'notes.txt already exists'),
        ('--out with two sources', lambda d: [modded(d, 'a.pt'), modded(d, 'b.pt'), '--out', 'x'], '--out takes one source'),
        ('a classifier', lambda d: [edited(d, 'best', 'config.json', kind='nli_classifier'), '--to', 'hf', 'hf'],
         'best is a fine-tuned classifier'),
        ('a modded checkpoint', lambda d: [modded(d)], 'tiny.pt is a modded-nanogpt checkpoint'),
        ('--to nanogpt onto a path ending in /', lambda d: [bundle(d), '--to', 'nanogpt', 'new/sub/'],
         'new/sub/ names a directory: a nanoGPT checkpoint is one file'),
        ('--to nanogpt onto a directory', lambda d: [bundle(d), '--to', 'nanogpt', folder(d)],
         'adir names a directory: a nanoGPT checkpoint is one file; name it, e.g. adir/ckpt.pt'),
        ('--out names a file', lambda d: [legacy(d), '--out', file(d, 'notes.txt')],
         'notes.txt is a file: a checkpoint is written as a directory there'),
        ('a file in the current directory, no --out', lambda d: [legacy(d)], 'lies in the current directory'),
        ('a Hugging Face directory, no --out', lambda d: [hf_dir(d)], 'name where its bundle goes, --out DIR'),
        ('an export onto its own source', lambda d: [bundle(d), '--to', 'bundle', 'b', '--force'],
         '--to bundle b names the checkpoint being read'),
        ('a truncated model.safetensors', lambda d: [cut_weights(d, hf_dir(d), 'model.safetensors'), '--to', 'bundle',
                                                     'x'], 'model.safetensors could not be read as a safetensors file'),
    ],
}


def damaged(d):
    name = bundle(d)
    data = bytearray((d / name / 'model.pt').read_bytes())
    data[len(data) // 2] ^= 1 # one flipped bit
    (d / name / 'model.pt').write_bytes(bytes(data))
    return name


def broken_json(d):
    name = bundle(d)
    (d / name / 'config.json').write_text('{"n_layer": 2,')
    return name


TOP_LEVEL = ('train.py', 'sample.py')
READ_AT_IMPORT = ('a hub dataset, offline',) # datasets reads HF_DATASETS_OFFLINE when imported


def as_process(script, name):
    return script in TOP_LEVEL or name in READ_AT_IMPORT or name == CASES[script][0][0]


@pytest.mark.parametrize('script, build, expected, process', [
    pytest.param(script, build, expected, as_process(script, name), id=f'{script}: {name}')
    for script, cases in CASES.items() for name, build, expected in cases])
def test_bad_input_exits_1_with_one_clear_message(script, build, expected, process, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # tiny models; and a busy 2-core machine slows 2-thread runs ~10x
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')  # hub names fail at once (online they would retry for 30 s)
    monkeypatch.setenv('HF_DATASETS_CACHE', f'{tmp_path}-datasets-cache')  # its cache, outside the case's folder
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', f'{tmp_path}-hub-cache')
    first = ['--max_iters=1', '--eval_iters=1'] if script == 'train.py' else [] # should a case stop failing, it ends soon
    args = build(tmp_path)
    before = sorted(tmp_path.rglob('*'))
    if process:
        code, out = run_script(script, *first, *args, cwd=tmp_path, ok=False)
    else:
        code, out = run_in_process(script, *first, *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and 'Traceback' not in out, out
    assert sorted(tmp_path.rglob('*')) == before, 'a failed run left files or folders behind'
    assert expected in out.strip().split('\n\n')[-1], out  # named in the last paragraph: the message itself
    assert 'this ran while loading' not in out
