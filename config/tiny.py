# tiny: a 4-layer model that trains on a laptop CPU in under two minutes on 2 cores (the quick start).
# Every architectural feature of the big presets is on: GQA (4 query heads share 2 KV heads), RoPE, SwiGLU.
out_dir = "out/tiny"
data_dir = "data/openstax_gpt2"
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 2
ffn_hidden = 384
block_size = 128
batch_size = 8
total_batch_tokens = 1024           # 8 x 128: one micro-batch per step
max_iters = 150
eval_interval = 50
eval_iters = 8
log_interval = 10
learning_rate = 3e-3                # small models take large learning rates
min_lr = 3e-4
warmup_iters = 15
weight_decay = 0.1
compile = False
