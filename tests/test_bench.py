"""Smoke tests of the benchmark harness (accel.bench) and of the patching demo, on tiny sizes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from accel import _ext
from accel.bench import cli, harness, memory, timing
from accel.bench.case import READ_BW, Case, Setup, backward_setup, tolerance

needs_ext = pytest.mark.skipif(not _ext.available(), reason="accel._C is not built")


# --------------------------------------------------------------------------- timing

def test_time_interleaved_runs_round_robin():
    log = []
    fns = {name: (lambda name=name: log.append(name)) for name in "ABC"}
    times, first = timing.time_interleaved(fns, warmup=2, min_reps=5, max_reps=5, budget_s=0.0, keep_first="B")
    assert {k: len(v) for k, v in times.items()} == {"A": 5, "B": 5, "C": 5}
    assert all(t >= 0 for v in times.values() for t in v)
    assert list(first) == ["B"]
    assert len(log) == 3 * (2 + 5)
    rounds = [log[i:i + 3] for i in range(0, len(log), 3)]
    for r in rounds:  # every round calls each implementation exactly once ...
        assert sorted(r) == ["A", "B", "C"]
    assert len({r[0] for r in rounds}) == 3  # ... and the starting implementation rotates


def test_time_interleaved_reps_follow_budget():
    fns = {"a": lambda: None, "b": lambda: None}
    times, _ = timing.time_interleaved(fns, warmup=1, min_reps=3, max_reps=7, budget_s=10.0)
    assert len(times["a"]) == 7  # fast calls: capped by max_reps
    times, _ = timing.time_interleaved(fns, warmup=1, min_reps=3, max_reps=7, budget_s=0.0)
    assert len(times["a"]) == 3  # no budget: min_reps


def test_compare_outputs():
    a = torch.tensor([1.0, -4.0, 2.0])
    assert timing.compare_outputs(a, a.clone())["rel"] == 0.0
    c = timing.compare_outputs((a, a), (a, a + torch.tensor([0.0, 0.0, 0.4])))
    assert math.isclose(c["rel"], 0.1, rel_tol=1e-6)
    assert timing.compare_outputs(a, a[:2])["rel"] == math.inf
    assert timing.compare_outputs(a, torch.tensor([1.0, float("nan"), 2.0]))["rel"] == math.inf


def test_backward_setup_makes_leaves_require_grad_and_resets():
    x, w = torch.randn(3), torch.randn(3)
    setup = backward_setup({"mul": lambda: x * w}, (x, w), torch.ones(3))
    assert x.requires_grad and w.requires_grad
    gx, gw = setup.impls["mul"]()
    assert torch.equal(gx, w) and torch.equal(gw, x)
    gx2, _ = setup.impls["mul"]()  # every call starts from cleared gradients: no accumulation
    assert torch.equal(gx2, w)
    setup.reset()
    assert x.grad is None and w.grad is None


def test_tolerance():
    assert tolerance("float32", "fwd") < tolerance("float32", "fwd+bwd") < tolerance("bfloat16", "fwd")
    assert tolerance("float64", "fwd+bwd") < tolerance("float32", "fwd")
    assert tolerance("float16", "fwd", low_precision=5e-2) == 5e-2


# --------------------------------------------------------------------------- memory (spawned worker)

def alloc_builder(nbytes: int, device: str = "cpu") -> Setup:
    """Module-level (so the spawned worker can import it): 'big' fills nbytes, 'none' allocates nothing."""
    x = torch.ones(16)

    def big():
        return torch.ones(nbytes // 4)

    def none():
        return x.add_(1)

    return Setup({"big": big, "none": none})


def test_memory_meter_measures_peak_rss_in_a_worker():
    nbytes = 64 * 1024 * 1024
    case = Case(op="t", group="g", name="alloc", mode="fwd", builder=alloc_builder,
                        params={"nbytes": nbytes}, baseline="big", peers=("none",),
                        warm_params={"nbytes": 1024})
    meter = memory.MemoryMeter("cpu")
    try:
        mem = meter.measure(case, None)
    finally:
        meter.close()
    assert 0.9 * nbytes <= mem["big"] <= 1.2 * nbytes, mem
    assert mem["none"] < 4 * 1024 * 1024, mem


# --------------------------------------------------------------------------- CLI and conv cases

def test_parse_args_defaults():
    a = cli.parse_args([])
    assert (a.size, a.device, a.dtype, a.reps, a.ops) == ("full", "cpu", "float32", 5, [])
    q = cli.parse_args(["conv", "--quick", "--dtype", "bf16"])
    assert (q.size, q.dtype, q.reps, q.ops) == ("quick", "bfloat16", 3, ["conv"])
    assert "conv" in cli.OPS
    # the names scripts and older callers import from accel.bench.harness
    assert harness.OPS is cli.OPS and harness.parse_args is cli.parse_args and harness.main is cli.main
    assert harness.time_interleaved is timing.time_interleaved
    with pytest.raises(SystemExit):
        cli.collect_cases(cli.parse_args(["no-such-op"]))


@needs_ext
def test_conv_cases_cover_the_brief():
    from accel.bench import conv

    full = conv.cases(cli.parse_args([]))
    groups = {c.group for c in full}
    assert len(groups) == 3
    dw = [c for c in full if c.group.startswith("depthwise")]
    assert len(dw) == 3 * 4 * 2 and all(c.params["C"] == 512 and c.params["L"] == 65536 for c in dw)
    grid = [c for c in full if c.group.startswith("issue grid")]
    assert len(grid) == 2 * (16 + 1) and sum(c.params["groups"] == 1 for c in grid) == 2
    tcn = [c for c in full if c.group.startswith("TCN")]
    assert sorted({c.params["L"] for c in tcn}) == [16384, 32768, 65536, 131072]
    assert all(c.bw_bytes for c in full if c.mode == "fwd" and c.params.get("groups") == c.params.get("C"))


@needs_ext
def test_cli_tiny_conv_run(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = cli.main(["conv", "--size", "tiny", "--no-mem", "--reps", "1", "--budget", "0",
                       "--json", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "peer/accel" in text and "summary" in text
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] == torch.__version__
    assert data["machine"]["accel"]["built"] is True
    assert {"cpu_model", "logical_cpus", "torch_threads", "date"} <= set(data["machine"])
    res = data["results"]
    assert len(res) == 12
    for r in res:
        assert all(v > 0 for v in r["ratios"].values())
        assert all(c["ok"] for c in r["check"].values()), r
    bw = [r["bandwidth"] for r in res if r["bandwidth"]]
    assert bw and all(b["fraction_of_copy"] > 0 for b in bw)
    assert png.stat().st_size > 1000


@needs_ext
def test_attention_cases_cover_the_brief():
    from accel.bench import attention

    full = attention.cases(cli.parse_args(["attention"]))
    speed = [c for c in full if "vs SDPA" in c.group]
    assert {c.params["L"] for c in speed} == {2048, 8192}
    assert all((c.params["B"], c.params["H"], c.params["D"]) == (1, 8, 64) for c in speed)
    assert {(c.mode, c.params["causal"]) for c in speed} == {(m, k) for m in ("fwd", "fwd+bwd") for k in (False, True)}
    assert all({"eager sigmoid", "eager sigmoid (in-place)"} <= set(c.peers) for c in speed if c.mode == "fwd")
    assert all("eager sigmoid" in c.peers for c in speed if c.params["L"] == 2048)
    mem = [c for c in full if "memory" in c.group]
    assert len(mem) == 1 and mem[0].params["L"] == 16384 and "eager sigmoid (in-place)" in mem[0].peers
    gpu = attention.cases(cli.parse_args(["attention", "--device", "cuda", "--dtype", "bf16"]))
    assert {c.params["D"] for c in gpu} == {64, 128}
    assert {c.params["L"] for c in gpu if "vs SDPA" in c.group} == {1024, 4096, 16384}


@needs_ext
def test_cli_tiny_attention_run(tmp_path, capsys):
    out = tmp_path / "a.json"
    rc = cli.main(["attention", "--size", "tiny", "--no-mem", "--reps", "1", "--budget", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads(out.read_text())["results"]
    assert len(res) == 5  # 4 speed cases (fwd, fwd+bwd x causal or not) + 1 memory case
    for r in res:
        assert all(v > 0 for v in r["ratios"].values())
        assert r["check"] and all(c["ok"] for c in r["check"].values()), r


@needs_ext
def test_moe_cases_cover_the_brief():
    from accel.bench import moe

    if not moe.have_transformers():
        pytest.skip("the moe benchmark's peers are transformers' experts implementations")
    assert cli.OPS["moe"] == "accel.bench.moe"
    full = moe.cases(cli.parse_args(["moe"]))
    assert all((c.params["H"], c.params["I"], c.params["E"], c.params["k"]) == (1024, 2816, 8, 2) for c in full)
    assert all(c.params["dtype"] == "float32" and c.params["device"] == "cpu" for c in full)
    for mode in ("fwd", "fwd+bwd"):
        assert [c.params["T"] for c in full if c.mode == mode] == [1, 4, 64, 512, 2048]
    assert all({"eager", "grouped_mm"} <= set(c.peers) and c.check == ("eager",) for c in full)
    # batched_mm: in the decode cases, skipped (with a note) where its weight gathers would not fit
    assert all("batched_mm" in c.peers for c in full if c.params["T"] <= 4)
    assert all("batched_mm" not in c.peers and "batched_mm skipped" in c.note for c in full if c.params["T"] >= 512)
    assert {c.name for c in full if c.params["T"] == 1} == {"T1 (2/8 experts)"}
    # forward cases report bandwidth against the machine's read bandwidth, over the routed experts' bytes
    for c in full:
        if c.mode == "fwd":
            n = moe.routed_experts(c.params["T"], 1024, 8, 2)
            assert c.bw_ref == READ_BW and c.bw_bytes == n * 3 * 2816 * 1024 * 4
        else:
            assert c.bw_bytes is None
    bf16 = moe.cases(cli.parse_args(["moe", "--dtype", "bf16"]))
    assert [c.params["T"] for c in bf16 if c.mode == "fwd"] == [1, 4, 64, 512, 2048]
    assert all(c.params["dtype"] == "bfloat16" for c in bf16)
    quick = moe.cases(cli.parse_args(["moe", "--quick"]))
    assert {c.params["T"] for c in quick} <= {1, 64, 512}
    gpu = moe.cases(cli.parse_args(["moe", "--device", "cuda", "--dtype", "bf16"]))
    assert {1, 8, 64, 512, 2048, 8192} <= {c.params["T"] for c in gpu}
    assert all("batched_mm" not in c.peers for c in gpu if c.params["T"] >= 8192)


def test_read_bandwidth_is_measured_once():
    rb = timing.read_bandwidth("cpu")
    assert rb["GBps"] > 0.1 and "sum" in rb["method"]
    assert set(rb["by_method_GBps"]) == {"sum", "amax_rows", "bf16_sum_rows"}
    assert timing.read_bandwidth("cpu") is rb


@needs_ext
def test_cli_tiny_moe_run(tmp_path, capsys):
    from accel.bench import moe

    if not moe.have_transformers():
        pytest.skip("the moe benchmark's peers are transformers' experts implementations")
    out = tmp_path / "m.json"
    rc = cli.main(["moe", "--size", "tiny", "--no-mem", "--reps", "1", "--budget", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "read bandwidth" in text and "% read" in text
    data = json.loads(out.read_text())
    assert data["machine"]["read_bandwidth"]["GBps"] > 0
    res = data["results"]
    assert len(res) == 6  # T 1, 5, 40 x fwd, fwd+bwd
    for r in res:
        assert set(r["peers"]) == {"eager", "batched_mm", "grouped_mm"}
        assert all(v > 0 for v in r["ratios"].values())
        assert r["check"] and all(c["ok"] for c in r["check"].values()), r
        bw = r["bandwidth"]
        assert (bw is not None) == (r["mode"] == "fwd")
        if bw:
            assert bw["fraction_of_read"] > 0 and bw["accel_bytes"] > 0


# --------------------------------------------------------------------------- demo

@needs_ext
def test_demo_tiny(capsys):
    from accel import demo

    res = demo.run(demo.parse_args(["--channels", "8", "--length", "300", "--blocks", "3", "--reps", "1",
                                    "--attn-dim", "32", "--attn-layers", "2", "--attn-length", "70",
                                    "--moe-hidden", "32", "--moe-layers", "2", "--moe-length", "33"]))
    text = capsys.readouterr().out
    assert res["ok"], res
    tcn, attn = res["models"]["tcn"], res["models"]["attention"]
    assert tcn["replaced"] == 3 and tcn["restored"]
    assert attn["replaced"] == 2 and attn["restored"]  # the two eager sigmoid attention modules
    checked = [tcn, attn]
    if "moe" in res["models"]:  # needs transformers and the accel-transformers plugin
        moe = res["models"]["moe"]
        assert moe["replaced"] == 2 and moe["restored"]  # one sparse MoE block per layer
        checked.append(moe)
    for r in checked:
        assert r["output_rel_diff"] <= demo.OUT_TOL and r["grad_rel_diff"] <= demo.GRAD_TOL
        assert set(r["timings"]) == {"forward", "fwd+bwd"}
    assert "demo OK" in text and "speed-up" in text and "summary" in text
