# Example 2, step 1: fine-tune with LoRA. Starts from the standard model of config/train_standard.py when
# out-standard exists; without it, trains adapters over a freshly initialised base (a demo only: a frozen
# random base learns little). Then: python train.py config/deploy_standard.py
# On a GPU: device = 'cuda', dtype = 'bfloat16', and raise max_iters.
import os
resume_from = 'out-standard' if os.path.isdir('out-standard') else ''
out_dir = 'out-lora'
attn_lora_rank = 16
mlp_lora_rank = 16
embedding_mode = 'lora'
embedding_rank = 16
lora_alpha = 16.0
lora_dropout = 0.05
max_iters = 800
decay_lr = False
learning_rate = 1e-3
eval_interval = 100
eval_iters = 20
log_interval = 50
