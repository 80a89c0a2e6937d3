# tiny: the quick start. A 4-layer, 1.3M-parameter model that trains on a laptop CPU from a fresh clone: train.py
# prepares data/openstax_sample from the sample in assets/ on first use (prepare_fineweb.ensure_sample).
# Measured on 2 cores (2026-12-01, whole `python train.py config/tiny.py` processes, validation bits per byte at
# steps 500 / 1000 / 1500 / 2000, wall-clock; the same run varies by ~10 s with what else the machine does):
#   AdamW lr 1.25e-3, 2,000 steps   2.04 / 1.84 / 1.75 / 1.69    151 s
#   AdamW lr 2.5e-3,  2,000 steps   2.01 / 1.83 / 1.72 / 1.67    153 s   (AdamW's best of the sweep)
#   AdamW lr 3.5e-3,  2,000 steps   2.03 / 1.85 / 1.73 / 1.67    165 s
#   AdamW lr 5e-3,    2,000 steps   2.18 / 2.02 / 1.91 / 1.84    155 s   (the preset until Muon; 1e-2: 1.89)
#   Muon 0.02,        2,000 steps   1.94 / 1.80 / 1.67 / 1.60    166 s   (its AdamW part at 2.5e-3: 1.63)
#   Muon 0.02,        1,500 steps   1.92 / 1.76 / 1.66           133 s   (muon_lr 0.04: 1.68; wsd schedule: 1.67)
# So Muon (kernels/muon.py: orthogonalised momentum for the blocks' matrices, AdamW at learning_rate for the
# embedding and gains) ends 0.07 bits per byte below the best AdamW at 7% more time a step, and passes AdamW's best
# final loss within 1,500 steps: 75% of the tokens, 87% of the wall-clock. 1,800 steps keep the run, data
# preparation included, well inside 3 minutes. Its sample is English words, loosely strung ("The cell membrane
# is called a complementary and the strand of the DNA strand that bind to the single-old sune.").
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
max_iters = 1800                    # (at 2,000 steps / 1,024 tokens: a 6-layer d=192 model for 1,000 steps
                                    # reached 1.98 with AdamW, the same as this one for 1,200: more steps win)
eval_interval = 500
eval_iters = 8
log_interval = 100
optimizer = "muon"
muon_lr = 0.02                      # the blocks' matrices (modded-nanogpt's and nanochat's value)
learning_rate = 5e-3                # AdamW's part: embedding, gains (small models take large learning rates)
min_lr = 3e-4
warmup_iters = 30
weight_decay = 0.1
compile = False
sample_prompt = "The cell membrane is"  # the run ends by printing the model's continuation of this
