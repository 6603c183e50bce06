"""
The foundation: LoRA layers, the universal merged state dict and the one loader, checked by comparing logits.
Tolerance: 1e-5 absolute on fp32 logits of tiny models (their magnitude is ~1), 1e-6 on merged weights.
"""

import copy

import pytest
import torch

from model import (GPT, GPTConfig, LoRAEmbedding, LoRALinear, CheckpointMismatchError, check_state_dict_fits,
                   load_universal_state_dict)

TINY = dict(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def perturb_adapters(model, seed=1):
    """ give every adapter a non-zero update, so a merge that forgets one is caught """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LoRALinear, LoRAEmbedding)):
                for p in (m.lora_A.weight, m.lora_B.weight):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def batch(seed=2, b=3, t=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY['vocab_size'], (b, t), generator=g)


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx, targets=idx)[0]  # targets given: full logits at every position


ADAPTER_CASES = {
    'attn': dict(attn_lora_rank=4),
    'mlp': dict(mlp_lora_rank=4),
    'embedding': dict(embedding_mode='lora', embedding_rank=4),
    'all': dict(attn_lora_rank=8, mlp_lora_rank=2, embedding_mode='lora', embedding_rank=3, lora_alpha=16.0),
}


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('case', list(ADAPTER_CASES))
def test_lora_model_equals_its_merged_standard_model(case, bias):
    lora = perturb_adapters(make(bias=bias, **ADAPTER_CASES[case]))
    merged = lora.get_merged_state_dict()
    standard = make(seed=5, bias=bias)
    assert list(merged) == list(standard.state_dict())  # exactly the standard keys, in order
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in standard.state_dict().items()}
    standard.load_state_dict(merged, strict=True)
    idx = batch()
    before, after = logits_of(lora, idx), logits_of(standard, idx)
    assert (before - logits_of(make(seed=5, bias=bias), idx)).abs().max() > 1e-2  # the check can fail
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    # tied weights: the deployed head is the merged embedding
    assert standard.lm_head.weight is standard.transformer.wte.weight


def test_merged_weight_is_w0_plus_scaled_update():
    lora = perturb_adapters(make(attn_lora_rank=4, mlp_lora_rank=2, embedding_mode='lora',
                                 embedding_rank=3, lora_alpha=8.0))
    merged = lora.get_merged_state_dict()
    attn = lora.transformer.h[1].attn.c_attn
    expected = attn.main_weight.weight + attn.lora_B.weight @ attn.lora_A.weight * (8.0 / 4)
    torch.testing.assert_close(merged['transformer.h.1.attn.c_attn.weight'], expected, rtol=0, atol=1e-6)
    fc = lora.transformer.h[0].mlp.c_fc
    expected = fc.main_weight.weight + fc.lora_B.weight @ fc.lora_A.weight * (8.0 / 2)
    torch.testing.assert_close(merged['transformer.h.0.mlp.c_fc.weight'], expected, rtol=0, atol=1e-6)
    wte = lora.transformer.wte
    expected = wte.main_weight.weight + wte.lora_A.weight @ wte.lora_B.weight.T * (8.0 / 3)
    torch.testing.assert_close(merged['transformer.wte.weight'], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged['lm_head.weight'], expected, rtol=0, atol=1e-6)
    # biases survive the merge untouched (the seed's version dropped main_weight.bias)
    assert torch.equal(merged['transformer.h.1.attn.c_attn.bias'], attn.main_weight.bias)
    assert not any('lora_' in k or 'main_weight' in k for k in merged)


def test_fresh_adapter_changes_nothing_and_init_is_loras():
    lora = make(attn_lora_rank=4, mlp_lora_rank=4, embedding_mode='lora', embedding_rank=4)
    for m in lora.modules():
        if isinstance(m, LoRALinear):
            assert torch.count_nonzero(m.lora_B.weight) == 0 and m.lora_A.weight.abs().sum() > 0
        if isinstance(m, LoRAEmbedding):
            assert torch.count_nonzero(m.lora_A.weight) == 0 and m.lora_B.weight.abs().sum() > 0
    # nanoGPT's scaled init of residual projections still reaches c_proj under main_weight
    std = 0.02 / (2 * TINY['n_layer']) ** 0.5
    w = lora.transformer.h[0].mlp.c_proj.main_weight.weight
    assert abs(w.std().item() - std) < 0.3 * std


