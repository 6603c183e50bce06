# The LoRA half of test_checkpoint_compatibility.py: adapters on attention, MLP and the embedding.
# Use after config/test_checkpoint_compatibility.py (later arguments override earlier ones).
attn_lora_rank = 4
mlp_lora_rank = 4
embedding_mode = 'lora'
embedding_rank = 4
lora_alpha = 8.0
learning_rate = 3e-3
