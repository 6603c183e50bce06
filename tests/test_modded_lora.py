"""
LoRA on the modded models' stacked weights (what finetune_hindi_xnli.py --lora_rank trains): each matrix of a stack
is W + B @ A * alpha / r, only the factors train, and a save (merged weights + factors) restores the same function.
"""

import torch

from model import GPTBatched, add_modded_lora, modded_lora_state, set_modded_lora_factors

V, L, H, DH = 40, 12, 2, 8
D = H * DH
IDS = torch.tensor([3, 17, 0, 39, 17, 8])


def randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name == 'scalars' else torch.randn_like(p) * 0.5)
    return model.eval()


def test_modded_lora_is_w_plus_b_a_times_alpha_over_r_and_restores_exactly():
    model = randomised(GPTBatched(V, L, H, D, max_seq_len=16, head_dim=DH))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_modded_lora(model, rank=2, alpha=6.0)
    lora = model.blocks[0].attn.parametrizations.qkvo_w[0]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    assert lora.scale == 3.0 and {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if '.lora_' in n} # only the factors train
    expected = base['blocks.0.attn.qkvo_w'] + lora.lora_B @ lora.lora_A * 3.0
    assert torch.allclose(model.blocks[0].attn.qkvo_w, expected, atol=1e-5)
    merged, factors = modded_lora_state(model)
    assert torch.allclose(merged['blocks.0.attn.qkvo_w'], expected, atol=1e-5)
    assert len(factors) == 2 * (3 * L - 1) # qkvo_w (not in layer 7), fc_w and proj_w: A and B each
    with torch.no_grad():
        features = model.forward_features(IDS[None])
        again = GPTBatched(V, L, H, D, max_seq_len=16, head_dim=DH)
        again.load_state_dict(merged, strict=True)
        add_modded_lora(again, rank=2, alpha=6.0)
        set_modded_lora_factors(again, factors)
        assert (again.forward_features(IDS[None]) - features).abs().max() < 1e-4
        assert torch.equal(again.blocks[3].mlp.parametrizations.fc_w[0].lora_B, model.blocks[3].mlp.parametrizations.fc_w[0].lora_B)
