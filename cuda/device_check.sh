#!/usr/bin/env bash
# The GPU checks for a session lent a device (see the device tool): run from the repository root on
# the device machine, e.g. `bash cuda/device_check.sh 2>&1 | tee $OUT/log`. That machine has nvcc,
# CMake, scikit-build-core, pybind11, torch, transformers and peft but no network, so the package is
# built there, into /tmp/site. Steps: build (sm_90), the op and model tests against the CPU, then
# decode / prefill speed on random-weight models of SmolLM2-135M and Qwen2.5-0.5B shape, CPU beside GPU.
set -euo pipefail
arch=${CUDA_ARCH:-90}
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/site \
    -C cmake.define.TOKENMILL_CUDA=ON -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch" -C build-dir=/tmp/tm-build .
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c "import tokenmill._core as c; print('devices:', c.devices())"
python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py
python3 - <<'PY'
import tempfile, time
import torch, transformers
import tokenmill

shapes = {
    "smollm2-135m": transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                             tie_word_embeddings=True),
    "qwen2.5-0.5b": transformers.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                             tie_word_embeddings=True),
}
for name, cfg in shapes.items():
    d = tempfile.mkdtemp()
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d, safe_serialization=True)
    for weights in ("f16", "q8_0", "q4_0"):
        for device in ("cuda", "cpu"):
            m = tokenmill.load(d, device=device, weights=weights, n_ctx=1024)
            cache = m.new_cache()
            prompt = list(range(1, 513))
            m.eval(cache, prompt[:16])
            cache = m.new_cache()
            t0 = time.perf_counter(); m.eval(cache, prompt); pp = 512 / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for t in range(128):
                m.eval(cache, [t + 1])
            tg = 128 / (time.perf_counter() - t0)
            print(f"{name} {weights} {device}: pp512 {pp:.0f} tok/s, tg128 {tg:.1f} tok/s, "
                  f"weights {m.weight_bytes / 2**20:.0f} MiB")
PY
