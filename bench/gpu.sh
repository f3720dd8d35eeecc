#!/usr/bin/env bash
# GPU checks for a lent CUDA machine, from the repository root: bash bench/gpu.sh [compile]
# Writes what it measures to stdout; BENCHMARKS.md records the results.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name(), 'nccl', torch.distributed.is_nccl_available())"
if [ "${1:-}" = compile ]; then
  python3 bench/gpu.py --compile 2>&1 | tr "\r" "\n" | grep -v -E "it/s|^ *$"
  exit
fi
echo "== launcher: more GPUs than visible is refused before anything starts"
python3 launch_ddp.py --num_gpus 2 --demo; echo "exit code $?"
echo "== the GPU tests (side-stream cache batches, nvjpeg decoding, the launcher's GPU count), where pytest is installed"
python3 -m pytest -q -p no:cacheprovider tests/test_image_cache.py tests/test_cache_jpeg.py tests/test_device_decode.py \
  tests/test_launch_ddp.py -k "gpu or side_stream or without_importing_torch" 2>&1 | tail -3
echo "== NCCL: a one-rank process group on this GPU (two ranks need two GPUs: NCCL refuses two ranks on one device)"
python3 - <<'PY'
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
x = torch.ones(4, device="cuda"); dist.all_reduce(x); print("nccl all_reduce ok:", x.tolist()); dist.destroy_process_group()
PY
for dtype in float16 bfloat16; do
  echo "== demo on the GPU through launch_ddp.py, AMP $dtype"
  rm -rf /tmp/demo_$dtype && mkdir -p /tmp/demo_$dtype
  start=$(date +%s.%N)
  python3 launch_ddp.py --demo --num_gpus 1 --use_amp --amp_dtype $dtype --channels_last \
    --checkpoint_dir /tmp/demo_$dtype/checkpoints --log_dir /tmp/demo_$dtype/logs 2>&1 | tr '\r' '\n' | grep -E "^(Epoch [0-9]+/[0-9]+ \||Done|Training|error)"
  echo "wall $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
done
python3 bench/gpu.py 2>&1 | tr "\r" "\n" | grep -v -E "it/s|^ *$"
python3 bench/profile_cache_gpu.py crop sweep 2>&1 | tr "\r" "\n" | grep -v -E "it/s|^ *$"
echo "== fine-tuning: a frozen backbone and float16 AMP, step time and peak GPU memory"
python3 bench/finetune.py --repeats 2 --results_dir /tmp/gpu_results 2>&1 | tail -8
