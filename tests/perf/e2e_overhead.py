"""End-to-end cost of recording on a Qwen3-MoE-like transformers model (random weights), one GPU.

The model: 128 experts, top-8, hidden 2048, expert width 768, 32 query / 4 KV heads, ``--layers``
MoE layers (default 8), experts through transformers' ``grouped_mm`` path (capturable), bf16.
Weights are random: routing is then close to uniform, which is the harder case for a counter
(every expert's bin is hit).

Measured, all in one run, interleaved, medians of ``--trials``:

* decode steps at batch 1, 8, 64 (one new token per sequence, ``use_cache=False``: without a KV
  cache a step does less work than a real decode step, so the overhead it shows is an upper
  bound), each captured once in a CUDA graph per configuration and replayed;
* the same decode steps eagerly (the host launches every kernel);
* prefill of 4k and 16k tokens, eager (``logits_to_keep=1``, as generation does);

for each configuration: ``off`` (no adapter), ``stopped`` (``moe_record_torch.attach`` with the
recorder never started: the hooks run, the kernel sees the flag off), ``stat``, ``per_pass``,
``per_token``. The table gives milliseconds per step and the overhead against ``off``.
After timing, the ``stat`` recorder's counts are checked against the number of tokens replayed.

    python tests/perf/e2e_overhead.py [--layers 8] [--trials 15] [--eager-reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

CONFIGS = ("off", "stopped", "stat", "per_pass", "per_token")


def build_model(layers: int, vocab: int):
    import transformers as T

    config = T.Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        max_position_embeddings=32768,
        experts_implementation="grouped_mm",
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = T.Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


class Setup:
    """One configuration: its recorder (None for ``off``) and how to attach it."""

    def __init__(self, name: str, model) -> None:
        from moe_record_torch import attach

        self.name, self.model, self.recorder = name, model, None
        if name != "off":
            att = attach(model, mode="stat" if name == "stopped" else name)
            self.recorder = att.recorder
            att.detach()
            if name != "stopped":
                self.recorder.start()

    def __enter__(self):
        from moe_record_torch import attach

        self.att = None if self.recorder is None else attach(self.model, recorder=self.recorder)
        return self

    def __exit__(self, *exc) -> None:
        if self.att is not None:
            self.att.detach()


def _events_ms(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _capture(model, ids: torch.Tensor) -> torch.cuda.CUDAGraph:
    def step():
        return model(input_ids=ids, use_cache=False).logits

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--prefill", default="4096,16384")
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--reps", type=int, default=20, help="graph replays per timing")
    p.add_argument("--eager-reps", type=int, default=3, help="eager decode steps per timing")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("e2e_overhead: needs a CUDA GPU", file=sys.stderr)
        return 2
    batches = [int(v) for v in a.batches.split(",") if v]
    prefills = [int(v) for v in a.prefill.split(",") if v]
    t0 = time.time()
    model = build_model(a.layers, a.vocab)
    setups = {name: Setup(name, model) for name in CONFIGS}
    gen = torch.Generator(device="cuda").manual_seed(1)
    decode_ids = {B: torch.randint(0, a.vocab, (B, 1), device="cuda", generator=gen) for B in batches}
    prefill_ids = {T: torch.randint(0, a.vocab, (1, T), device="cuda", generator=gen) for T in prefills}

    graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
    with torch.inference_mode():
        for name, s in setups.items():
            with s:
                for B in batches:
                    graphs[name, B] = _capture(model, decode_ids[B])
    for name, s in setups.items():  # a new window: the capture's warm-up steps are not timed
        if name not in ("off", "stopped"):
            s.recorder.start()
    print(f"model built and {len(graphs)} graphs captured in {time.time() - t0:.0f} s", file=sys.stderr)

    shapes = [("graph", B) for B in batches] + [("eager", B) for B in batches] + [("prefill", T) for T in prefills]
    samples: dict[tuple[str, int, str], list[float]] = {(w, n, c): [] for w, n in shapes for c in CONFIGS}
    replayed = {B: 0 for B in batches}  # graph replays of the stat configuration
    with torch.inference_mode():
        for trial in range(a.trials + 1):  # trial 0 warms up and is not kept
            for where, n in shapes:
                for name, s in setups.items():
                    if where == "graph":
                        ms = _events_ms(graphs[name, n].replay, a.reps)
                        replayed[n] += a.reps if name == "stat" else 0
                    elif where == "eager":
                        with s:
                            ms = _events_ms(lambda n=n: model(input_ids=decode_ids[n], use_cache=False), a.eager_reps)
                    else:
                        with s:
                            ms = _events_ms(
                                lambda n=n: model(input_ids=prefill_ids[n], use_cache=False, logits_to_keep=1), 1
                            )
                    if trial:
                        samples[where, n, name].append(ms)
    torch.cuda.synchronize()

    # The stat recorder saw every stat graph replay, eager step and prefill: check the counts.
    stat = setups["stat"].recorder
    total = stat.dump().total_count()
    expect = sum(B * r for B, r in replayed.items()) + (a.trials + 1) * (a.eager_reps * sum(batches) + sum(prefills))
    per_layer = total.sum(1)[stat.layer_ids] // 8
    assert per_layer.tolist() == [expect] * len(stat.layer_ids), (per_layer.tolist(), expect)

    rows = []
    for where, n in shapes:
        med = {c: statistics.median(samples[where, n, c]) for c in CONFIGS}
        rows.append({"where": where, "size": n} | {c: med[c] for c in CONFIGS})
    env = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "triton": getattr(__import__("triton"), "__version__", None),
        "layers": a.layers,
        "vocab": a.vocab,
        "trials": a.trials,
        "eager_reps": a.eager_reps,
        "stripes": stat.counter.stripes.shape[0],
        "date": time.strftime("%Y-%m-%d"),
        "tokens_checked": expect,
    }
    print_table(rows, env)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "unit": "ms per step", "rows": rows}, f, indent=2)
    return 0


def print_table(rows: list[dict], env: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    console.print(
        f"[bold]e2e overhead[/]: {env['card']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"triton {env['triton']}, Qwen3-MoE-like {env['layers']} MoE layers x 128 experts top-8, "
        f"hidden 2048, bf16, median of {env['trials']}, {env['date']}"
    )
    table = Table(box=box.SIMPLE_HEAD, title="ms per step; overhead vs off", title_justify="left")
    table.add_column("shape")
    for c in CONFIGS:
        table.add_column(c, justify="right")
    for c in CONFIGS[1:]:
        table.add_column(f"{c} %", justify="right", style="bold")
    names = {
        "graph": "decode B={} (CUDA graph)",
        "eager": "decode B={} (eager)",
        "prefill": "prefill {} tokens (eager)",
    }
    for r in rows:
        off = r["off"]
        table.add_row(
            names[r["where"]].format(r["size"]),
            *(f"{r[c]:.3f}" for c in CONFIGS),
            *(f"{100 * (r[c] / off - 1):+.2f}" for c in CONFIGS[1:]),
        )
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
