# tiny: the quick start. A 4-layer, 1.3M-parameter model that trains on a laptop CPU from a fresh clone: train.py
# prepares data/openstax_sample from the sample in assets/ on first use (prepare_fineweb.ensure_sample, ~1 s).
# Measured on 2 cores (load average 1-2 from other jobs): 2 min 38 s for preparation + 2,000 steps of 1,024 tokens
# (0.96 epochs of the sample, ~75 ms a step); validation 2.18 / 2.02 / 1.91 / 1.84 bits per byte at steps
# 500 / 1000 / 1500 / 2000 (the same run at 1,200 steps: 1.98; a 6-layer d=192 model
# for 1,000 steps, the same time: 1.98). Its sample is English words, loosely strung ("...the presence of bacterial
# cells to the specific form of skin...").
# Every architectural feature of the big presets is on: GQA (4 query heads share 2 KV heads), RoPE, SwiGLU.
# Why its own 4,096-token tokenizer (assets/openstax_4k.json, prepare_tokenizer.py on the sample) and not gpt2:
# at d=128 gpt2's 50,257-row output layer is 90% of the model's FLOPs (6.4M of 7.2M parameters), so the same two
# minutes see ~8x fewer tokens. With 4,096 rows the whole step costs 8x less (0.11 vs 0.94 CPU-seconds per
# 1,024 tokens, one thread), and bits per byte, the number we compare, does not depend on the tokenizer.
out_dir = "out/tiny"
data_dir = "data/openstax_sample"
tokenizer = "assets/openstax_4k.json"
vocab_size = 4096
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 2
ffn_hidden = 384
block_size = 128
batch_size = 8
total_batch_tokens = 1024           # 8 x 128: one micro-batch per step
max_iters = 2000                    # more steps of a small model beat fewer of a larger one here (above)
eval_interval = 500
eval_iters = 8
log_interval = 100
learning_rate = 5e-3                # small models take large learning rates
min_lr = 3e-4
warmup_iters = 30
weight_decay = 0.1
compile = False
sample_prompt = "The cell membrane is"  # the run ends by printing the model's continuation of this
