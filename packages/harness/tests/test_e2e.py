"""tritonbits_harness.e2e's bookkeeping: target judging, divergence, the report section (the flow itself runs
in packages/kernels/tests/test_integration_bnb.py on a tiny model, and on a GPU as `nox -s e2e-<gpu>`)."""

import pytest
import torch

from tritonbits_harness import e2e


def results(load=4.0, b1=1.6, b1_bf16=1.1, b8=1.5, qlora=1.2, mem=(10, 10)):
    return {
        "load": {"bnb_s": 8.0, "tritonbits_s": 8.0 / load, "speedup": load, "quantized_tensors": 28,
                 "quantized_tensors_differing": []},
        "decode": {"batch1": {"bnb_tok_s": 10.0, "tritonbits_tok_s": 10 * b1, "bf16_tok_s": 10 * b1 / b1_bf16,
                              "speedup_vs_bnb": b1, "speedup_vs_bf16": b1_bf16, "tokens_equal": True,
                              "first_divergence": [None]},
                   "batch8": {"bnb_tok_s": 80.0, "tritonbits_tok_s": 80 * b8, "speedup_vs_bnb": b8,
                              "tokens_equal": False, "first_divergence": [3, None]}},
        "qlora": {"batch": 4, "seq": 512, "speedup": qlora, "peak_memory_ratio": mem[1] / mem[0],
                  "losses_equal": True,
                  "bnb": {"step_s_median": 1.0, "peak_step_bytes": mem[0]},
                  "tritonbits": {"step_s_median": 1 / qlora, "peak_step_bytes": mem[1]}},
    }  # fmt: skip


def test_judge_targets():
    t = e2e.judge(results())
    assert t["load_speedup_vs_bnb"]["met"] and t["decode_b1_speedup_vs_bnb"]["met"]
    assert t["decode_b1_speedup_vs_bf16"]["met"] is False and t["decode_b8_speedup_vs_bnb"]["met"]
    assert t["qlora_step_speedup_vs_bnb"]["met"] and t["qlora_peak_memory_vs_bnb"]["met"]
    assert e2e.judge(results(mem=(10, 11)))["qlora_peak_memory_vs_bnb"]["met"] is False
    missing = e2e.judge({})
    assert all(v["measured"] is None and v["met"] is None for v in missing.values())


def test_first_divergence():
    a = torch.tensor([[1, 2, 3], [4, 5, 6]])
    b = torch.tensor([[1, 2, 3], [4, 0, 6]])
    assert e2e.first_divergence(a, b) == [None, 1]


def test_markdown_section():
    rec = {"environment": {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "bitsandbytes": "0.50.2",
                           "git_sha": "abc", "date": "2026-11-23T05:00:00Z"},
           "config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 8,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
           "versions": {"transformers": "5.17", "peft": "0.21.2"}, "results": results(),
           "targets": e2e.judge(results()), "errors": {"profile_decode": "Traceback ..."},
           "profiles": {"decode_b1_tritonbits": {"top": [{"name": "gemv", "self_device_us": 1500.0}]}}}  # fmt: skip
    text = "\n".join(e2e.markdown_section(rec))
    assert "| load_speedup_vs_bnb | 4.00× | >= 3.0× | yes |" in text
    assert "| decode_b1_speedup_vs_bf16 | 1.10× | >= 1.2× | no |" in text
    assert "first divergence per row: [3, None]" in text
    assert "phase profile_decode failed" in text and "gemv 1.5 ms" in text


class _Log:
    """The order in which fake runs were entered and called."""

    def __init__(self):
        self.events = []

    def context(self, name):
        import contextlib

        @contextlib.contextmanager
        def enter():
            self.events.append(("enter", name))
            yield
            self.events.append(("exit", name))

        return enter


class _Generator:
    def __init__(self, log, name, token):
        self.log, self.name, self.token = log, name, token

    def generate(self, input_ids, max_new_tokens, **kwargs):
        self.log.events.append(("generate", self.name, max_new_tokens))
        new = torch.full((input_ids.shape[0], max_new_tokens), self.token)
        return torch.cat([input_ids, new], dim=1)


def test_time_generates_interleaves_and_alternates():
    """Each run is warmed up once inside its own context, then timed `repeats` times, one run of each a round,
    the order reversed every other round; each run's own tokens come back."""
    log = _Log()
    runs = {name: (_Generator(log, name, i), log.context(name)) for i, name in enumerate(("a", "b"))}
    ids = torch.ones(2, 3, dtype=torch.long)
    out = e2e.time_generates(runs, ids, 5, torch.device("cpu"), repeats=3)
    calls = [(e[1], e[2]) for e in log.events if e[0] == "generate"]
    assert calls == [("a", 4), ("b", 4), ("a", 5), ("b", 5), ("b", 5), ("a", 5), ("a", 5), ("b", 5)]
    entered = [e for e in log.events if e[0] != "generate"]
    assert entered == [(k, n) for n in ("a", "b", "a", "b", "b", "a", "a", "b") for k in ("enter", "exit")]
    assert set(out) == {"a", "b"} and all(seconds >= 0 for seconds, _ in out.values())
    assert torch.equal(out["b"][1], torch.full((2, 5), 1))


class _Lora(torch.nn.Module):
    """A stand-in for a peft model: `config.vocab_size`, and a loss from one trainable weight."""

    def __init__(self, log, name):
        super().__init__()
        self.log, self.name = log, name
        self.config = type("Config", (), {"vocab_size": 50})()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, input_ids, labels):
        self.log.events.append(("step", self.name))
        return type("Out", (), {"loss": self.w * input_ids.float().mean()})()


