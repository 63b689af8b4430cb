"""End-to-end benchmark of tritonbits behind bitsandbytes (tritonbits.integrations.bitsandbytes) on a real
model architecture: a Llama built from a ``LlamaConfig`` with Llama-3-8B layer dimensions (hidden 4096,
intermediate 14336, 32 heads, 8 KV heads), a few layers and a small vocabulary, random weights saved with
``save_pretrained`` to a temp dir and loaded back through transformers'
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=torch.bfloat16)``. Nothing is downloaded.

Phases (each one's failure is caught into the record, the others still run):
1. load: from_pretrained to the GPU (quantization happens there), bnb vs enabled, alternating, best of three
   each; the quantized bytes of the two models compared;
2. decode: greedy generate() of 128 new tokens at batch 1 and 8, tokens/s for bnb, enabled and the bf16 model,
   the best of three runs, bnb's and enabled's interleaved round by round; the generated tokens of bnb vs
   enabled compared (first divergence per row);
   2b. decode_compiled: the same through transformers' static cache and compiled decode step (StaticGenerate:
   torch.compile "reduce-overhead", CUDA graphs), where the host time of a step is gone and the kernels decide;
3. qlora: a QLoRA step (peft LoRA r=16 on all linear layers, bf16 adapters, AdamW, batch 4 x 512): the two
   models trained side by side, their steps interleaved (8 timed after 2 warm-up steps each): median and best
   step time, the largest step peak of memory, and the losses, bnb vs enabled;
The interleaving is for a shared, noisy GPU host: session 13's e2e record 20261124T022043Z, with each mode's
steps back to back, had QLoRA steps of 0.09-0.19 s within one mode.
4. profile: torch.profiler top ops of a short decode and of a QLoRA step, bnb and enabled.

    python -m tritonbits_harness.e2e --gpu=h100 --record-dir=docs/gpu-runs     # what `nox -s e2e-h100` runs
    TRITON_INTERPRET=1 python -m tritonbits_harness.e2e --tiny                  # the plumbing on CPU (no record)

The tiny CPU version of this flow with exact assertions is packages/kernels/tests/test_integration_bnb.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import statistics
import sys
import tempfile
import time
import traceback

import torch

from . import throttle

# Targets of issue 13 (H100): ratio = tritonbits-enabled speed / baseline speed.
TARGETS = {
    "load_speedup_vs_bnb": 3.0,
    "decode_b1_speedup_vs_bnb": 1.5,
    "decode_b1_speedup_vs_bf16": 1.2,
    "decode_b8_speedup_vs_bnb": 1.5,
    "qlora_step_speedup_vs_bnb": 1.1,
}
# The same decode targets, judged again on the compiled static-cache decode (phase decode_compiled)
COMPILED_TARGETS = {
    "decode_compiled_b1_speedup_vs_bnb": 1.5,
    "decode_compiled_b1_speedup_vs_bf16": 1.2,
    "decode_compiled_b8_speedup_vs_bnb": 1.5,
}


# --- building blocks (shared with the CPU test) -------------------------------------------------------------


def llama_config(hidden=4096, intermediate=14336, layers=8, heads=32, kv_heads=8, vocab=32000, max_positions=2048):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip


def save_random_model(cfg, path, seed: int = 0, device: str | torch.device = "cpu") -> None:
    """A bf16 LlamaForCausalLM with random weights (transformers' init, std 0.02), saved to `path`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(dtype=torch.bfloat16)  # type: ignore[call-arg]
    model.save_pretrained(path)
    del model


def bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def load_4bit(path, device: str | torch.device):
    from transformers import LlamaForCausalLM

    device = torch.device(device)
    model = LlamaForCausalLM.from_pretrained(path, quantization_config=bnb_config(), device_map=device.type,
                                             dtype=torch.bfloat16)  # fmt: skip
    if device.type == "cpu":
        # bnb's AVX512-BF16 CPU path repacks the weight into its own CPU layout at the first no-grad forward and
        # then calls its CPU gemv, never the 4-bit ops: off, so that the CPU flow is the GPU's (gemm_4bit op)
        import bitsandbytes as bnb

        for mod in model.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                mod.support_avx512bf16_for_cpu = False
    return model.eval()


def load_bf16(path, device: str | torch.device):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, device_map=torch.device(device).type, dtype=torch.bfloat16).eval()


def add_lora(model, r: int = 16, seed: int = 0):
    """peft LoRA r on all linear layers, adapters in bf16 (the same initial values for a given seed)."""
    import peft

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", bias="none",
                          task_type="CAUSAL_LM")  # fmt: skip
    lora = peft.get_peft_model(model, cfg)
    for name, p in lora.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    lora.train()
    return lora


def quantized_weights(model) -> dict[str, torch.Tensor]:
    """Every Linear4bit's quantized bytes: packed weight, absmax, and the nested state."""
    import bitsandbytes as bnb

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = mod.weight.quant_state  # type: ignore[attr-defined]
            name = name.removeprefix("base_model.model.")
            out[f"{name}.weight"] = mod.weight.data
            out[f"{name}.absmax"] = qs.absmax  # type: ignore[attr-defined]
            if qs.nested:
                out[f"{name}.state2.absmax"] = qs.state2.absmax
                out[f"{name}.offset"] = qs.offset.reshape(())
    return out


