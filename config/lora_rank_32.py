# Example 3, step 2: continue the rank-16 run at rank 32. The checkpoint holds the merged weights, so the
# rank-16 updates are kept in the base and new rank-32 adapters start at zero: nothing learned is lost.
resume_from = 'out-lora-r16'
out_dir = 'out-lora-r32'
attn_lora_rank = 32
mlp_lora_rank = 32
lora_alpha = 16.0
max_iters = 900
decay_lr = False
learning_rate = 1e-3
eval_interval = 100
eval_iters = 20
log_interval = 50
