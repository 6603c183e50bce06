"""
The probe every bundle carries (core/probe.py): stored at save, run on every load, into any adapter layout or rank;
a weight loaded wrong or changed after the save stops the load with the deviation named; an older bundle without a
probe loads with a note; inspect_model.py --verify runs it.
"""

import json

import pytest
import torch

from core.checkpoint import read_checkpoint, save_bundle
from core.commit import file_checksum, load_tensors, save_tensors, write_json
from core.probe import LENGTH, SEQUENCES, ProbeMismatchError, make_probe, probe_difference
from model import GPT, GPTConfig
from tests.helpers import run_in_process

CHARS = list('abcdefghijklmnopqrstuvwxyz \n')


def bundle(path, **adapters):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, **adapters))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5)  # LoRA factors too: a dropped scale would change the function
    save_bundle(path, model, 3, tokenizer={'token_kind': 'char', 'chars': CHARS})
    return model


def test_a_bundle_stores_its_probe_and_every_load_into_another_form_passes_it(tmp_path):
    saved = bundle(tmp_path / 'lora', attn_lora_rank=4, mlp_lora_rank=2, lora_alpha=8.0)
    ck = read_checkpoint(tmp_path / 'lora')
    probe = ck.probe()
    assert len(probe['ids']) == SEQUENCES and len(probe['ids'][0]) == LENGTH
    assert max(max(row) for row in probe['ids']) < len(CHARS)  # inside the tokenizer's ids, not the padding rows
    for adapters in ({}, dict(attn_lora_rank=4, mlp_lora_rank=2, lora_alpha=8.0), dict(attn_lora_rank=8, lora_alpha=2.0),
                     dict(embedding_mode='lora', embedding_rank=4)):
        model, report = ck.build_model(**adapters)  # merged, restored, another rank, LoRA on the embedding
        assert report['probe'].startswith('probe: |diff| ') and 'over 60 values' in report['probe'], adapters
        assert probe_difference(model, probe)[0] < 1e-5
    assert probe_difference(saved, probe)[0] == 0.0  # what the saving model computed