def test_trainable_set():
    standard = make()
    assert all(p.requires_grad for p in standard.parameters())
    lora = make(attn_lora_rank=4)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all('.lora_A.' in n or '.lora_B.' in n for n in trainable)
    assert len(trainable) == 2 * 2 * TINY['n_layer']  # A and B of c_attn and c_proj per layer
    extra = make(attn_lora_rank=4, lora_train_norms_biases=True)
    trainable = {n for n, p in extra.named_parameters() if p.requires_grad}
    assert 'transformer.ln_f.weight' in trainable and 'transformer.h.0.attn.c_attn.main_weight.bias' in trainable
    assert 'transformer.h.0.attn.c_attn.main_weight.weight' not in trainable


def test_standard_state_loads_into_lora_model_with_identical_logits():
    standard = make(seed=3)
    lora = make(seed=4, attn_lora_rank=4, mlp_lora_rank=4, embedding_mode='lora', embedding_rank=4)
    perturb_adapters(lora)  # stale adapters must be reset by the load, not kept
    report = load_universal_state_dict(lora, standard.state_dict())
    idx = batch()
    torch.testing.assert_close(logits_of(lora, idx), logits_of(standard, idx), rtol=0, atol=1e-5)
    assert report['remapped'] == 2 * 8 + 1 # per layer c_attn, c_proj, c_fc, mlp.c_proj: weight and bias; wte
    assert 'transformer.wte' in report['fresh_lora'] and 'transformer.h.1.mlp.c_proj' in report['fresh_lora']


def test_rank_16_state_continues_at_rank_32_with_the_same_function():
    r16 = perturb_adapters(make(n_embd=64, attn_lora_rank=16, embedding_mode='lora', embedding_rank=16, lora_alpha=32.0))
    r32 = make(seed=9, n_embd=64, attn_lora_rank=32, embedding_mode='lora', embedding_rank=32, lora_alpha=32.0)
    idx = batch()
    # through the universal (merged) checkpoint
    load_universal_state_dict(r32, r16.get_merged_state_dict())
    torch.testing.assert_close(logits_of(r32, idx), logits_of(r16, idx), rtol=0, atol=1e-5)
    # and straight from the raw LoRA-shaped state dict (merged on the fly with the source's alpha)
    r32b = make(seed=9, n_embd=64, attn_lora_rank=32)
    report = load_universal_state_dict(r32b, r16.state_dict(), lora_alpha=32.0)
    torch.testing.assert_close(logits_of(r32b, idx), logits_of(r16, idx), rtol=0, atol=1e-5)
    assert 'transformer.h.0.attn.c_attn' in report['merged_source_lora']
    with pytest.raises(CheckpointMismatchError, match='lora_alpha'):
        load_universal_state_dict(make(), r16.state_dict())  # alpha unknown: refuse rather than guess


def test_lora_state_loads_into_standard_model():
    lora = perturb_adapters(make(attn_lora_rank=4, mlp_lora_rank=4, lora_alpha=4.0))
    standard = make(seed=7)
    load_universal_state_dict(standard, lora.state_dict(), lora_alpha=4.0)
    idx = batch()
    torch.testing.assert_close(logits_of(standard, idx), logits_of(lora, idx), rtol=0, atol=1e-5)


@pytest.mark.parametrize('prefix', ['_orig_mod.', 'module.', 'module._orig_mod.'])
def test_wrapped_checkpoints_load(prefix):
    source = make(seed=3)
    sd = {prefix + k: v for k, v in source.state_dict().items()}
    # old nanoGPT saved its causal mask as a buffer named attn.bias: not a weight, dropped
    sd.update({f'{prefix}transformer.h.{i}.attn.bias': torch.ones(1, 1, 16, 16).tril() for i in range(2)})
    target = make(seed=4, attn_lora_rank=2)
    load_universal_state_dict(target, sd)
    idx = batch()
    torch.testing.assert_close(logits_of(target, idx), logits_of(source, idx), rtol=0, atol=1e-5)