# --- measuring ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _mode(name: str, devices: tuple[str, ...]):
    import tritonbits.integrations.bitsandbytes as tb_bnb

    if name == "tritonbits":
        return tb_bnb.enabled(devices)  # decode="auto": bnb's fused kernel where it measured faster
    if name == "tritonbits_linear":
        return tb_bnb.enabled(devices, decode="tritonbits")  # linear_4bit at every M
    return contextlib.nullcontext()


class StaticGenerate:
    """``generate()`` with transformers' static cache and its compiled decode step (transformers' own recipe for a
    static cache: the prefill runs eagerly, every decode step through ``model.get_compiled_call(compile_config)``;
    transformers' default CompileConfig is Inductor, mode "reduce-overhead" (CUDA graphs), static shapes). One
    ``StaticCache`` per (model, batch), reset before each call after the first, so that the compiled step and its
    CUDA graphs meet the same cache tensors on every call. Call ``allow_compiled_decode(model)`` first."""

    def __init__(self, model, max_cache_len: int, compile_config):
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.compile_config = compile_config
        self.calls = 0

    def generate(self, **kwargs):
        if self.calls:
            self.cache.reset()
        self.calls += 1
        return self.model.generate(past_key_values=self.cache, compile_config=self.compile_config, **kwargs)


def allow_compiled_decode(model) -> None:
    """Let ``generate()`` compile `model`'s decode step given a static cache.
    NOTE: transformers does so by itself for the bf16 model but not for a bnb 4-bit one (its quantizer's
    ``is_compileable`` is False in transformers 5), although bnb 0.50's 4-bit layers trace without a graph break
    (a tiny Llama: one graph, checked with torch._dynamo.explain); setting the check on the instance, for every
    model alike, makes the three decode through the same compiled call. ``forbid_compiled_decode`` undoes it."""
    model._valid_auto_compile_criteria = lambda *args, **kwargs: True


def forbid_compiled_decode(model) -> None:
    for name in ("_valid_auto_compile_criteria", "_compiled_call", "_last_compile_config"):
        model.__dict__.pop(name, None)


def generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0,
                             eos_token_id=None, temperature=None, top_p=None, top_k=None)  # fmt: skip
    return out[:, ids.shape[1] :]


# tokens of the profiled compiled decode (the prefill and the first token, then PROFILED_TOKENS - 1 replays)
PROFILED_TOKENS = 16


def device_bound(ms_per_step: dict) -> dict:
    """What the enabled model's decode step would gain with no host time at all: the ratios of the models' GPU
    time a compiled decode step (``generate()``'s loop around the replayed graph is host time the ratio leaves
    out), the ceiling of what the kernels can give the measured tokens/s."""
    tb = ms_per_step.get("tritonbits")
    return {f"device_speedup_vs_{m}": ms_per_step[m] / tb for m in ("bnb", "bf16") if m in ms_per_step and tb}


def _alternating(runs: dict, round_: int) -> list:
    """runs' items in order on even rounds, reversed on odd ones: no run always goes first."""
    items = list(runs.items())
    return items if round_ % 2 == 0 else items[::-1]


def _timed_generate(model, ids, new_tokens, device) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    tokens = generate(model, ids, new_tokens)
    _sync(device)
    return time.perf_counter() - t0, tokens


def time_generates(
    runs: dict,
    ids,
    new_tokens,
    device,
    repeats=3,
    interleave=True,
    warmup_tokens: int | None = 4,
    warmups: int = 1,
    warmup_s: dict | None = None,
) -> dict[str, tuple[float, torch.Tensor]]:
    """{name: (best seconds of `repeats` runs, the generated tokens)} for runs {name: (model, context factory)}:
    each warmed up `warmups` times (`warmup_tokens` new tokens; None: `new_tokens`, as a static cache sized by
    the call needs), then the runs interleaved round by round, the order reversed every other round (a burst
    of host noise on a shared machine lands on every run of a round, not on one run's whole measurement). With
    interleave=False each run's warm-ups and timed calls go back to back, inside one context (a compiled run:
    its CUDA graphs are recorded once, by its own warm-ups). `warmup_s`: filled with each run's warm-up times."""
    warm = new_tokens if warmup_tokens is None else warmup_tokens
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, torch.Tensor] = {}
    if not interleave:
        for name, (model, context) in runs.items():
            with context():
                spent = [_timed_generate(model, ids, warm, device)[0] for _ in range(warmups)]
                for _ in range(repeats):
                    seconds, tokens[name] = _timed_generate(model, ids, new_tokens, device)
                    times[name].append(seconds)
            if warmup_s is not None:
                warmup_s[name] = spent
        return {name: (min(times[name]), tokens[name]) for name in runs}
    for name, (model, context) in runs.items():
        with context():
            spent = [_timed_generate(model, ids, warm, device)[0] for _ in range(warmups)]
        if warmup_s is not None:
            warmup_s[name] = spent
    for r in range(repeats):
        for name, (model, context) in _alternating(runs, r):
            with context():
                seconds, tokens[name] = _timed_generate(model, ids, new_tokens, device)
                times[name].append(seconds)
    return {name: (min(times[name]), tokens[name]) for name in runs}