def test_inspect_verify_runs_the_probe(tmp_path, monkeypatch, capsys):
    bundle(tmp_path / 'b')
    code, out = run_in_process('inspect_model.py', '--checkpoint', tmp_path / 'b', '--verify', cwd=tmp_path,
                               monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and '=== PROBE ===' in out and 'probe: |diff| 0.0e+00 over 60 values' in out


def test_a_weight_changed_after_the_save_stops_the_load_and_names_the_deviation(tmp_path, monkeypatch, capsys):
    bundle(tmp_path / 'b')
    weights = load_tensors(tmp_path / 'b' / 'model.pt')
    key = 'transformer.h.0.attn.c_attn.weight'
    weights[key] = weights[key].t().reshape(weights[key].shape).contiguous()  # one matrix, its layout wrong
    save_tensors(tmp_path / 'b' / 'model.pt', weights)
    manifest = json.loads((tmp_path / 'b' / 'manifest.json').read_text())  # the checksum made to fit: bytes look fine
    manifest['files']['model.pt'] = {'size': (tmp_path / 'b' / 'model.pt').stat().st_size,
                                     'xxh3_64': file_checksum(tmp_path / 'b' / 'model.pt')}
    write_json(tmp_path / 'b' / 'manifest.json', manifest)
    with pytest.raises(ProbeMismatchError, match=r'largest deviation is [\d.e+-]+ over 60 values') as e:
        read_checkpoint(tmp_path / 'b').build_model()
    assert 'into a GPT with adapters none (standard)' in str(e.value)
    code, out = run_in_process('inspect_model.py', '--checkpoint', tmp_path / 'b', '--verify', cwd=tmp_path,
                               monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and 'error: probe: the model built from' in out and 'Traceback' not in out
    _, report = read_checkpoint(tmp_path / 'b').build_model(probe_check=False)  # an expert's choice: said, not fatal
    assert 'largest deviation' in report['probe'] and report['probe'].endswith('(the probe check is off: going on)')


def test_an_older_bundle_without_a_probe_loads_with_a_note(tmp_path, monkeypatch, capsys):
    bundle(tmp_path / 'old')
    state = json.loads((tmp_path / 'old' / 'training_state.json').read_text())
    del state['probe']
    write_json(tmp_path / 'old' / 'training_state.json', state)
    _, report = read_checkpoint(tmp_path / 'old').build_model()
    assert report['probe'] == 'probe: no probe stored (a checkpoint older than probes): the load is not checked'
    code, out = run_in_process('inspect_model.py', '--checkpoint', tmp_path / 'old', '--verify', cwd=tmp_path,
                               monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and 'none stored' in out


def test_our_exports_carry_the_probe_and_their_imports_run_it(tmp_path):
    from core.hf import export_hf
    from core.nanogpt import export_nanogpt
    model = bundle(tmp_path / 'b')
    export_hf(model, tmp_path / 'hf')
    export_nanogpt(model, tmp_path / 'nanogpt' / 'ckpt.pt', tokenizer={'token_kind': 'char', 'chars': CHARS})
    for name in ('hf', 'nanogpt/ckpt.pt'):
        _, report = read_checkpoint(tmp_path / name).build_model()
        assert report['probe'].startswith('probe: |diff| ') and 'over 60 values' in report['probe'], name
    # nanoGPT's file has no manifest: a matrix transposed in it is caught by the probe alone
    ck = torch.load(tmp_path / 'nanogpt' / 'ckpt.pt', weights_only=True)
    key = 'transformer.h.1.mlp.c_proj.weight'
    ck['model'][key] = ck['model'][key].flip(0)
    torch.save(ck, tmp_path / 'nanogpt' / 'ckpt.pt')
    with pytest.raises(ProbeMismatchError, match='nanogpt'):
        read_checkpoint(tmp_path / 'nanogpt' / 'ckpt.pt').build_model()


def test_a_peft_export_carries_the_probe_of_base_and_adapter(tmp_path):
    from core.peft_adapter import write_peft
    bundle(tmp_path / 'lora', attn_lora_rank=4, lora_alpha=8.0)
    ck = read_checkpoint(tmp_path / 'lora')
    write_peft(ck, None, tmp_path / 'peft')
    peft = read_checkpoint(tmp_path / 'peft')
    _, report = peft.build_model(**peft.trained_adapters())
    assert report['probe'].startswith('probe: |diff| ') and peft.probe()['ids'] == ck.probe()['ids']


def test_the_probe_holds_what_its_docs_say_measured_in_eval_mode():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.5)).train()
    probe = make_probe(model, vocab_size=20)
    assert model.training and make_probe(model, vocab_size=20) == probe  # eval mode: no dropout, then train again
    ids = torch.tensor(probe['ids'])
    assert ids.max() < 20
    with torch.no_grad():
        logits = model.eval()(ids, targets=ids)[0]
    log_probs = torch.log_softmax(logits, -1)
    for b in range(len(ids)):  # each position's log-probability of the token that follows it
        expected = [log_probs[b, t, ids[b, t + 1]].item() for t in range(ids.size(1) - 1)]
        assert probe['next_log_probs'][b] == pytest.approx(expected, abs=1e-6)
    assert (torch.tensor(probe['top_logits']) - logits[:, -1].topk(8).values).abs().max() < 1e-6
    # the load compares the logits at the stored entries: another set of entries is compared as stored
    other = {**probe, 'top_ids': [list(range(8))] * len(ids), 'top_logits': logits[:, -1, :8].tolist()}
    assert probe_difference(model, other)[0] < 1e-6


def test_a_load_cropped_to_fewer_positions_than_the_probe_compares_its_first_ones(tmp_path):
    bundle(tmp_path / 'b')
    ck = read_checkpoint(tmp_path / 'b')
    model = GPT.on_meta(ck.model_config())
    report = ck.load_into(model, block_size=5)
    assert model.config.block_size == 5 and 'over 16 values' in report['probe']  # 4 sequences x 4 next tokens
    weights = dict(ck.weights())
    weights['transformer.wpe.weight'] = weights['transformer.wpe.weight'].clone()
    weights['transformer.wpe.weight'][2] += torch.randn(16)  # a position the cropped model keeps
    ck.stored_weights = lambda: weights
    with pytest.raises(ProbeMismatchError):
        ck.load_into(GPT.on_meta(ck.model_config()), block_size=5)
