#!/bin/bash
# tfcli's checks on a lent CUDA machine (not run by CI, which has no GPU). A device machine has no
# internet, so the command that runs this must carry `.gpu/` (ignored by git) holding:
#   .gpu/ts-train.txt, .gpu/ts-val.txt  tinyshakespeare split 90/10 (head -c 1003854 / the rest)
#   .gpu/whl/*.whl                      the typer, rich, tqdm (and pydantic) wheels for its Python
# Log: $OUT/log.txt. Takes about 4 minutes on an H100 once the machine is up.
export PYTHONUNBUFFERED=1 NO_COLOR=1
cd "$(dirname "$0")/.." || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
T="python3 -m tfcli"
s() { echo; echo "== $(date +%T) $*"; }
{
s env
nvidia-smi -L
python3 -c "import torch,typer,rich,tqdm,safetensors,sys;print(sys.version.split()[0],torch.__version__,typer.__version__,tqdm.__version__,safetensors.__version__,torch.cuda.get_device_name())"
s pytest tests/test_cuda.py
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -40
s train default, --time 300, tinyshakespeare 90/10
t0=$SECONDS; timeout 200 $T train .gpu/ts-train.txt --val .gpu/ts-val.txt --time 300 --out runs/g1 </dev/null 2>&1 | tail -45; echo "wall $((SECONDS-t0)) s"
s eval
timeout 60 $T eval .gpu/ts-val.txt -m runs/g1 --device cuda 2>&1 | tail -5
s sample cuda
timeout 60 $T sample -m runs/g1 --device cuda -n 300 --seed 1 --prompt "ROMEO:" 2>&1 | tail -15
timeout 60 $T sample -m runs/g1 --device cuda -n 120 --num-samples 16 --seed 1 --json 2>&1 | head -c 700; echo
s sample cpu of the gpu-trained model, greedy, vs cuda greedy
timeout 60 $T sample -m runs/g1 --temp 0 -n 200 --prompt "KING:" > /tmp/cpu.txt 2>/dev/null
timeout 60 $T sample -m runs/g1 --device cuda --temp 0 -n 200 --prompt "KING:" > /tmp/gpu.txt 2>/dev/null
cmp /tmp/cpu.txt /tmp/gpu.txt && echo greedy-same || { echo greedy-differs; head -c 300 /tmp/cpu.txt; echo; head -c 300 /tmp/gpu.txt; }
s inspect-attention cuda
timeout 60 $T inspect-attention -m runs/g1 --prompt "To be, or not to be" 2>&1 | head -30
s ctrl-c after 25 s, then resume
timeout --preserve-status -s INT 25 $T train .gpu/ts-train.txt --preset small --time 120 --out runs/g2 </dev/null 2>&1 | tail -8; echo "rc=${PIPESTATUS[0]}"
timeout 60 $T train .gpu/ts-train.txt --preset small --resume --out runs/g2 --time 10 </dev/null 2>&1 | tail -6; echo "rc=${PIPESTATUS[0]}"
cp runs/g2/model.safetensors "$OUT/g2-model.safetensors"
s torchrun 2 processes on one GPU
timeout 60 python3 -m torch.distributed.run --nproc-per-node 2 -m tfcli train .gpu/ts-train.txt --max-steps 5 --out runs/g3 2>&1 | tail -6; echo "rc=${PIPESTATUS[0]}"
s "sampling: eager steps vs the replayed CUDA graph (and the compiled one), alternating (bench's measure, 500 chars, batches 1 and 16)"
timeout 150 python3 - <<'PY' 2>&1 | tail -10
import torch
from tfcli import bench, cuda_graph
graph = cuda_graph.runs
for shape in ("10.7M", "0.8M"):
    for mode in ("eager", "graph", "compiled graph", "graph"):
        cuda_graph.runs = graph if "graph" in mode else (lambda device: False)
        rates = bench.sample_speed(bench.SHAPES[shape], torch.device("cuda"), compile=mode == "compiled graph",
                                   batches=(1,) if mode == "compiled graph" else (1, 16))
        more = f", 16 samples {rates[1]['chars_per_s']:.0f} each" if len(rates) > 1 else ""
        print(shape, mode, f"{rates[0]['chars_per_s']:.0f} chars/s{more}")
PY
s bench 10.7M
timeout 100 $T bench --shape 10.7M --seconds 2 --json 2>&1 | tail -5
s end
} 2>&1 | tee "$OUT/log.txt"