def test_compiled_model_state_dict_loads():
    # the real thing, not a hand-made prefix: what torch.compile's wrapper puts in a state dict
    source = make(seed=3)
    compiled = torch.compile(source)
    keys = list(compiled.state_dict())
    assert keys[0].startswith('_orig_mod.')
    target = make(seed=4)
    load_universal_state_dict(target, compiled.state_dict())
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize('change', [dict(n_layer=3), dict(n_embd=48), dict(vocab_size=70), dict(bias=False)])
def test_other_architecture_raises_clear_error_and_changes_nothing(change):
    source = make(seed=3, **change)
    target = make(seed=4, attn_lora_rank=2)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(CheckpointMismatchError) as err:
        load_universal_state_dict(target, source.state_dict(), source='ckpt.pt')
    message = str(err.value)
    assert 'ckpt.pt' in message and 'Nothing was loaded' in message
    if 'n_embd' in change:
        assert 'wrong shape' in message and '[67, 48]' in message and '[67, 32]' in message
    if 'n_layer' in change:
        assert 'transformer.h.2' in message and 'no place in the model' in message
    if 'bias' in change:
        assert 'missing' in message and '.bias' in message
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize('on_meta', [False, True])
@pytest.mark.parametrize('adapters', [{}, dict(attn_lora_rank=2), dict(mlp_lora_rank=2)])
@pytest.mark.parametrize('bias', [True, False])
def test_a_missing_weight_is_refused_and_changes_nothing(bias, adapters, on_meta):
    """ only LoRA factors may be missing: a missing base weight is named, and the model is left as it was """
    sd = make(seed=3, bias=bias).state_dict()
    del sd['transformer.h.0.mlp.c_fc.weight']
    config = GPTConfig(**{**TINY, 'bias': bias, **adapters})
    target = GPT.on_meta(config) if on_meta else perturb_adapters(make(seed=4, bias=bias, **adapters))
    before = copy.deepcopy(target.state_dict())
    trainable = [p.requires_grad for p in target.parameters()]
    with pytest.raises(CheckpointMismatchError) as err:
        load_universal_state_dict(target, sd, source='ckpt.pt')
    key = 'transformer.h.0.mlp.c_fc.' + ('main_weight.weight' if adapters.get('mlp_lora_rank') else 'weight')
    assert f'1 keys are missing from ckpt.pt: {key}.' in str(err.value) and 'Nothing was loaded' in str(err.value)
    after = target.state_dict()
    assert list(after) == list(before) and trainable == [p.requires_grad for p in target.parameters()]
    for k, v in before.items():
        assert (after[k].is_meta if on_meta else torch.equal(after[k], v)), k # nothing assigned, copied or reset
    # the rule itself: only the keys allowed to be missing may be
    target = make(**adapters).state_dict()
    mapped = {k: v for k, v in target.items() if k != key}
    with pytest.raises(CheckpointMismatchError, match=f'1 keys are missing from x: {key}'):
        check_state_dict_fits(target, mapped, 'x', 'GPT', allowed_missing=[k for k in target if 'lora_' in k])
    check_state_dict_fits(target, mapped, 'x', 'GPT', allowed_missing=[key])


def test_untied_head_is_refused():
    sd = make().state_dict()
    sd['lm_head.weight'] = sd['lm_head.weight'].clone() + 1.0
    with pytest.raises(CheckpointMismatchError, match='ties'):
        load_universal_state_dict(make(), sd)
    sd['lm_head.weight'] = sd['transformer.wte.weight'].clone() # an equal copy (safetensors stores no sharing): tied
    target = make(seed=1)
    load_universal_state_dict(target, sd)
    assert torch.equal(target.lm_head.weight, sd['transformer.wte.weight'])


def test_lora_factors_that_do_not_fit_their_weight_are_refused():
    sd = perturb_adapters(make(attn_lora_rank=4)).state_dict()
    sd['transformer.h.0.attn.c_attn.lora_B.weight'] = torch.zeros(5, 4) # B [out, r] made for a 5-wide layer
    with pytest.raises(CheckpointMismatchError, match=r'A \[4, 32\], B \[5, 4\] do not fit a weight of shape \[96, 32'):
        load_universal_state_dict(make(), sd, lora_alpha=1.0)


