"""The generator benchmarks smoke-run on CPU (`--tiny`) and report sane numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_attention_tiny_cpu(tmp_path):
    res = load("bench_attention").main(["--tiny", "--device", "cpu", "--json", str(tmp_path / "a.json")])
    rows = {r["backend"]: r for r in res["rows"]}
    assert rows["sdpa"]["status"] == "ok" and rows["sdpa"]["err_out"] < 1e-5 and rows["sdpa"]["fwd_bwd_ms"] > 0
    assert rows["flash_attn"]["status"].startswith("unavailable") and "CUDA" in rows["flash_attn"]["status"]
    assert res["tokens"] == 600 and (tmp_path / "a.json").is_file()


def test_bench_attention_keeps_the_forward_of_a_kernel_without_backward():
    """fa4 on Hopper has a forward and no backward: its row keeps the forward's error and time."""
    mod = load("bench_attention")
    from arvid.generator.attention import varlen_causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(12, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    grad_out = torch.randn(12, 2, 8, generator=g)
    ref = mod.reference(q, k, v, cu, grad_out)

    def forward_only(q, k, v, cu, m):  # the sdpa result, cut off from autograd
        return varlen_causal_attention(q, k, v, cu, m, "sdpa").detach()

    row = mod.run_one("fwd-only", forward_only, None, q, k, v, cu, 7, grad_out, ref, 2, torch.device("cpu"))
    assert row["status"].startswith("forward only (backward: RuntimeError")
    assert row["err_out"] < 1e-5 and row["fwd_ms"] > 0 and "fwd_bwd_ms" not in row and "err_dq" not in row
    full = mod.run_one("sdpa", lambda *a: varlen_causal_attention(*a, "sdpa"), None, q, k, v, cu, 7, grad_out, ref,
                       2, torch.device("cpu"))
    assert full["status"] == "ok" and full["err_dq"] < 1e-5 and full["fwd_bwd_ms"] > 0


def test_bench_generator_tiny_cpu(tmp_path):
    res = load("bench_generator").main(["--tiny", "--device", "cpu", "--measure-peak", "--json", str(tmp_path / "g.json")])
    assert [(r["preset"], r["lengths"]) for r in res["rows"]] == [("debug", "router"), ("debug", "fixed")]
    peak = res["measured_peak_tflops"]
    assert peak > 0
    for r in res["rows"]:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and 0 < r["fill"] <= 1
        # MFU against the measured matmul ceiling: the same FLOP rate over the measured peak
        assert r["mfu_measured_peak"] == pytest.approx(r["tflops"] / peak, rel=1e-9)
        assert 4.0 < r["loss"] < 12.0  # near log(vocab 8197) = 9.0 after two steps
    # nanoGPT's count adds the other half of the attention square, 6 * layers * dim * L^2 per
    # sequence: with every sequence of length L, 6 * layers * dim * L per token (debug: 2 layers, 64)
    fixed = res["rows"][1]
    extra = 6.0 * 2 * 64 * fixed["mean_len"] * fixed["tokens_per_s"] / (peak * 1e12)
    assert fixed["mfu_measured_peak_full_attn"] == pytest.approx(fixed["mfu_measured_peak"] + extra, rel=1e-6)
    assert res["rows"][0]["mfu_measured_peak_full_attn"] > res["rows"][0]["mfu_measured_peak"]


def test_bench_generator_flops_only_counts_the_batches_a_run_times():
    mod = load("bench_generator")
    run = mod.main(["--tiny", "--device", "cpu"])
    counted = mod.main(["--tiny", "--device", "cpu", "--flops-only"])
    for r, c in zip(run["rows"], counted["rows"], strict=True):
        assert (r["preset"], r["lengths"], r["mean_len"]) == (c["preset"], c["lengths"], c["mean_len"])
        # FLOPs per token: the timed run's rate ratio, and the count of the same draw of batches
        assert c["flops_causal"] / c["tokens"] == pytest.approx(r["tflops"] * 1e12 / r["tokens_per_s"], rel=1e-9)
        assert c["full_over_causal"] == pytest.approx(1.0 + c["attention_share_causal"], rel=1e-12)
        assert 0.0 < c["attention_share_causal"] < 1.0


def test_bench_generator_reports_a_backend_that_cannot_train_here():
    res = load("bench_generator").main(["--tiny", "--device", "cpu", "--lengths", "router", "--backend", "fa4"])
    (row,) = res["rows"]
    assert "tokens_per_s" not in row and row["error"].startswith("attention backend 'fa4' needs a CUDA GPU")


def test_bench_generator_profile_splits_the_step_by_kernel_category():
    mod = load("bench_generator")
    res = mod.main(["--tiny", "--device", "cpu", "--lengths", "router", "--profile"])
    pr = res["rows"][0]["profile"]
    assert pr["steps"] == 2 and pr["total_ms_per_step"] > 0
    assert abs(sum(pr["shares"].values()) - 1.0) < 1e-6
    # a transformer's step: matmuls are a large part, attention and the loss are present
    assert pr["shares"]["matmul"] > 0.1 and pr["shares"]["attention"] > 0 and pr["shares"]["loss"] > 0
    assert pr["top"][0]["share"] >= pr["top"][-1]["share"]
    assert [mod.categorize(n) for n in ("sm90_xmma_gemm_bf16", "flash_fwd_kernel", "triton_per_fused_add_0",
                                        "multi_tensor_apply_kernel", "aten::mm", "elementwise_kernel")] == [
        "matmul", "attention", "fused elementwise", "optimizer", "matmul", "other"]
    # each row says which host calls launched it: the loss's log-softmax comes from cross_entropy
    rows = {t["name"]: t["launched_by"] for t in pr["top"]}
    assert "aten::cross_entropy_loss" in rows["aten::_log_softmax"]
    assert "MmBackward0" in rows["aten::mm"] or "aten::linear" in rows["aten::mm"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_block_mask_cpu_appends_results_and_tiles_win(tmp_path):
    out = tmp_path / "m.jsonl"
    out.write_text('{"old": 1}\n')
    rows = load("bench_block_mask").main(["--clips", "4,16", "--repeat", "1", "--out", str(out)])
    assert [r["tokens"] for r in rows] == [1024, 4096]
    assert rows[-1]["tiles_s"] < rows[-1]["create_block_mask_s"]  # pair-by-pair evaluation is the slow one
    lines = out.read_text().splitlines()
    assert lines[0] == '{"old": 1}' and len(lines) == 3  # earlier results kept


def test_bench_video_decode_reads_every_clip_and_counts_workers(tmp_path):
    pytest.importorskip("av")
    res = load("bench_video_decode").main(["--videos", "3", "--src-frames", "20", "--src-size", "96x64",
                                           "--workers", "0,1", "--passes", "2", "--i3d-clips-per-s", "1000",
                                           "--batch", "2", "--out", str(tmp_path / "d.jsonl")])
    assert [r["clips"] for r in res["rows"]] == [6, 6]  # 3 files x 2 passes, with and without a worker
    assert all(r["clips_per_s"] > 0 and r["steady_clips_per_s"] > 0 and r["startup_s"] > 0 for r in res["rows"])
    assert res["best_clips_per_s_per_worker"] == max(r["steady_clips_per_s"] / max(r["workers"], 1)
                                                     for r in res["rows"])
    assert res["workers_to_feed"] == -(-1000 // res["best_clips_per_s_per_worker"])
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 1


def test_bench_sampling_floor_bandwidth_follows_the_device():
    bw = load("bench_sampling").default_bandwidth
    assert bw("NVIDIA H200") == 4.3e12 and bw("NVIDIA H100 80GB HBM3") == 3.0e12 and bw("") == 3.0e12


def test_bench_compiled_decode_cpu(tmp_path):
    res = load("bench_compiled_decode").main(["--cache-lens", "64,128", "--kv-len", "32", "--iters", "2",
                                               "--json", str(tmp_path / "c.json")])
    rows = res["rows"]
    assert [r["cache_len"] for r in rows] == [64, 128]
    assert rows[1]["cache_mb"] == pytest.approx(2 * rows[0]["cache_mb"])
    assert all(r["compiled_ms"] > 0 and r["eager_ms"] > 0 for r in rows) and (tmp_path / "c.json").is_file()
    # the debug GPT (2 layers): matmuls, attention and fused pointwise kernels, fewer than eager's ops
    n = res["launches"]
    assert n["library"] >= 2 * 4 + 1 and n["aten"] >= 2 and n["fused"] >= 2
    assert n["total"] < n["eager_ops"]


def test_bench_sampling_cpu_row(tmp_path, monkeypatch):
    """bench_sampling on the CPU (debug GPT, eager): one row per batch size with the bucket the
    timed step attends over, floors ordered full >= bucket >= filled, and the recompute ratio."""
    import json
    import sys

    import torch

    from arvid.sampling.sampler import bucket_len

    mod = load("bench_sampling")
    out = tmp_path / "s.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_sampling.py", "--preset", "debug", "--device", "cpu", "--batch-sizes", "1", "--codebook", "64",
        "--candidates", "4,8,16", "--num-classes", "5", "--steps", "4", "--fill", "20", "--kv-bucket", "16",
        "--json", str(out)])
    assert mod.main() == 0
    assert torch.is_grad_enabled()  # the benchmark's no_grad is scoped (a global switch broke later tests)
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 1
    r = rows[0]
    assert r["mode"] == "eager" and r["decode_attention"] == "sdpa" and r["rows"] == 2  # CFG: 2 rows
    assert r["kv_len"] == bucket_len(20 + r["n_prefix"], 16, 10**6) == 32
    assert r["step_ms"] > 0 and r["recompute_speedup"] > 0
    assert r["floor_ms_full_cache"] >= r["floor_ms_bucket"] >= r["floor_ms_filled"] > 0


def test_bench_sampling_floors_are_the_bytes_the_timed_steps_read(tmp_path, monkeypatch):
    """The floors in bytes: every weight but the token embedding once, plus the KV cache (k and v,
    layers x rows x kv heads x head_dim x 4 bytes a position) over the whole cache, over the
    buckets and over the filled positions of the timed steps, averaged as step_ms is. Fill 30,
    buckets of 16, 4 timed steps: positions 31..34, buckets 32, 48, 48, 48 (mean 44), 32..35
    positions filled (mean 33.5). The floors were the first step's (32 and 31 positions)."""
    import json
    import sys

    from arvid.generator.gpt import GPT

    mod = load("bench_sampling")
    out = tmp_path / "s.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_sampling.py", "--preset", "debug", "--device", "cpu", "--batch-sizes", "1", "--codebook", "64",
        "--candidates", "4,8,16", "--num-classes", "5", "--steps", "4", "--fill", "30", "--kv-bucket", "16",
        "--bandwidth", "1e12", "--json", str(out)])
    assert mod.main() == 0
    (r,) = json.loads(out.read_text())["results"]
    gpt = GPT.from_preset("debug", vocab_size=67, max_seq_len=69, num_classes=5)  # 64 codes + 3 length tokens
    weights = 4 * sum(p.numel() for n, p in gpt.named_parameters() if not n.startswith("tok_emb"))
    per_pos = 2 * 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 rows (CFG), 2 kv heads, head_dim 16, fp32
    full = 1 + 4 * 16 + 4 - 1  # prefix + the longest sequence - 1: the cache the sampler allocates
    for key, positions in (("floor_ms_full_cache", full), ("floor_ms_bucket", 44.0), ("floor_ms_filled", 33.5)):
        assert r[key] == pytest.approx((weights + per_pos * positions) / 1e12 * 1e3, rel=1e-12), key
    assert r["step_over_floor_filled"] == pytest.approx(r["step_ms"] / r["floor_ms_filled"], rel=1e-12)
    assert (r["kv_len"], r["timed_steps"], r["kv_len_mean"], r["filled_mean"]) == (32, 4, 44.0, 33.5)


