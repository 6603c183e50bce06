"""
Sampling does what its options say: GPT.generate's temperature, top_k, vocab_size and context crop, measured on the
distribution of many draws from known logits; generate.py's and sample.py's options, on a checkpoint whose greedy
continuation is computed here.
"""

import json

import torch

from core.checkpoint import read_checkpoint, save_bundle
from model import GPT, GPTConfig
from tests.helpers import run_in_process, run_script

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, 5.0, 5.0]) # ids 4 and 5: a padded vocabulary's rows, not tokens
DRAWS = 20000


class FixedLogits(GPT):
    """ a GPT whose next-token logits are LOGITS at every position; it records the inputs it was given """

    def __init__(self, block_size=4):
        super().__init__(GPTConfig(vocab_size=6, block_size=block_size, n_layer=1, n_head=1, n_embd=4))
        self.seen = []

    def forward(self, idx, targets=None, cache=None):
        self.seen.append(idx.clone())
        if cache is not None:
            cache.length += idx.size(1)
        return LOGITS.expand(idx.size(0), idx.size(1), -1).clone(), None


def frequencies(temperature=1.0, top_k=None, vocab_size=4):
    torch.manual_seed(0)
    ids = FixedLogits().generate(torch.zeros(DRAWS, 1, dtype=torch.long), 1, temperature, top_k, vocab_size)[:, -1]
    return torch.bincount(ids, minlength=6).float() / DRAWS


def test_temperature_divides_the_logits():
    for temperature in (1.0, 0.5, 2.0):
        expected = torch.softmax(LOGITS[:4] / temperature, -1)
        assert (frequencies(temperature)[:4] - expected).abs().max() < 0.015, temperature
    assert (frequencies(0.5) - frequencies(2.0)).abs().max() > 0.2 # the data tells temperatures apart


def test_top_k_keeps_the_k_most_likely_and_renormalises():
    freq = frequencies(top_k=2)
    assert freq[2:].sum() == 0
    assert (freq[:2] - torch.softmax(LOGITS[:2], -1)).abs().max() < 0.015
    assert (frequencies(top_k=3)[:3] - torch.softmax(LOGITS[:3], -1)).abs().max() < 0.015


def test_the_rows_beyond_the_vocabulary_are_never_sampled():
    assert frequencies(vocab_size=4)[4:].sum() == 0
    assert frequencies(vocab_size=None)[4:].sum() > 0.9 # without vocab_size they would dominate


def test_generation_feeds_back_each_token_and_crops_to_the_block_size():
    model = FixedLogits(block_size=4)
    torch.manual_seed(0)
    out = model.generate(torch.tensor([[1, 2, 3]]), 3, top_k=1, vocab_size=4, use_cache=False)
    assert out.tolist() == [[1, 2, 3, 0, 0, 0]] # greedy: id 0 three times
    assert [s.tolist() for s in model.seen] == [[[1, 2, 3]], [[1, 2, 3, 0]], [[2, 3, 0, 0]]]
    # with the cache: the prompt once, then the new token alone, until the window slides and all is recomputed
    model.seen = []
    assert model.generate(torch.tensor([[1, 2, 3]]), 3, top_k=1, vocab_size=4).tolist() == out.tolist()
    assert [s.tolist() for s in model.seen] == [[[1, 2, 3]], [[0]], [[2, 3, 0, 0]]]


def test_the_cache_gives_the_samples_of_recomputing_the_prefix():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=24, n_layer=2, n_head=2, n_embd=16, attn_lora_rank=2)).eval()
    for p in model.parameters():  # trained-looking weights: peaked distributions, LoRA factors not zero
        torch.nn.init.normal_(p, std=0.4)
    prompt = torch.randint(0, 40, (3, 5))
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(1)  # past block_size too: the window slides for the last 11 tokens
        samples.append(model.generate(prompt, 30, temperature=0.8, top_k=10, use_cache=use_cache))
    assert torch.equal(samples[0], samples[1])


# ----------------------------------------------------------------------------- the scripts

CHARS = list('abcdefghij\n')


def peaked_bundle(path):
    """ a char model with large weights (its next-token logits differ by units, so greedy is well defined) and two
    rows beyond its vocabulary, as a vocabulary padded for speed has """
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(CHARS) + 2, block_size=8, n_layer=1, n_head=1, n_embd=16, bias=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0)
    save_bundle(path, model, 1, tokenizer={'token_kind': 'char', 'chars': CHARS})
    return read_checkpoint(path).build_model()[0].eval()


def greedy(model, prompt, n):
    ids = [CHARS.index(c) for c in prompt]
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids[-8:]]))[0][0, -1, :len(CHARS)].argmax().item())
    return ''.join(CHARS[i] for i in ids)


def samples(out):
    """ the samples printed, each followed by a line of dashes (configurator's 'Overriding:' lines before them) """
    out = '\n'.join(line for line in out.splitlines() if not line.startswith('Overriding: '))
    return [s.strip('\n') for s in out.split('---------------')[:-1]]


