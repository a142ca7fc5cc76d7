"""The GPU benchmark runs on CPU as a dry run of the same code, so a lent GPU's minutes go to measuring."""
import subprocess
import sys

from conftest import ROOT, TIMEOUT


def test_gpu_benchmark_dry_runs_on_cpu():
    done = subprocess.run([sys.executable, "bench.py", "--gpu", "--device", "cpu", "--size", "tiny", "--queries", "2", "--max-len", "32",
                           "--chunk-size", "8", "--chunk-tokens", "128", "--memory-sizes", "tiny"], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "check: packed (sdpa) vs padded (sdpa) embeddings" in out and "check: cached packed (sdpa) vs plain padded" in out and "checks passed" in out
    for profile in ("full", "f2llm"):
        for variant in ("baseline: fp32 weights", "bf16 weights (FSDP2", "bf16 + packing  "):
            assert any(line.startswith(profile) and variant in line and "tok/s" in line for line in out.splitlines()), (profile, variant)
    assert "vs sentence-transformers CachedMNRL" in out
    assert "memory | tiny  | bf16 weights, padded, one GPU | largest chunk 64 x 32" in out
