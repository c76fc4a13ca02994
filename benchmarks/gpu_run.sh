#!/usr/bin/env bash
# The GPU pass: install batchplex without a network, run the CUDA tests, then the GPU benchmarks.
#
#   benchmarks/gpu_run.sh OUT_DIR [stage ...]
#
# Stages (default: all, in this order): tests vision nlp recsys engine generation reliability tools. Also:
#   loop       this host's CPU alone (the load generator's cost; the half-load latency floor)
#   processes  the four workloads of engine in one process against one process each
#   multi      one workload on 1, 2, ... GPUs (a machine of two or more GPUs)
#   ray        Ray Serve with 1 and 2 replicas, one GPU each (two or more GPUs; needs BATCHPLEX_RAY_BUNDLE)
# Environment:
#   BATCHPLEX_WHEELS      folder of wheels the machine lacks (see benchmarks/README.md), installed into
#                         /tmp/batchplex-site and put on PYTHONPATH; skipped when unset
#   BATCHPLEX_MINILM_DIR  MiniLM's config.json and tokenizer files (NLP tests and benchmark, random weights)
#   BATCHPLEX_RAY_BUNDLE  folder of an offline Ray Serve bundle (its install.sh TARGET_DIR; benchmarks/README.md),
#                         unpacked into /tmp/batchplex-ray and put on PYTHONPATH; skipped when unset
# Every stage appends to OUT_DIR/gpu.log; a failing stage is logged and the next one still runs. At the end the
# results folder is packed into OUT_DIR/results.tgz. The exit status is the number of failed stages.
set -u -o pipefail
out=${1:?usage: benchmarks/gpu_run.sh OUT_DIR [stage ...]}
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests vision nlp recsys engine generation reliability tools)
mkdir -p "$out"
log="$out/gpu.log"
export PYTHONUNBUFFERED=1
python=python3

if [ -n "${BATCHPLEX_WHEELS:-}" ]; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/batchplex-site "$BATCHPLEX_WHEELS"/*.whl 2>&1 | tee -a "$log"
    export PYTHONPATH=/tmp/batchplex-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -n "${BATCHPLEX_RAY_BUNDLE:-}" ]; then
    if bash "$BATCHPLEX_RAY_BUNDLE/install.sh" /tmp/batchplex-ray >>"$log" 2>&1; then
        export PYTHONPATH=/tmp/batchplex-ray${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "the Ray bundle in $BATCHPLEX_RAY_BUNDLE did not install (see the log): the ray stage will fail" \
            | tee -a "$log"
    fi
fi
$python -m pip install -q --no-deps --no-build-isolation -e . -e plugins/vision -e plugins/nlp -e plugins/recsys \
    -e plugins/ray -e tests/sample_plugin 2>&1 | tail -3 | tee -a "$log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"

minilm=(--model-dir "${BATCHPLEX_MINILM_DIR:-}")
[ -z "${BATCHPLEX_MINILM_DIR:-}" ] && minilm=()

# Only the plugins the suite needs: the machine's own pytest plugins may not match the pytest carried in the wheels.
stage_tests() { PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout 420 $python -m pytest -q -p no:cacheprovider \
                -p pytest_asyncio.plugin -p _hypothesis_pytestplugin --disable-warnings -m "gpu and not ray" \
                --ignore plugins/ray --ignore tests/test_service_example.py; }
stage_vision() { $python benchmarks/vision_throughput.py --device cuda --duration 4; }
stage_nlp() { $python benchmarks/nlp_throughput.py --device cuda --random-weights "${minilm[@]}"; }
stage_recsys() {
    $python benchmarks/recsys_collate.py --device cuda && $python benchmarks/recsys_dlrm.py --device cuda
}
stage_engine() { $python benchmarks/engine.py --device cuda "${minilm[@]}"; }
# The four workloads in one process against one process each (device utilization by NVML).
stage_processes() { $python benchmarks/mix_processes.py --device cuda "${minilm[@]}"; }
# This host's CPU alone (read with the half-load rows of vision and nlp): the open-loop load generator's own cost on
# the event loop, and the half-load latency batchplex reaches with a stand-in model that holds no GIL.
stage_loop() {
    $python benchmarks/open_loop_cost.py && $python benchmarks/half_load_floor.py \
        && $python benchmarks/half_load_floor.py --points minilm-graphed --rates 8000 16000 24000 32000
}
stage_multi() { $python benchmarks/multi_gpu.py --device cuda; }
stage_generation() { $python benchmarks/generation_throughput.py --device cuda; }
# The out-of-memory case is slow on a real GPU (each wave allocates until CUDA refuses): a quarter of its requests.
stage_reliability() {
    $python -m benchmarks.reliability.run oom --device cuda --scale 0.25 \
        && $python -m benchmarks.reliability.run shutdown soak --device cuda --soak-seconds 90
}
stage_tools() {
    $python -m batchplex.cli profile mlp --device cuda --latency-budget-ms 2 --out benchmarks/results/profile-mlp-cuda \
        && $python -m batchplex.cli profile classify --device cuda --latency-budget-ms 10 --max-batch 512 \
            --out benchmarks/results/profile-classify-cuda \
        && timeout 90 $python -m batchplex.cli demo --device cuda --duration 30 --no-live
}

# ResNet-50 behind 1 and 2 replicas, batchplex vs @serve.batch, then what Ray passes to one replica with no model.
# Rates suit a replica's Ray ceiling of about 550 requests/s on the gVisor H200 hosts (ray-call-ceiling-cuda.md).
stage_ray() {
    $python benchmarks/ray_serve.py --device cuda --clients 4 --rate ${BATCHPLEX_RAY_RATES:-200 400 800} --seconds 4 \
        --out benchmarks/results/ray-serve-cuda && $python benchmarks/ray_call_ceiling.py
}

failed=0
for stage in "${stages[@]}"; do
    echo "=== $stage $(date -u +%H:%M:%S)" | tee -a "$log"
    started=$SECONDS
    if ! "stage_$stage" 2>&1 | tee -a "$log"; then
        echo "=== $stage FAILED" | tee -a "$log"
        failed=$((failed + 1))
    fi
    echo "=== $stage took $((SECONDS - started)) s" | tee -a "$log"
done
tar czf "$out/results.tgz" benchmarks/results docs 2>&1 | tee -a "$log"
exit $failed
