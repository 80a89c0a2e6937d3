# sft_lille: Lille-130M-instruct's recipe (Lille's train.py in fine-tune mode) on the lille_130m checkpoint:
# lr 1e-5, 3 epochs, warmup 1000 steps, weight decay 0.01, the same Sophia optimizer as its pretraining, loss on
# the answer only. Lille's template is `bos <|user|>msg<|assistant|>reply eos` with <|user|>/<|assistant|> in its own
# tokenizer: the `lime` format is the same shape with our padding-slot tags <user>/<assistant>.
# Lille padded every example to 512 (--layout pad). Its SFT data is Nikity/Kyoto-Corpus (the model card; no counts
# or weights given: the whole set, once per epoch):
#   python prepare_sft.py --format lime --tokenizer gpt2 --layout pad --block_size 512 \
#       --out_dir data/sft_lille_gpt2 --source kyoto
# Kyoto-Corpus's fields are not confirmed (prepare_sft.py says which forms it reads). Fallbacks, same flags: with the
# hub but not that set, --source no_robots --source alpaca_cleaned; with no network, the local copies
# --source alpaca_gpt4_local --source dolly_local.
init_from = "out/lille_130m"
out_dir = "out/sft_lille"
data_dir = "data/sft_lille_gpt2"
chat_format = "lime"
optimizer = "sophia"
learning_rate = 1e-5
min_lr = 1e-6
lr_schedule = "cosine"
warmup_frac = 0.0
warmup_iters = 1000
epochs = 3.0
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.95
sophia_rho = 0.05
batch_size = 16
total_batch_tokens = 16384          # 16 x 512 x 2, Lille's step
eval_interval = 200
eval_iters = 10
