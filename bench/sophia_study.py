"""
bench/sophia_study.py — issue #5's study, Sophia at Lille-130M's settings against a tuned AdamW, now one setting of
bench/optim_study.py (which adds Muon and gpt2_124m): lille_130m, 600 steps x 16,384 tokens (Lille's batch; 9.8M
tokens, under one epoch of OpenStax), warmup 30, AdamW and Sophia arms only, results named sophia_study.

What changed since bench/results/sophia_study_h100/ was measured: every arm now decays to 10% of its peak lr
(that study decayed AdamW to 0), and the AdamW sweep is 3e-4 .. 2.4e-3 (it was 2.5e-4 .. 2e-3). Any
optim_study flag given here overrides these (argparse keeps the last occurrence):

    python bench/sophia_study.py --data_dir=data/openstax_gpt2     # ~7 minutes on an H100; $BENCH_OUT for results
    python bench/sophia_study.py --plot_only                        # re-analyse the runs in out/sophia_study
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from bench import optim_study  # noqa: E402

SETTINGS = ["--models=lille_130m", "--runs=adamw_lr6e-4,sophia_lr1e-4,adamw_lr3e-4,adamw_lr1.2e-3,sophia_lr3e-4,"
            "adamw_lr2.4e-3", "--max_iters=600", "--tokens_per_step=16384", "--warmup_iters=30",
            "--name=sophia_study", "--out_root=out/sophia_study"]


def main(argv=None):
    return optim_study.main(SETTINGS + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
