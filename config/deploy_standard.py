# Example 2, step 2 (and the end of example 1): resume the LoRA run as a standard model for deployment.
# No further training (max_iters = 0 is below the checkpoint's step): the adapters are already merged into
# the checkpoint's weights, the standard model is evaluated (it must match the LoRA run's evaluation) and
# saved without optimizer state. Then: python generate.py --checkpoint out-deploy
resume_from = 'out-lora'
out_dir = 'out-deploy'
max_iters = 0
save_optimizer = False
eval_iters = 20