def test_compare_residual_dtype_trains_both_streams_on_learnable_chains(tmp_path):
    res = load("compare_residual_dtype").main(["--steps", "6", "--window", "3", "--dim", "32", "--layers", "1",
                                                "--heads", "2", "--vocab", "32", "--max-tokens", "128",
                                                "--json", str(tmp_path / "r.json")])
    assert [w["steps"] for w in res["windows"]] == ["0-2", "3-5"]
    # the chains are learnable (entropy well below uniform) and both runs start from the same
    # weights on the same batches: near log(vocab), and within a few percent of each other
    assert res["floor"] < 0.6 * res["log_vocab"]
    first = res["windows"][0]
    assert abs(first["float32"] - res["log_vocab"]) < 0.3 and abs(first["rel_diff"]) < 0.02
    assert (tmp_path / "r.json").is_file()


def test_probe_cudnn_varlen_plumbing_with_stand_in_kernels(tmp_path):
    """The cuDNN ragged-attention probe runs on the GPU only; here aten's two ops get dense CPU
    stand-ins (tests/_cudnn_standin.py) and the probe's own parts must hold: the custom ops and
    their fakes (eager and compiled), the qkv-view layout, zero-length padding of the sequence
    count and a loose max_seqlen (the bucketed rows), each against the float32 reference."""
    import json
    import subprocess
    import sys

    out = tmp_path / "probe.json"
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "_cudnn_standin.py"), str(out)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["status"] == "ok" and all(r.get("status", "ok") == "ok" for r in rows), rows
    assert rows[0]["lse_numel_ok"] is True and rows[0]["lse_heads_first"] is False and res["cu_dtype"] == "torch.int32"
    names = [r.get("backend", r["what"]) for r in rows]
    assert names == ["forward runs", "torch_varlen", "cudnn_varlen", "cudnn_varlen[compiled]", "qkv views",
                     "varying", "bucketed"]
    for r in rows[1:5] + rows[6:]:
        errs = [r[k] for k in ("err_out", "err_dq", "err_dk", "err_dv")]
        assert max(errs) < 0.05, r  # bf16 rounding; a wrong mask or a lost sequence is O(1)
    assert len(set(rows[5]["counts"])) == len(rows[5]["counts"])  # every varying batch a new count


