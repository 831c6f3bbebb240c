#!/usr/bin/env bash
# A short GPU check for machines that have one: mixed-precision training for a few
# hundred steps (images/s, peak memory), export, ONNX Runtime inference, and a short
# serving benchmark. Prints figures; exits non-zero if a step fails.
#   bash scripts/gpu_check.sh [output folder]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check}}"
mkdir -p "$out"
export WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
# the Python that has cycleml (a virtual environment's python, or python3)
py="${PYTHON:-$(command -v python || command -v python3)}"
"$py" - <<'PY' 2>&1 | tee "$out/train.txt"
import time, torch
from cycleml.models.backbones import TorchvisionBackbone
assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
name = torch.cuda.get_device_name(0)
precision = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
net = TorchvisionBackbone("resnet18", in_channels=3, num_classes=10).to(dev).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
x = torch.randn(256, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
y = torch.randint(0, 10, (256,), device=dev)
torch.cuda.reset_peak_memory_stats()
def step():
    with torch.autocast("cuda", dtype=precision):
        loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return loss
for _ in range(20): step()
torch.cuda.synchronize(); t = time.perf_counter(); steps = 300
for _ in range(steps): loss = step()
torch.cuda.synchronize(); dt = time.perf_counter() - t
print(f"device: {name}")
print(f"resnet18 32x32 batch 256 {precision}: {steps * 256 / dt:,.0f} images/s, "
      f"peak memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB, loss {loss.item():.3f}")
PY
"$py" -m cycleml train trainer=gpu trainer.max_epochs=3 logger=csv callbacks.progress_bar=null \
  paths.log_dir="$out/logs" 2>&1 | tail -n 12 | tee "$out/cycleml_train.txt"
run=$(ls -td "$out"/logs/train/runs/*/ | head -n 1)
"$py" -m cycleml export ckpt_path="$run" export.out_dir="$out/bundle" export.fp16=true 2>&1 \
  | tail -n 5 | tee "$out/export.txt"
"$py" - "$out/bundle" <<'PY' 2>&1 | tee "$out/inference.txt"
import sys, time, numpy as np, onnxruntime as ort
from cycleml.inference import Predictor, load_bundle
print("ONNX Runtime providers:", ort.get_available_providers())
p = Predictor(load_bundle(sys.argv[1]))
x = np.random.default_rng(0).integers(0, 256, (256, *p.input_shape[1:]), dtype=np.uint8)
p.run(x); t = time.perf_counter(); n = 20
for _ in range(n): p.run(x)
print(f"bundle inference, batch 256: {n * 256 / (time.perf_counter() - t):,.0f} images/s")
PY
# servers, client and runtime share the host's cores (see benchmarks/serving.py for
# --server-cpus/--client-cpus where CPU affinity is enforced)
timeout 300 "$py" benchmarks/serving.py --models resnet18 --quick 2>&1 \
  | tail -n 60 | tee "$out/serving.txt" || true
