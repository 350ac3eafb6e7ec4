"""Time loading the embedded default model: first start (GGUF dequantized) vs. later starts
(safetensors cache). Each load runs in a fresh subprocess with an empty cache folder first.

    .venv/bin/python bench/load_bench.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

LOAD = (
    "import json, time; t = time.perf_counter(); "
    "from core.modeling import load_frozen_model; m = load_frozen_model('default'); "
    "print(json.dumps({'load_s': m.load_seconds, 'process_s': time.perf_counter() - t}))"
)


def timed_load(cache_dir: str) -> dict:
    env = {"SOFTPROMPT_CACHE_DIR": cache_dir, "OMP_WAIT_POLICY": "PASSIVE"}
    import os

    out = subprocess.run(
        [sys.executable, "-c", LOAD], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = timed_load(cache_dir)
        warm = [timed_load(cache_dir) for _ in range(3)]
    warm_load = sorted(w["load_s"] for w in warm)[1]
    print(f"first start (dequantize GGUF + write cache): {cold['load_s']:.1f} s")
    print(f"later start (safetensors cache), median of 3: {warm_load:.2f} s")
    print(f"ratio first/later: {cold['load_s'] / warm_load:.0f}x")


if __name__ == "__main__":
    main()
