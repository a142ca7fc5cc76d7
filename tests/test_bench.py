"""The GPU benchmark runs on CPU as a dry run of the same code, so a lent GPU's minutes go to measuring."""
import subprocess
import sys

from conftest import ROOT, TIMEOUT

GPU = [sys.executable, "bench.py", "--gpu", "--device", "cpu", "--size", "tiny", "--queries", "2", "--max-len", "32", "--chunk-size", "8",
       "--chunk-tokens", "128"]


def test_gpu_benchmark_dry_runs_on_cpu():
    # Every variant but liger's (CUDA only) and the compile rows (each a compilation on this CPU; they dry-run with
    # --variants 8 9, and test_train.py runs train.py's compiled packed rows).
    variants = ["--variants", "0", "1", "2", "3", "5", "6"]
    unbounded = ["--budget-s", "1e9"]  # every part runs however loaded the machine is; the budget has its own test
    done = subprocess.run(GPU + ["--memory-sizes", "tiny"] + variants + unbounded, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "check: packed (sdpa) vs padded (sdpa) embeddings" in out and "check: cached packed (sdpa) vs plain padded" in out and "checks passed" in out
    for profile in ("full", "f2llm"):
        for variant in ("baseline: fp32 weights", "bf16 weights (FSDP2", "bf16, 4x larger chunks", "bf16, padded chunks by tokens",
                        "bf16 + packing  ", "bf16 + packing, 4x"):
            assert any(line.startswith(profile) and variant in line and "tok/s" in line for line in out.splitlines()), (profile, variant)
    assert "chunk     32 seq" in out and "chunk    512 tok" in out  # the 4x rows run 4x the chunk
    shares = {line.split("|")[1].strip(): float(line.split("real/computed ")[1][:5])
              for line in out.splitlines() if line.startswith("f2llm") and "real/computed" in line}
    assert shares["bf16 + packing"] == 1 and 0 < shares["bf16 weights (FSDP2 mixed precision)"] < 1  # packing computes no padding
    assert "graph breaks 0" in out
    assert "embeddings vs first row -" in out  # the first row is the reference of the others
    assert "operations per chunk | baseline" in out and "weights gathered once per step" in out and "gathers weights per forward" in out
    assert "profile | " in out and "Self CPU time total" in out
    assert "vs sentence-transformers CachedMNRL" in out
    assert "memory | tiny  | bf16 weights, padded, one GPU | largest chunk 128 x 32" in out
    assert "skipped past" not in out


def test_gpu_benchmark_skips_what_is_left_past_its_budget():
    done = subprocess.run(GPU + ["--memory-sizes", "tiny", "--no-checks", "--profiles", "f2llm", "--variants", "0", "1", "--budget-s", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tok/s" not in done.stdout
    assert ("skipped past the 0.0 s budget: operations per chunk; f2llm | baseline: fp32 weights + bf16 autocast, padded; f2llm | bf16 weights (FSDP2 mixed "
            "precision); memory tiny") in done.stdout


def test_compiled_packed_rows_count_their_filling():
    # Under --compile each packed row is filled up to the budget (speed.packed_width): the rows print what it costs.
    import bench_gpu
    seqs = [[1] * n for n in (100, 90, 60, 30, 20)]  # 300 tokens: chunks of 190 and 110 at a budget of 200
    packed, compiled = (next(v for v in bench_gpu.VARIANTS if v.name == name) for name in ("bf16 + packing", "bf16 + packing + torch.compile"))
    assert bench_gpu.real_share(seqs, packed, 8, 200) == 1 and bench_gpu.real_share(seqs, compiled, 8, 200) == 300 / 400
