# lille_130m (Nikityyy/lille, HF Nikity/lille-130m): 24 layers, d=640, 10 query heads sharing 2 KV heads (GQA),
# head_dim 64, RoPE (theta 10000), RMSNorm (eps 1e-5), SwiGLU F=1792, tied embeddings, context 512.
# Trained with Sophia: lr 1e-4, betas (0.9, 0.95), rho 0.05, weight decay 0.2, Hessian refreshed every 10 steps,
# 16 x 512 x 2 = 16,384 tokens/step, warmup 2000 then cosine to 1e-5, 4.27B tokens (Lille's train.py).
# Tokenizer: Lille's own 32,768-token "Hastings" BPE is not public, so we train one of the same size (then the count
# is exactly Lille's 127,171,200) and tokenize the data with it:
#   python prepare_tokenizer.py --vocab_size 32768 --max_chars 2e9 --out data/tokenizers/fineweb_32k.json
#   python prepare_fineweb.py --tokenizer data/tokenizers/fineweb_32k.json --out_dir data/fineweb_edu_32k
# (with gpt2 instead: --tokenizer=gpt2 --vocab_size=50257 --data_dir=<gpt2 shards>, 138.4M parameters).
# Difference: Lille used dropout 0.1 in pretraining, nanoforge has no dropout.
# Speed: at 16 x 512 micro-batches the 24-layer model leaves each kernel launch little GPU work, so the host's
# launch cost decides. Measured through train.py on one H200 (bench/results/e2e.md, 2026-12-01, 54d73f5): our
# kernels ('auto') 194.5k tok/s, the twins fused by inductor ('torch', Sophia's unfused step too) 217.9k. Earlier,
# 'torch,sophia=triton' (twins + our fused Sophia step) measured 298k (issue #12, b185d11). So this preset runs the
# twins with our Sophia step until our kernels win here too; `--kernels_backend=auto` runs ours.
kernels_backend = "torch,sophia=triton"
out_dir = "out/lille_130m"
data_dir = "data/fineweb_edu_32k"
tokenizer = "data/tokenizers/fineweb_32k.json"
n_layer = 24
n_embd = 640
n_head = 10
n_kv_head = 2
ffn_hidden = 1792
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = True
vocab_size = 32768
block_size = 512
batch_size = 16
total_batch_tokens = 16384
optimizer = "sophia"
learning_rate = 1e-4
min_lr = 1e-5
beta1 = 0.9
beta2 = 0.95
sophia_rho = 0.05
weight_decay = 0.2
hess_interval = 10
grad_clip = 1.0
warmup_iters = 2000
lr_schedule = "cosine"
max_iters = 260620                  # 4.27B tokens / 16,384