@contextlib.contextmanager
def _timed_quantize(device: torch.device):
    """Time every bitsandbytes.functional.quantize_4bit call (whichever function is installed now: bnb's, or
    tritonbits' when enabled), synchronized around each; yields [seconds, calls]."""
    import bitsandbytes.functional as F

    inner, spent = F.quantize_4bit, [0.0, 0]

    def timed(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        _sync(device)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        return out

    F.quantize_4bit = timed
    try:
        yield spent
    finally:
        F.quantize_4bit = inner


def _compare(row: dict, bnb_tokens: torch.Tensor, tritonbits_tokens: torch.Tensor) -> None:
    """A decode row's comparisons: the first divergence per row of the two token sets, and the enabled model's
    tokens/s over bnb's (and the bf16 model's, where the row has it)."""
    div = first_divergence(bnb_tokens, tritonbits_tokens)
    row["first_divergence"] = div
    row["tokens_equal"] = all(d is None for d in div)
    row["speedup_vs_bnb"] = row["tritonbits_tok_s"] / row["bnb_tok_s"]
    if "bf16_tok_s" in row:
        row["speedup_vs_bf16"] = row["tritonbits_tok_s"] / row["bf16_tok_s"]


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> list[int | None]:
    """Per row, the index of the first differing generated token (None where the rows are equal)."""
    rows = []
    for ra, rb in zip(a.tolist(), b.tolist(), strict=True):
        rows.append(next((i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y), None))
    return rows


@dataclasses.dataclass
class _Steps:
    """One run's timed QLoRA steps (qlora_steps): seconds, losses (warm-up included), step peaks above allocated."""

    times: list[float] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    peaks: list[int] = dataclasses.field(default_factory=list)
    resident: int | None = None  # allocated when the first timed step began
    peak: int | None = None  # the allocator's peak over the timed steps


def qlora_steps(runs: dict, batch: int, seq: int, steps: int, warmup: int, device, seed: int = 0) -> dict:
    """Train each of runs {name: (LoRA model, context factory)} on the same batches with its own AdamW, the runs
    interleaved step by step, the order reversed every other step (host noise lands on both alike). Per run: the
    median and the best timed step, every step's time and loss, and the largest step peak: the allocator's peak
    during a step above what was allocated when it began (weights, adapters, optimizer state and whatever else the
    process holds, the other run's model included: the figure compared between runs)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = next(iter(runs.values()))[0].config.vocab_size
    data = [torch.randint(3, vocab, (batch, seq), generator=gen).to(device) for _ in range(warmup + steps)]
    opts = {name: torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
            for name, (lora, _) in runs.items()}  # fmt: skip
    rec = {name: _Steps() for name in runs}
    cuda = device.type == "cuda"
    for i, ids in enumerate(data):
        for name, (lora, context) in _alternating(runs, i):
            r = rec[name]
            with context():
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    resident = torch.cuda.memory_allocated(device)
                _sync(device)
                t0 = time.perf_counter()
                loss = lora(input_ids=ids, labels=ids).loss
                loss.backward()
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                _sync(device)
                spent = time.perf_counter() - t0
            r.losses.append(float(loss.detach().float().item()))
            if i >= warmup:
                r.times.append(spent)
                if cuda:
                    peak = torch.cuda.max_memory_allocated(device)
                    r.peaks.append(peak - resident)
                    r.resident = resident if r.resident is None else r.resident
                    r.peak = max(r.peak or 0, peak)
    return {name: {"step_s_median": statistics.median(r.times), "step_s_min": min(r.times), "step_s_all": r.times,
                   "losses": r.losses, "peak_memory_bytes": r.peak, "resident_bytes": r.resident,
                   "peak_step_bytes": max(r.peaks) if r.peaks else None}
            for name, r in rec.items()}  # fmt: skip


def profile_table(fn, device, rows: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    try:
        table = averages.table(sort_by=key, row_limit=rows)
    except (AttributeError, KeyError, ValueError):  # an older torch names the device column cuda
        table = averages.table(sort_by=key.replace("device", "cuda"), row_limit=rows)
    top = []
    for evt in sorted(averages, key=lambda e: float(getattr(e, key, 0.0) or 0.0), reverse=True)[:rows]:
        top.append({"name": evt.key, "count": evt.count,
                    "self_device_us": float(getattr(evt, "self_device_time_total", 0.0) or 0.0),
                    "self_cpu_us": float(evt.self_cpu_time_total)})  # fmt: skip
    return {"sort": key, "table": table, "top": top, "device_us_total": device_time_us(averages)}


def device_time_us(averages) -> float:
    """The GPU's busy time in a profile: the self device time of its device-side events (kernels, copies), each
    counted once. The CPU-side ops' device columns are left out: they repeat the time of what they launched (a
    CUDA-graph replay's row carries every kernel of the graph, which the profile also lists one by one); so are
    GPU user annotations (ranges over other events), as torch's own "Self CUDA time total" leaves them out."""
    from torch.autograd import DeviceType

    return sum(float(getattr(e, "self_device_time_total", 0.0) or 0.0) for e in averages
               if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU
               and not getattr(e, "is_user_annotation", False))  # fmt: skip


# --- the benchmark ------------------------------------------------------------------------------------------


class Run:
    def __init__(self, args, console):
        self.args = args
        self.console = console
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.devices: tuple[str, ...] = ("cuda", "cpu") if args.tiny else ("cuda",)
        self.results: dict = {}
        self.errors: dict[str, str] = {}
        self.t_start = time.perf_counter()

    def log(self, msg: str) -> None:
        self.console.print(f"[dim]{time.perf_counter() - self.t_start:7.1f}s[/dim] {msg}")

    def phase(self, name: str, fn) -> None:
        self.log(f"[bold]{name}[/bold]")
        try:
            fn()
        except Exception as e:
            self.errors[name] = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:]
            self.console.print(f"[red]{name} failed:[/red] {type(e).__name__}: {e}")
        finally:
            _free()

    # phases
    def load(self, path) -> None:
        import tritonbits.integrations.bitsandbytes as tb_bnb

        tb_bnb.enable(self.devices)  # compile tritonbits' quantizers before timing (Triton's cache, first load)
        side = 64 if self.args.tiny else 4096
        warm = torch.randn(side, side, device=self.device, dtype=torch.bfloat16)
        import bitsandbytes.functional as F

        F.quantize_4bit(warm, quant_type="nf4", compress_statistics=True)
        tb_bnb.disable()
        F.quantize_4bit(warm, quant_type="nf4", compress_statistics=True)
        del warm
        times: dict[str, list[float]] = {"bnb": [], "tritonbits": []}
        for _ in range(self.args.load_repeats):
            for mode in ("bnb", "tritonbits"):
                self.models.pop(mode, None)
                _free()
                with _mode(mode, self.devices):
                    _sync(self.device)
                    t0 = time.perf_counter()
                    model = load_4bit(path, self.device)
                    _sync(self.device)
                    times[mode].append(time.perf_counter() - t0)
                self.models[mode] = model
                self.log(f"  load {mode}: {times[mode][-1]:.2f} s")
        wb, wt = quantized_weights(self.models["bnb"]), quantized_weights(self.models["tritonbits"])
        differ = [k for k in wb if not torch.equal(wb[k], wt[k])]
        self.results["load"] = {
            "bnb_s": min(times["bnb"]), "tritonbits_s": min(times["tritonbits"]), "all_s": times,
            "speedup": min(times["bnb"]) / min(times["tritonbits"]),
            "quantized_tensors": len(wb), "quantized_tensors_differing": differ,
        }  # fmt: skip
        # where the load's time goes: one more load per mode with bnb.functional.quantize_4bit timed (synchronized
        # around each call, so not part of the wall times above)
        for mode in ("bnb", "tritonbits"):
            with _mode(mode, self.devices), _timed_quantize(self.device) as spent:
                model = load_4bit(path, self.device)
            del model
            _free()
            self.results["load"][f"{mode}_quantize_s"] = spent[0]
            self.results["load"][f"{mode}_quantize_calls"] = spent[1]
            self.log(f"  load {mode}: {spent[0]:.3f} s inside quantize_4bit ({spent[1]} calls)")
        self.results["load"]["quantize_speedup"] = (self.results["load"]["bnb_quantize_s"]
                                                    / self.results["load"]["tritonbits_quantize_s"])  # fmt: skip

    def decode(self, path) -> None:
        a = self.args
        gen = torch.Generator().manual_seed(1)
        out: dict = {"new_tokens": a.new_tokens, "prompt_len": a.prompt_len}
        tokens: dict = {}
        bf16 = load_bf16(path, self.device) if a.bf16 else None  # interleaved with the others (best of 3 each)
        try:
            for batch in a.batches:
                ids = torch.randint(3, self.cfg.vocab_size, (batch, a.prompt_len), generator=gen).to(self.device)
                row: dict = {}
                runs: dict[str, tuple] = {mode: (self.models["bnb" if mode == "bnb" else "tritonbits"],
                               functools.partial(_mode, mode, self.devices))
                        for mode in ("bnb", "tritonbits", "tritonbits_linear")}  # fmt: skip
                if bf16 is not None:
                    runs["bf16"] = (bf16, contextlib.nullcontext)
                for mode, (s, toks) in time_generates(runs, ids, a.new_tokens, self.device).items():
                    tokens[mode, batch] = toks
                    row[f"{mode}_tok_s"] = batch * a.new_tokens / s
                    self.log(f"  decode batch {batch} {mode}: {row[f'{mode}_tok_s']:.1f} tok/s")
                _compare(row, tokens["bnb", batch], tokens["tritonbits", batch])
                # enable(decode="tritonbits"): linear_4bit's decode kernel in every layer, for the record
                row["linear_first_divergence"] = first_divergence(tokens["bnb", batch],
                                                                  tokens["tritonbits_linear", batch])  # fmt: skip
                row["linear_speedup_vs_bnb"] = row["tritonbits_linear_tok_s"] / row["bnb_tok_s"]
                out[f"batch{batch}"] = row
                self.decode_ids = getattr(self, "decode_ids", {}) | {batch: ids}
        finally:
            del bf16
        self.results["decode"] = out

    def decode_compiled(self, path) -> None:
        """Phase 2b: the decode of phase 2 through transformers' static cache and compiled decode step
        (StaticGenerate: CUDA graphs on the GPU), bnb vs enabled (decode="auto") vs the bf16 model, each mode's
        runs back to back after two full-length warm-ups; the same prompts as phase 2. The enabled model reuses
        the Inductor graph traced for bnb's (the same ops: bnb's torch.library ops, whose kernel is chosen at run
        time) and records its own CUDA graphs (cudagraph trees check the weights' addresses). A CUDA graph replays
        the kernels it recorded whatever enable() says later, so each model keeps one mode here: decode="tritonbits"
        is not timed (with "auto" the one-row products run linear_4bit under capture too)."""
        from transformers import CompileConfig

        a = self.args
        cc = CompileConfig(backend="eager", mode="default") if a.tiny else CompileConfig()
        out: dict = {"new_tokens": a.new_tokens, "prompt_len": a.prompt_len, "compile_config": cc.to_dict()}
        models = {"bnb": self.models["bnb"], "tritonbits": self.models["tritonbits"]}
        if a.bf16:
            models["bf16"] = load_bf16(path, self.device)
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        old_limit = getattr(torch._dynamo.config, limit)
        setattr(torch._dynamo.config, limit, max(old_limit, 64))  # a graph per model and batch: no eager fallback
        gen = torch.Generator().manual_seed(1)
        from torch._dynamo.utils import counters

        self.results["decode_compiled"] = out  # what finished stays, should a later batch fail
        try:
            torch._logging.set_logs(perf_hints=True)
            for model in models.values():
                allow_compiled_decode(model)
            for batch in a.batches:
                ids = getattr(self, "decode_ids", {}).get(batch)
                if ids is None:
                    ids = torch.randint(3, self.cfg.vocab_size, (batch, a.prompt_len), generator=gen).to(self.device)
                counters["inductor"].clear()
                runs = {mode: (StaticGenerate(model, a.prompt_len + a.new_tokens, cc),
                               functools.partial(_mode, mode, self.devices))
                        for mode, model in models.items()}  # fmt: skip
                warm: dict = {}
                row: dict = {}
                timed = time_generates(runs, ids, a.new_tokens, self.device, interleave=False, warmup_tokens=None,
                                       warmups=2, warmup_s=warm)  # fmt: skip
                for mode, (seconds, _) in timed.items():
                    row[f"{mode}_tok_s"] = batch * a.new_tokens / seconds
                    row[f"{mode}_warmup_s"] = warm[mode]
                    self.log(f"  compiled decode batch {batch} {mode}: {row[f'{mode}_tok_s']:.1f} tok/s (warm-ups "
                             f"{', '.join(f'{w:.1f}' for w in warm[mode])} s)")  # fmt: skip
                # Inductor counts each compiled graph it did not put in a CUDA graph (the reason goes to the
                # perf_hints log, on for this phase)
                row["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
                _compare(row, timed["bnb"][1], timed["tritonbits"][1])
                out[f"batch{batch}"] = row
                if a.profile and batch == 1:  # where a compiled step's time goes (PROFILED_TOKENS, the same cache)
                    row["device_ms_per_step"] = {}
                    for mode in runs:
                        with _mode(mode, self.devices):
                            prof = profile_table(lambda run=runs[mode][0], ids=ids: generate(run, ids, PROFILED_TOKENS),
                                                 self.device)  # fmt: skip
                            self.profiles[f"decode_compiled_b1_{mode}"] = prof
                            # the prefill and the first token alone, taken out of the profiled tokens' GPU time
                            first = profile_table(lambda run=runs[mode][0], ids=ids: generate(run, ids, 1), self.device)
                        steps = PROFILED_TOKENS - 1  # the compiled decode steps of the profiled generate()
                        row["device_ms_per_step"][mode] = (prof["device_us_total"] - first["device_us_total"]) / (
                            steps * 1e3
                        )
                    row |= device_bound(row["device_ms_per_step"])
        finally:
            torch._logging.set_logs()  # the defaults (a TORCH_LOGS setting is not put back)
            setattr(torch._dynamo.config, limit, old_limit)
            for model in models.values():
                forbid_compiled_decode(model)
            models.clear()
            torch._dynamo.reset()

    def qlora(self) -> None:
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                f"peft is not installed here ({e}): the QLoRA phase needs it (carry a peft wheel)"
            ) from e
        a = self.args
        out: dict = {"r": 16, "batch": a.qlora_batch, "seq": a.qlora_seq, "steps": a.qlora_steps}
        runs = {}
        for mode in ("bnb", "tritonbits"):
            with _mode(mode, self.devices):
                runs[mode] = (
                    add_lora(self.models.pop(mode), r=16, seed=0),
                    functools.partial(_mode, mode, self.devices),
                )
        out |= qlora_steps(runs, a.qlora_batch, a.qlora_seq, a.qlora_steps, a.qlora_warmup, self.device)
        for mode, (lora, context) in runs.items():
            if a.profile:  # forward + backward of one batch; bnb's table only with --profile-bnb
                ids = torch.randint(3, 100, (a.qlora_batch, a.qlora_seq), device=self.device)
                with context():
                    prof = profile_table(lambda lora=lora, ids=ids: lora(input_ids=ids, labels=ids).loss.backward(),
                                         self.device)  # fmt: skip
                out.setdefault("device_ms", {})[mode] = prof["device_us_total"] / 1e3
                if mode == "tritonbits" or a.profile_bnb:
                    self.profiles[f"qlora_step_{mode}"] = prof
            r = out[mode]
            self.log(f"  qlora {mode}: {r['step_s_median'] * 1e3:.1f} ms/step (best {r['step_s_min'] * 1e3:.1f}), "
                     f"step peak {_gib(r['peak_step_bytes'])} above {_gib(r['resident_bytes'])} resident, "
                     f"losses {r['losses']}")  # fmt: skip
        del runs, lora
        _free()
        out["speedup"] = out["bnb"]["step_s_median"] / out["tritonbits"]["step_s_median"]
        out["speedup_best"] = out["bnb"]["step_s_min"] / out["tritonbits"]["step_s_min"]
        ms = out.get("device_ms", {})
        if len(ms) == 2 and ms["tritonbits"] > 0:  # what forward + backward would gain with no host time
            out["device_speedup"] = ms["bnb"] / ms["tritonbits"]
        out["losses_equal"] = out["bnb"]["losses"] == out["tritonbits"]["losses"]
        pb, pt = out["bnb"]["peak_step_bytes"], out["tritonbits"]["peak_step_bytes"]
        out["peak_memory_ratio"] = (pt / pb) if pb and pt else None
        self.results["qlora"] = out

    def profile_decode(self) -> None:
        ids = self.decode_ids[1]
        for mode in ("bnb", "tritonbits"):
            with _mode(mode, self.devices):
                self.profiles[f"decode_b1_{mode}"] = profile_table(
                    lambda mode=mode: generate(self.models[mode], ids, 16), self.device
                )

    def main(self) -> dict:
        a = self.args
        self.models: dict = {}
        self.profiles: dict = {}
        self.cfg = (llama_config(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=128) if a.tiny
                    else llama_config(layers=a.layers, vocab=a.vocab))  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="tritonbits-e2e-") as tmp:
            self.log(f"saving a random Llama ({self.cfg.num_hidden_layers} layers, hidden {self.cfg.hidden_size}, "
                     f"intermediate {self.cfg.intermediate_size}) to {tmp}")  # fmt: skip
            try:  # random init on the GPU (seconds); the CPU if that fails (a minute or more)
                save_random_model(self.cfg, tmp, seed=0, device=self.device)
            except Exception as e:
                self.errors["save_on_device"] = f"{type(e).__name__}: {e}"
                self.log(f"[yellow]random init on {self.device} failed ({e}); on the CPU[/yellow]")
                _free()
                save_random_model(self.cfg, tmp, seed=0, device="cpu")
            _free()
            self.phase("load", lambda: self.load(tmp))
            if len(self.models) == 2:
                self.phase("decode", lambda: self.decode(tmp))
                if a.compiled_decode:
                    self.phase("decode_compiled", lambda: self.decode_compiled(tmp))
                if a.profile:
                    self.phase("profile_decode", self.profile_decode)
                if a.qlora_steps:
                    self.phase("qlora", self.qlora)
        self.models.clear()
        return {
            "config": {k: getattr(self.cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads", "vocab_size")},
            "args": {k: v for k, v in vars(a).items() if k != "record_dir"},
            "versions": _versions(),
            "results": self.results,
            "targets": judge(self.results),
            "profiles": self.profiles,
            "errors": self.errors,
            "wall_s": time.perf_counter() - self.t_start,
        }  # fmt: skip


def _versions() -> dict:
    out = {}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def judge(results: dict) -> dict:
    """Each target with its measured figure and whether it is met (None: not measured)."""
    load, dec, ql = results.get("load", {}), results.get("decode", {}), results.get("qlora", {})
    b1, b8 = dec.get("batch1", {}), dec.get("batch8", {})
    figures = {
        "load_speedup_vs_bnb": load.get("speedup"),
        "decode_b1_speedup_vs_bnb": b1.get("speedup_vs_bnb"),
        "decode_b1_speedup_vs_bf16": b1.get("speedup_vs_bf16"),
        "decode_b8_speedup_vs_bnb": b8.get("speedup_vs_bnb"),
        "qlora_step_speedup_vs_bnb": ql.get("speedup"),
    }
    cdec = results.get("decode_compiled", {})
    c1, c8 = cdec.get("batch1", {}), cdec.get("batch8", {})
    figures |= {
        "decode_compiled_b1_speedup_vs_bnb": c1.get("speedup_vs_bnb"),
        "decode_compiled_b1_speedup_vs_bf16": c1.get("speedup_vs_bf16"),
        "decode_compiled_b8_speedup_vs_bnb": c8.get("speedup_vs_bnb"),
    }
    targets = TARGETS | COMPILED_TARGETS
    out = {k: {"target": targets[k], "measured": v, "met": None if v is None else v >= targets[k]}
           for k, v in figures.items()}  # fmt: skip
    ratio = ql.get("peak_memory_ratio")
    out["qlora_peak_memory_vs_bnb"] = {"target": 1.0, "measured": ratio, "met": None if ratio is None else ratio <= 1.0}
    return out


def summary(record: dict, console) -> None:
    from rich.table import Table

    table = Table(title="tritonbits behind bitsandbytes, end to end")
    for col in ("figure", "measured", "target", "met"):
        table.add_column(col)
    for name, t in record["targets"].items():
        m = t["measured"]
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[t["met"]]
        table.add_row(name, "-" if m is None else f"{m:.2f}x", f"{'<=' if 'memory' in name else '>='} {t['target']}x",
                      met)  # fmt: skip
    console.print(table)
    r = record["results"]
    if "load" in r:
        ld = r["load"]
        console.print(f"load: bnb {ld['bnb_s']:.2f} s, tritonbits {ld['tritonbits_s']:.2f} s; inside quantize_4bit: "
                      f"bnb {ld.get('bnb_quantize_s', float('nan')):.3f} s, tritonbits "
                      f"{ld.get('tritonbits_quantize_s', float('nan')):.3f} s; quantized tensors differing: "
                      f"{len(ld['quantized_tensors_differing'])}")  # fmt: skip
    for key, row in r.get("decode", {}).items():
        if key.startswith("batch"):
            console.print(f"decode {key}: bnb {row['bnb_tok_s']:.1f}, tritonbits {row['tritonbits_tok_s']:.1f}, "
                          f"bf16 {row.get('bf16_tok_s', float('nan')):.1f} tok/s; tokens equal: {row['tokens_equal']} "
                          f"(first divergence per row: {row['first_divergence']})")  # fmt: skip
    for key, row in r.get("decode_compiled", {}).items():
        if key.startswith("batch"):
            console.print(f"compiled decode {key}: bnb {row['bnb_tok_s']:.1f}, tritonbits "
                          f"{row['tritonbits_tok_s']:.1f}, bf16 {row.get('bf16_tok_s', float('nan')):.1f} tok/s; "
                          f"tokens equal: {row['tokens_equal']} (first divergence per row: "
                          f"{row['first_divergence']})")  # fmt: skip
            if "device_ms_per_step" in row:
                console.print(f"  {_device_line(row)}")
    if "qlora" in r:
        q = r["qlora"]
        console.print(f"qlora: bnb {q['bnb']['step_s_median'] * 1e3:.1f} ms, tritonbits "
                      f"{q['tritonbits']['step_s_median'] * 1e3:.1f} ms; peak memory ratio {q['peak_memory_ratio']}; "
                      f"losses equal: {q['losses_equal']}")  # fmt: skip
        if "device_speedup" in q:
            console.print(f"  {_qlora_device_line(q)}")
    for name, prof in record["profiles"].items():
        console.print(f"[bold]{name}[/bold] (top ops by {prof['sort']})")
        console.print(prof["table"], markup=False, highlight=False)
    for phase, err in record["errors"].items():
        console.print(f"[red]{phase} failed[/red]:\n{err}", markup=False)


def _device_line(row: dict) -> str:
    ms = ", ".join(f"{m} {v:.3f}" for m, v in row["device_ms_per_step"].items())
    bound = ", ".join(f"{_x(row[k])} {k.rsplit('_', 1)[1]}" for k in ("device_speedup_vs_bnb", "device_speedup_vs_bf16")
                      if k in row)  # fmt: skip
    return f"GPU time a compiled decode step (profiled, the prefill taken out): {ms} ms; with no host time: {bound}"


def _qlora_device_line(q: dict) -> str:
    ms = q["device_ms"]
    return (f"GPU time of a profiled forward + backward: bnb {ms['bnb']:.1f}, tritonbits {ms['tritonbits']:.1f} ms; "
            f"with no host time: {_x(q['device_speedup'])} bnb (the optimizer step left out)")  # fmt: skip


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b else "—"


def _x(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def markdown_section(record: dict) -> list[str]:
    """The report's section for an e2e record (docs/benchmarks.md)."""
    e, c, r = record["environment"], record["config"], record["results"]
    out = ["### End to end: tritonbits behind bitsandbytes (transformers + peft)", "",
           f"Run: {e['device']}, torch {e['torch']}, triton {e['triton']}, bitsandbytes {e['bitsandbytes']}, "
           f"transformers {record['versions'].get('transformers')}, peft {record['versions'].get('peft')}, "
           f"git {e['git_sha']}, {e['date']}. Model: Llama, hidden {c['hidden_size']}, intermediate "
           f"{c['intermediate_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
           f"{c['num_key_value_heads']} heads, vocab {c['vocab_size']}; NF4 double-quantized, bf16 compute.", "",
           "| figure | measured | target | met |", "|---|---|---|---|"]  # fmt: skip
    for name, t in record["targets"].items():
        met = {True: "yes", False: "no", None: "—"}[t["met"]]
        out.append(f"| {name} | {_x(t['measured'])} | {'<=' if 'memory' in name else '>='} {t['target']}× | {met} |")
    out.append("")
    if "load" in r:
        ld = r["load"]
        quant = ""
        if "tritonbits_quantize_s" in ld:
            quant = (f"; inside quantize_4bit: bnb {ld['bnb_quantize_s']:.3f} s, "
                     f"tritonbits {ld['tritonbits_quantize_s']:.3f} s")  # fmt: skip
        out.append(f"- load: bnb {ld['bnb_s']:.2f} s, tritonbits {ld['tritonbits_s']:.2f} s{quant}; quantized "
                   f"tensors differing: {len(ld['quantized_tensors_differing'])} of "
                   f"{ld['quantized_tensors']}")  # fmt: skip
    for key, row in r.get("decode", {}).items():
        if key.startswith("batch"):
            bf16 = f", bf16 {row['bf16_tok_s']:.1f}" if "bf16_tok_s" in row else ""
            if "tritonbits_linear_tok_s" in row:
                bf16 += f', tritonbits with decode="tritonbits" {row["tritonbits_linear_tok_s"]:.1f}'
            out.append(f"- decode {key}: bnb {row['bnb_tok_s']:.1f}, tritonbits {row['tritonbits_tok_s']:.1f}{bf16} "
                       f"tok/s; generated tokens equal: {row['tokens_equal']} (first divergence per row: "
                       f"{row['first_divergence']})")  # fmt: skip
    for key, row in r.get("decode_compiled", {}).items():
        if key.startswith("batch"):
            bf16 = f", bf16 {row['bf16_tok_s']:.1f}" if "bf16_tok_s" in row else ""
            out.append(f"- decode {key}, static cache + compiled decode step (CUDA graphs): bnb "
                       f"{row['bnb_tok_s']:.1f}, tritonbits {row['tritonbits_tok_s']:.1f}{bf16} tok/s; generated "
                       f"tokens equal: {row['tokens_equal']} (first divergence per row: "
                       f"{row['first_divergence']})")  # fmt: skip
            if "device_ms_per_step" in row:
                out.append(f"  - {_device_line(row)}")
    if "qlora" in r:
        q = r["qlora"]
        bnb, tb = q["bnb"], q["tritonbits"]
        best = ""
        if "step_s_min" in bnb and "step_s_min" in tb:  # records before the interleaved steps have no best step
            best = f" (best step: bnb {bnb['step_s_min'] * 1e3:.1f}, tritonbits {tb['step_s_min'] * 1e3:.1f} ms)"
        out.append(f"- QLoRA step (r=16, batch {q['batch']} x {q['seq']}, median): bnb "
                   f"{bnb['step_s_median'] * 1e3:.1f} ms / {_gib(bnb['peak_step_bytes'])}, tritonbits "
                   f"{tb['step_s_median'] * 1e3:.1f} ms "
                   f"/ {_gib(tb['peak_step_bytes'])} (step peak above resident){best}; losses equal: "
                   f"{q['losses_equal']}")  # fmt: skip
        if "device_speedup" in q:
            out.append(f"  - {_qlora_device_line(q)}")
    for phase in record.get("errors", {}):
        out.append(f"- phase {phase} failed (traceback in the record)")
    for name, prof in record.get("profiles", {}).items():
        top = ", ".join(f"{t['name']} {t['self_device_us'] / 1e3:.1f} ms" for t in prof["top"][:5])
        out.append(f"- top ops, {name}: {top}")
    return [*out, ""]


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", help="the GPU profile this run is for (h100, h200, ...); refuses another GPU")
    p.add_argument("--any-gpu", action="store_true", help="run on whatever GPU is present")
    p.add_argument("--record-dir", default=None, help="write the JSON record here (docs/gpu-runs)")
    p.add_argument("--tiny", action="store_true", help="CPU plumbing run: hidden 64, 1 layer, interpreter")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument(
        "--no-compiled-decode",
        dest="compiled_decode",
        action="store_false",
        help="skip phase 2b (static cache, compiled decode step)",
    )
    p.add_argument("--qlora-batch", type=int, default=4)
    p.add_argument("--qlora-seq", type=int, default=512)
    p.add_argument("--qlora-steps", type=int, default=8)
    p.add_argument("--qlora-warmup", type=int, default=2)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument(
        "--profile-bnb",
        action="store_true",
        help="also keep bnb's QLoRA step table (its GPU time is measured either way)",
    )
    args = p.parse_args(argv)
    console = Console()
    import os

    # no download: the model is built here; the GPU machine has no network (a hub lookup would hang or fail)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            console.print("--tiny runs on CPU tensors: set TRITON_INTERPRET=1")
            return 2
        args.new_tokens, args.prompt_len, args.qlora_seq, args.qlora_steps = 4, 8, 16, 1
        args.qlora_warmup, args.load_repeats, args.profile = 1, 1, False
    else:
        from . import gpus

        dev = gpus.current_device()
        if dev is None:
            console.print("no CUDA device: the e2e benchmark needs a GPU (or --tiny under TRITON_INTERPRET=1)")
            return 2
        if args.gpu and not args.any_gpu and (dev.profile is None or dev.profile.name != args.gpu):
            console.print(f"--gpu={args.gpu} but this is a {dev.name}; pass --any-gpu to run anyway")
            return 2
    run = Run(args, console)
    with throttle.Watch(torch.cuda.current_device() if not args.tiny else 0, enabled=not args.tiny) as watch:
        record = run.main()
    if not args.tiny:
        record["throttle"] = watch.record()
        warning = watch.warning()
        if warning:
            record.setdefault("notes", []).append(warning)
            console.print(f"[red]{warning}")
    summary(record, console)
    if args.record_dir and not args.tiny:
        from . import records

        path = records.write(args.record_dir, "e2e", args.gpu or "any", record)
        console.print(f"record: {path}")
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