def test_generate_py_options(tmp_path, monkeypatch, capsys):
    model = peaked_bundle(tmp_path / 'm')
    gen = lambda *a: run_in_process('generate.py', '--checkpoint', 'm', '--device', 'cpu', '--start', 'abc', *a,
                                    cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    code, out = gen('--top_k', 1, '--num_samples', 2, '--max_new_tokens', 12)
    assert code == 0 and samples(out) == [greedy(model, 'abc', 12)] * 2
    assert samples(gen('--temperature', 1e-4, '--num_samples', 1, '--max_new_tokens', 12)[1]) == [greedy(model, 'abc', 12)]
    hot = samples(gen('--temperature', 3.0, '--num_samples', 4, '--max_new_tokens', 12)[1])
    assert len(hot) == 4 and all(len(s) == 15 for s in hot) and greedy(model, 'abc', 12) not in hot
    assert len(set(hot)) > 1 # each sample draws anew
    assert samples(gen('--seed', 7, '--temperature', 3.0, '--num_samples', 4, '--max_new_tokens', 12)[1]) != hot
    assert samples(gen('--temperature', 3.0, '--num_samples', 4, '--max_new_tokens', 12)[1]) == hot # --seed 1337


def test_sample_py_samples_as_generate_py_with_nanogpts_options(tmp_path, monkeypatch, capsys):
    model = peaked_bundle(tmp_path / 'out')
    (tmp_path / 'prompt.txt').write_text('ba')
    code, out = run_in_process('sample.py', '--start=FILE:prompt.txt', '--num_samples=3', '--max_new_tokens=9',
                               '--top_k=1', '--device=cpu', cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and samples(out) == [greedy(model, 'ba', 9)] * 3 # out_dir 'out', init_from 'resume'
    code, hot = run_in_process('sample.py', '--out_dir=out', '--start=ba', '--num_samples=2', '--max_new_tokens=9',
                               '--temperature=3.0', '--device=cpu', cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    _, same = run_in_process('generate.py', '--checkpoint', 'out', '--start', 'ba', '--num_samples', 2,
                             '--max_new_tokens', 9, '--temperature', 3.0, '--device', 'cpu', cwd=tmp_path,
                             monkeypatch=monkeypatch, capsys=capsys)
    assert samples(hot) == samples(same) and greedy(model, 'ba', 9) not in samples(hot) # the same seed 1337
    # nanoGPT's defaults: 10 samples from '\n', temperature 0.8, top_k 200, seed 1337; init_from a path
    (tmp_path / 'out').rename(tmp_path / 'elsewhere')
    code, defaults = run_in_process('sample.py', '--init_from=elsewhere', '--max_new_tokens=6', '--device=cpu', cwd=tmp_path,
                                    monkeypatch=monkeypatch, capsys=capsys)
    _, same = run_in_process('generate.py', '--checkpoint', 'elsewhere', '--start', '\n', '--num_samples', 10,
                             '--max_new_tokens', 6, '--temperature', 0.8, '--top_k', 200, '--seed', 1337, '--device', 'cpu',
                             cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and len(samples(defaults)) == 10 and samples(defaults) == samples(same)
    _, other = run_in_process('generate.py', '--checkpoint', 'elsewhere', '--start', '\n', '--num_samples', 10,
                              '--max_new_tokens', 6, '--temperature', 1.0, '--device', 'cpu', cwd=tmp_path,
                              monkeypatch=monkeypatch, capsys=capsys)
    assert samples(other) != samples(same) # the data tells temperature 0.8 from 1.0


def test_meta_names_the_vocabulary_of_every_kind(tmp_path):
    from core.hf import export_hf
    from core.nanogpt import export_nanogpt
    model = peaked_bundle(tmp_path / 'bundle')  # stores its vocabulary
    export_hf(model, tmp_path / 'hf')  # a char model's export stores none
    export_nanogpt(model, tmp_path / 'nanogpt' / 'ckpt.pt', tokenizer={'token_kind': 'char', 'chars': CHARS})
    flipped = {'token_kind': 'char', 'chars': CHARS[::-1]}
    (tmp_path / 'meta.json').write_text(json.dumps({'vocab_size': len(CHARS), 'tokenizer': flipped}))
    for name in ('bundle', 'hf', 'nanogpt/ckpt.pt'):
        ck = read_checkpoint(tmp_path / name, meta_path=tmp_path / 'meta.json')
        assert ck.kind == name.split('/')[0] and ck.tokenizer == flipped, name
        assert any(n.startswith(f"tokenizer: read from {tmp_path / 'meta.json'}") for n in ck.notes), ck.notes
    assert read_checkpoint(tmp_path / 'bundle').tokenizer['chars'] == CHARS  # without --meta: its own
    assert read_checkpoint(tmp_path / 'nanogpt/ckpt.pt').tokenizer['chars'] == CHARS  # the meta.pkl beside it


def test_sample_py_takes_the_vocabulary_of_a_checkpoint_that_stores_none(tmp_path, monkeypatch, capsys):
    model = peaked_bundle(tmp_path / 'with')
    bare = GPT(model.config)
    bare.load_state_dict(model.state_dict())
    save_bundle(tmp_path / 'bare', bare, 1) # no tokenizer.json
    (tmp_path / 'meta.json').write_text(json.dumps({'vocab_size': len(CHARS), 'tokenizer': {'token_kind': 'char', 'chars': CHARS}}))
    args = ['--init_from=bare', '--start=ab', '--num_samples=1', '--max_new_tokens=5', '--top_k=1', '--device=cpu']
    code, out = run_script('sample.py', *args, cwd=tmp_path, ok=False) # its errors end at the interpreter: a process
    assert code == 1 and 'stores no vocabulary' in out and '--meta' in out and 'Traceback' not in out
    code, out = run_in_process('sample.py', *args, '--meta=meta.json', cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and samples(out) == [greedy(model, 'ab', 5)]