def test_probe_cudnn_varlen_calls_a_disagreement_wrong():
    """On torch 2.11 the probe printed status "ok" beside dq errors of 1e19: a row whose error
    exceeds the GPU tests' bound (or is NaN) is "wrong", naming the field."""
    probe = load("probe_cudnn_varlen")
    assert probe.verdict({"err_out": 0.009, "err_dq": 0.017, "err_dk": 0.016, "err_dv": 0.019}) == "ok"
    assert probe.verdict({"err_out": 0.009, "err_dq": 8.2e19, "err_dk": 2.28, "err_dv": 0.019}) == \
        "wrong: dq 8.2e+19, dk 2.28"
    assert probe.verdict({"err_out": float("nan")}) == "wrong: out nan"


def test_bench_attention_flex_option_rows_and_only():
    """--flex-options / --flex-modes add a flex row each (kernel options or a compile mode);
    --only keeps the rows named ("flex*": every such row)."""
    bench = load("bench_attention")
    common = ["--tiny", "--device", "cpu", "--flex-options", '{"PRESCALE_QK": true}', "--flex-modes",
              "max-autotune-no-cudagraphs"]
    res = bench.main(common + ["--only", "sdpa", "--only", "flex*"])
    names = [r["backend"] for r in res["rows"]]
    assert names == ["sdpa", 'flex[shared mask, {"PRESCALE_QK":true}]', "flex[shared mask, max-autotune-no-cudagraphs]"]
    assert res["rows"][0]["status"] == "ok" and res["rows"][0]["err_out"] < 1e-5
    one = bench.main(common + ["--only", "flex[shared mask, max-autotune-no-cudagraphs]"])  # a name with a comma
    assert [r["backend"] for r in one["rows"]] == ["flex[shared mask, max-autotune-no-cudagraphs]"]
    with pytest.raises(SystemExit):  # a name that matches no row is an error, not an empty run
        bench.main(common + ["--only", "sdpa_typo"])


