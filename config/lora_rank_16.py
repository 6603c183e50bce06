# Example 3, step 1: LoRA at rank 16 (on the standard model of config/train_standard.py when out-standard
# exists, else over a fresh base). Then: python train.py config/lora_rank_32.py
# On a GPU: device = 'cuda', dtype = 'bfloat16', and raise max_iters.
import os
resume_from = 'out-standard' if os.path.isdir('out-standard') else ''
out_dir = 'out-lora-r16'
attn_lora_rank = 16
mlp_lora_rank = 16
lora_alpha = 16.0
max_iters = 700
decay_lr = False
learning_rate = 1e-3
eval_interval = 100
eval_iters = 20
log_interval = 50