@pytest.mark.parametrize('value', [float('nan'), float('inf')])
def test_merge_refuses_nan_adapter(value):
    lora = make(attn_lora_rank=4)
    with torch.no_grad(): # one bad entry of B, A positive: the update's row is all +inf (or NaN), no inf - inf
        lora.transformer.h[0].attn.c_proj.lora_A.weight[0] = 1.0
        lora.transformer.h[0].attn.c_proj.lora_B.weight[0, 0] = value
    with pytest.raises(CheckpointMismatchError, match='NaN/inf'):
        lora.get_merged_state_dict()


def test_merge_leaves_training_untouched():
    """ merging in the middle of a step (between backward and step) must not change that step """
    def run(merge_midway):
        lora = perturb_adapters(make(attn_lora_rank=4, embedding_mode='lora', embedding_rank=4)).train()
        opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
        flags = [p.requires_grad for p in lora.parameters()]
        for step in range(3):
            idx = batch(seed=step)
            _, loss = lora(idx, targets=idx)
            loss.backward()
            if merge_midway:
                merged = lora.get_merged_state_dict()
                merged['transformer.wte.weight'].add_(1.0)  # merged tensors are copies: writing to them is harmless
            opt.step()
            opt.zero_grad()
        assert flags == [p.requires_grad for p in lora.parameters()]
        return lora.state_dict(), opt.state_dict()
    (sd_a, opt_a), (sd_b, opt_b) = run(False), run(True)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    for i, s in opt_a['state'].items():
        assert torch.equal(s['exp_avg'], opt_b['state'][i]['exp_avg'])


def test_merge_keeps_stored_dtype():
    lora = perturb_adapters(make(attn_lora_rank=4)).to(torch.bfloat16)
    merged = lora.get_merged_state_dict()
    assert merged['transformer.h.0.attn.c_attn.weight'].dtype == torch.bfloat16
    attn = lora.transformer.h[0].attn.c_attn
    exact = attn.main_weight.weight.float() + attn.lora_B.weight.float() @ attn.lora_A.weight.float() * (1.0 / 4)
    # one rounding to bf16 at the end, not one per operation
    assert torch.equal(merged['transformer.h.0.attn.c_attn.weight'], exact.to(torch.bfloat16))


def test_same_config_resume_restores_adapters_exactly():
    cfg = dict(attn_lora_rank=4, mlp_lora_rank=2, embedding_mode='lora', embedding_rank=3, lora_alpha=8.0)
    trained = perturb_adapters(make(**cfg))
    merged = trained.get_merged_state_dict()
    factors = {k: v for k, v in trained.state_dict().items() if 'lora_' in k}
    resumed = make(seed=11, **cfg)
    report = load_universal_state_dict(resumed, merged, adapters={'_orig_mod.' + k: v for k, v in factors.items()})
    assert report['fresh_lora'] == [] and len(report['restored_lora']) == 2 * 2 * 2 + 1
    for k, v in trained.state_dict().items():
        if 'lora_' in k:
            assert torch.equal(resumed.state_dict()[k], v), k  # factors bit-exact
        else:
            torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6)  # base = merged - update
    assert resumed.lm_head.weight is resumed.transformer.wte.main_weight.weight
    idx = batch()
    torch.testing.assert_close(logits_of(resumed, idx), logits_of(trained, idx), rtol=0, atol=1e-5)
    # factors of another rank are not restored: those adapters start fresh and the function is still preserved
    other = make(seed=12, **{**cfg, 'attn_lora_rank': 8})
    report = load_universal_state_dict(other, merged, adapters=factors)
    assert 'transformer.h.0.attn.c_attn' in report['fresh_lora'] and 'transformer.h.0.mlp.c_fc' in report['restored_lora']
    torch.testing.assert_close(logits_of(other, idx), logits_of(trained, idx), rtol=0, atol=1e-5)