def test_bench_generator_gpt_overrides_change_the_model_and_bad_ones_are_refused(capsys):
    mod = load("bench_generator")
    base = mod.main(["--tiny", "--device", "cpu", "--lengths", "router", "--flops-only"])
    wider = mod.main(["--tiny", "--device", "cpu", "--lengths", "router", "--flops-only", "--gpt", "dim=128"])
    assert wider["rows"][0]["flops_causal"] > 2 * base["rows"][0]["flops_causal"]
    for bad, said in (("n_heads=--8", "expected KEY=INT"), ("num_classes=7", "sets attn_backend"),
                      ("bogus=1", "not a GPTConfig field")):
        with pytest.raises(SystemExit):
            mod.main(["--tiny", "--device", "cpu", "--flops-only", "--gpt", bad])
        assert said in capsys.readouterr().err


def test_bench_generator_inductor_options_are_typed_and_checked(capsys):
    mod = load("bench_generator")
    import torch._inductor.config as inductor_config

    opts = mod.inductor_options(["max_pointwise_cat_inputs=2", "coordinate_descent_tuning=false"],
                                lambda msg: pytest.fail(msg))
    assert opts == {"max_pointwise_cat_inputs": 2, "coordinate_descent_tuning": False}
    assert type(opts["max_pointwise_cat_inputs"]) is int
    before = inductor_config.max_pointwise_cat_inputs
    for bad, said in (("max_pointwise_cat_inputs", "expected KEY=VALUE"), ("no_such_option=1", "not an option"),
                      ("max_pointwise_cat_inputs=two", "holds a int"), ("coordinate_descent_tuning=yes", "true or false")):
        with pytest.raises(SystemExit):
            mod.main(["--tiny", "--device", "cpu", "--flops-only", "--inductor", bad])
        assert said in capsys.readouterr().err
    assert inductor_config.max_pointwise_cat_inputs == before  # refused before anything was set
