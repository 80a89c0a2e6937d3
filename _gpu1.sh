set -o pipefail
export PYTHONUNBUFFERED=1 NANOFORGE_COMMIT=7c22095
{
nvidia-smi -L; python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 110 python -m pytest -q -m gpu tests/test_switch.py tests/test_rmsnorm.py tests/test_rope.py tests/test_swiglu.py tests/test_attention.py -k "compile or launches or add_" 2>&1 | tail -25
timeout 170 python bench/step_profile.py config/lille_130m.py --kernels auto torch --steps 20 --profile --top 18
} 2>&1 | tee $OUT/log
