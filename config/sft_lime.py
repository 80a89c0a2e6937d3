# sft_lime: LIME-1B-instruct's format, `[context] <user> instruction <assistant> response <eos>`, on the lime_1b
# checkpoint (context 512). The base model's card (anarlavrenov/lime-1b) gives the SFT mixture as ~97k examples of
# projecte-aina/RAG_Multilingual, databricks-dolly-15k, HuggingFaceH4/no_robots, CohereLabs/aya_dataset and
# yahma/alpaca-cleaned, with no per-set counts or weights: each set whole (weight 1), the two multilingual ones in
# English (prepare_sft.py's default; LIME is an English model), RAG_Multilingual's passages as the context:
#   python prepare_sft.py --format lime --tokenizer gpt2 --block_size 512 --out_dir data/sft_lime_gpt2 \
#       --source rag_multilingual --source dolly --source no_robots --source aya --source alpaca_cleaned
# (lime-1b-instruct's card lists other sets: no_robots, dolly-15k, everyday-conversations, Magpie-Pro-300K-Filtered,
# WebInstruct-verified, GPT4-LLM-Cleaned, alpaca-cleaned, synthetic-instruct-gptj-pairwise.) Fallbacks, same flags:
# with the hub but not the seed's sets, --source no_robots --source dolly --source alpaca_cleaned --source rag (a
# retrieval set standing in for RAG_Multilingual); with no network, --source dolly_local --source alpaca_gpt4_local
# (no retrieval context among the local copies).
# LIME's SFT hyperparameters are not published (the card's training section is cut off in every copy we could
# read): a documented choice, small lr for a 1B model, 2 epochs, linear (poly 1) decay like its pretraining.
init_from = "out/lime_1b"
out_dir = "out/sft_lime"
data_dir = "data/sft_lime_gpt2"
chat_format = "lime"
learning_rate = 2e-5
min_lr = 2e-6
lr_schedule = "poly"
poly_power = 1.0
warmup_frac = 0.03
epochs = 2.0
weight_decay = 0.0
batch_size = 32
total_batch_tokens = 65536          # 128 x 512
eval_interval = 100
eval_iters = 10
