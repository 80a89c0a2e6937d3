# auto_g_nano_1b (geoffsee/auto-g-nano-1b): 24 layers, d=1792, 14 query heads sharing 2 KV heads of dim 128,
# SwiGLU 5376, RoPE theta 500000, untied embeddings, gpt2 vocabulary, context 1024: exactly 1,050,002,688
# parameters. Data: 0.40 fineweb-edu-dedup / 0.25 cosmopedia-v2 / 0.35 Python (prepare_fineweb.py --mix smollm),
# ~13B tokens. The 1B run's optimizer settings are not published; these are its predecessor's (auto-g-nano
# train.py): AdamW 3e-4, betas (0.9, 0.95), wd 0.1, warmup 1000, cosine to 3e-5, 131,072 tokens/step.
out_dir = "out/auto_g_nano_1b"
data_dir = "data/smollm_mix"
n_layer = 24
n_embd = 1792
n_head = 14
n_kv_head = 2
head_dim = 128
ffn_hidden = 5376
rope_theta = 500000.0
tie_embeddings = False
vocab_size = 50257
vocab_pad_multiple = 64             # compute on 50304 rows; the count above is for the 50257 real ones
block_size = 1024
batch_size = 16
total_batch_tokens = 131072
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 1000
lr_schedule = "cosine"
max_iters = 99182                   # 13B tokens / 131,072
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