def test_qlora_steps_interleave_on_the_same_batches():
    """Both runs train on the same batches, step by step in alternating order; the timed steps exclude the
    warm-up, the losses include it, and equal models on equal data give equal losses."""
    log = _Log()
    runs = {name: (_Lora(log, name), log.context(name)) for name in ("bnb", "tritonbits")}
    out = e2e.qlora_steps(runs, batch=2, seq=4, steps=3, warmup=1, device=torch.device("cpu"))
    steps = [e[1] for e in log.events if e[0] == "step"]
    assert steps == ["bnb", "tritonbits", "tritonbits", "bnb", "bnb", "tritonbits", "tritonbits", "bnb"]
    for name in runs:
        r = out[name]
        assert len(r["step_s_all"]) == 3 and len(r["losses"]) == 4
        assert r["step_s_min"] <= r["step_s_median"] and r["peak_step_bytes"] is None  # no CUDA: no memory figure
    assert out["bnb"]["losses"] == out["tritonbits"]["losses"]


class _CacheModel:
    """A stand-in for a transformers model: config, generate() logging what it is given."""

    def __init__(self):
        from transformers import LlamaConfig

        self.config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=16)  # fmt: skip
        self.seen = []

    def generate(self, **kwargs):
        self.seen.append(kwargs)
        return kwargs["input_ids"]


def test_static_generate_one_cache_reset_between_calls(monkeypatch):
    """Every call gets the same StaticCache and the compile config; the cache is reset before every call but the
    first (a fresh cache has nothing to reset)."""
    pytest.importorskip("transformers")
    model = _CacheModel()
    run = e2e.StaticGenerate(model, max_cache_len=12, compile_config="cc")
    resets = []
    monkeypatch.setattr(run.cache, "reset", lambda: resets.append(1))
    ids = torch.ones(1, 3, dtype=torch.long)
    for n in range(3):
        e2e.generate(run, ids, 4)
        assert len(resets) == n
    assert all(k["past_key_values"] is run.cache and k["compile_config"] == "cc" for k in model.seen)


def test_allow_and_forbid_compiled_decode():
    class M:
        def _valid_auto_compile_criteria(self, *args):
            return False

    m = M()
    e2e.allow_compiled_decode(m)
    assert m._valid_auto_compile_criteria(None, None) is True
    m._compiled_call = object()
    e2e.forbid_compiled_decode(m)
    assert m._valid_auto_compile_criteria() is False and not hasattr(m, "_compiled_call")


def test_time_generates_back_to_back():
    """interleave=False: each run's warm-ups (the full token count with warmup_tokens=None) and timed calls in one
    context, one run after the other; the warm-up times are reported."""
    log = _Log()
    runs = {name: (_Generator(log, name, i), log.context(name)) for i, name in enumerate(("a", "b"))}
    warm = {}
    out = e2e.time_generates(runs, torch.ones(1, 2, dtype=torch.long), 5, torch.device("cpu"), repeats=2,
                             interleave=False, warmup_tokens=None, warmups=2, warmup_s=warm)  # fmt: skip
    assert log.events == [e for n in ("a", "b") for e in
                          [("enter", n), *[("generate", n, 5)] * 4, ("exit", n)]]  # fmt: skip
    assert set(warm) == {"a", "b"} and all(len(v) == 2 for v in warm.values())
    assert set(out) == {"a", "b"}


def test_device_time_counts_each_gpu_event_once():
    """A CUDA-graph replay's CPU row repeats its kernels' device time: only the device-side events are summed."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    events = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=900.0),  # the graph call
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=700.0),  # its kernels
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=200.0),
              SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=0.0),
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=50.0),  # no CPU row: a copy
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=950.0,
                              is_user_annotation=True)]  # a range over the others  # fmt: skip
    assert e2e.device_time_us(events) == 950.0


def test_device_bound_and_its_report_line():
    ms = {"bnb": 1.2, "tritonbits": 1.0, "bf16": 1.1}
    bound = e2e.device_bound(ms)
    assert bound == {"device_speedup_vs_bnb": 1.2, "device_speedup_vs_bf16": 1.1}
    assert e2e.device_bound({"bnb": 1.2}) == {}
    rec = {"environment": {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "bitsandbytes": "0.50.2",
                           "git_sha": "abc", "date": "2026-11-25T05:00:00Z"},
           "config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 8,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
           "versions": {}, "results": {"decode_compiled": {"batch1": {
               "bnb_tok_s": 300.0, "tritonbits_tok_s": 320.0, "tokens_equal": False, "first_divergence": [5],
               "device_ms_per_step": ms, **bound}}},
           "targets": e2e.judge({}), "errors": {}, "profiles": {}}  # fmt: skip
    text = "\n".join(e2e.markdown_section(rec))
    assert "bnb 1.200, tritonbits 1.000, bf16 1.100 ms; with no host time: 1.20× bnb, 1.10× bf16" in text


def test_qlora_device_line_in_the_report():
    res = results()
    res["qlora"] |= {"device_ms": {"bnb": 50.0, "tritonbits": 40.0}, "device_speedup": 1.25}
    rec = {"environment": {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "bitsandbytes": "0.50.2",
                           "git_sha": "abc", "date": "2026-11-25T05:00:00Z"},
           "config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 8,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000},
           "versions": {}, "results": res, "targets": e2e.judge(res), "errors": {}, "profiles": {}}  # fmt: skip
    text = "\n".join(e2e.markdown_section(rec))
    assert "forward + backward: bnb 50.0, tritonbits 40.0 ms; with no host time: 1.25× bnb (the optimizer" in text
