import torch
from model import GPT, GPTConfig, load_universal_state_dict, CheckpointMismatchError

base = dict(block_size=64, vocab_size=103, n_layer=4, n_head=4, n_embd=128)
standard = GPT(GPTConfig(**base))                      # or: the 'model' dict of a nanoGPT ckpt.pt
lora = GPT(GPTConfig(**base, attn_lora_rank=16, embedding_mode='lora', embedding_rank=16, lora_alpha=16.0))
report = load_universal_state_dict(lora, standard.state_dict())
print(report['remapped'], 'keys remapped;', len(report['fresh_lora']), 'adapters initialised fresh')

idx = torch.randint(0, 103, (2, 64))
optimizer = lora.configure_optimizers(0.1, 1e-2, (0.9, 0.99), 'cpu')  # only the LoRA factors train
for _ in range(3):
    loss = lora(idx, idx)[1]; loss.backward(); optimizer.step(); optimizer.zero_grad()

merged = lora.get_merged_state_dict()                  # plain nanoGPT keys, adapters merged in
deployed = GPT(GPTConfig(**base))
deployed.load_state_dict(merged, strict=True)
print('max |logits difference| LoRA vs deployed:', (lora(idx, idx)[0] - deployed(idx, idx)[0]).abs().max().item())

try:
    load_universal_state_dict(GPT(GPTConfig(**{**base, 'n_embd': 64})), merged, source='out/ckpt.pt')
except CheckpointMismatchError as e:
    print(e)
