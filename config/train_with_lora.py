# Example 1, step 2: continue the standard model of config/train_standard.py with LoRA adapters.
# The base architecture comes from the checkpoint; its weights become the frozen main weights and fresh
# adapters start at zero, so the first evaluation equals the checkpoint's. ~40 s on a laptop CPU.
# On a GPU: device = 'cuda', dtype = 'bfloat16', and raise max_iters.
resume_from = 'out-standard'
out_dir = 'out-lora'
attn_lora_rank = 16
mlp_lora_rank = 16
embedding_mode = 'lora'
embedding_rank = 16
lora_alpha = 16.0 # update scale alpha / r = 1
max_iters = 800 # the checkpoint is at step 500: 300 more steps
decay_lr = False # a constant rate for the adapters
learning_rate = 1e-3
eval_interval = 100
eval_iters = 20
log_interval = 50
