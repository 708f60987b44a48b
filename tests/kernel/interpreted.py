"""Run the Triton tap under Triton's interpreter (``TRITON_INTERPRET=1``, set by the caller)
on the CPU and compare every buffer it writes with the torch path's, over random batches.

    TRITON_INTERPRET=1 python tests/kernel/interpreted.py
"""

from __future__ import annotations

import os
import sys

import torch
import triton.language as tl
import triton.runtime.interpreter as interpreter

from moe_record_sdk.counter import Counter
from moe_record_sdk.counter_triton import LAUNCH


def _fix_comparisons() -> None:
    """Triton 3.9's interpreter tags a comparison's result with its operands' dtype, not int1,
    so a mask built from it (``flag != 0 & ...``) reaches an atomic as int64 and is refused.
    Tag the results int1, as the compiler does."""
    for name in dir(interpreter.InterpreterBuilder):
        if name.startswith(("create_icmp", "create_fcmp")):
            compare = getattr(interpreter.InterpreterBuilder, name)

            def tagged(self, lhs, rhs, compare=compare):
                return interpreter.TensorHandle(compare(self, lhs, rhs).data.astype(bool), tl.int1)

            setattr(interpreter.InterpreterBuilder, name, tagged)


def _pair(mode: str, E: int, k: int, tokens: int) -> tuple[Counter, Counter]:
    ring = 0 if mode == "stat" else 5
    kernel = Counter([0, 2, 3], E, k, "cpu", ring_rows=ring, token_slots=tokens, stripes=3)
    kernel.kernel = "triton"
    reference = Counter([0, 2, 3], E, k, "cpu", ring_rows=ring, token_slots=tokens, stripes=1)
    for c in (kernel, reference):
        c.set_enabled(True, mode == "per_token")
    return kernel, reference


def _same(kernel: Counter, reference: Counter) -> list[str]:
    """Names of the buffers where the two paths differ (the token ring's trash row N aside: the
    torch path writes dropped tokens there, the kernel masks them)."""
    bad = [] if torch.equal(kernel.total_counts(), reference.total_counts()) else ["counts"]
    for name in ("rows", "row_pass", "row_tokens", "row_layer_tokens", "row_layer_ids", "token_cursor", "passes"):
        a, b = getattr(kernel, name), getattr(reference, name)
        if a is not None and not torch.equal(a, b):
            bad.append(name)
    if kernel.token_ids is not None:
        N = kernel.token_slots
        if not torch.equal(kernel.token_ids[:, :N], reference.token_ids[:, :N]):
            bad.append("token_ids")
    return bad


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    _fix_comparisons()
    g = torch.Generator().manual_seed(0)
    cases = 0
    # (mode, token ring slots, rounds of batch sizes): a ring of 97 wraps within most passes; one
    # of 1500 holds a prefill-sized pass (several ids per thread) whole, then wraps within it.
    for mode, tokens, rounds in (("stat", 0, 1), ("per_pass", 0, 1), ("per_token", 97, 1), ("per_token", 1500, 2)):
        # Past 32767 experts the token ring holds int32 ids, not int16.
        for E, k in ((16, 2), (60, 8), (40000, 2)) if tokens < 1500 else ((60, 8),):
            kernel, reference = _pair(mode, E, k, tokens)
            # Decode-sized batches and prefill-sized ones (another launch shape).
            for T in (0, 1, 3, 40, 97, LAUNCH[0][0] // k + 7) * rounds:
                for layer in (0, 2, 3, 2):  # layer 2 twice: two micro-batches
                    dtype = (torch.int32, torch.int64)[cases % 2]
                    ids = torch.randint(-3, E + 3, (T, k), generator=g, dtype=dtype)
                    if cases % 3 == 0:  # non-contiguous: every other column of a wider tensor
                        ids = torch.randint(-3, E + 3, (T, 2 * k), generator=g, dtype=dtype)[:, ::2]
                    nv = (None, T - 1, torch.tensor(max(T - layer, 0)), T + 5, -1)[cases % 5]
                    for c in (kernel, reference):
                        c.record(layer, ids, nv)
                    cases += 1
                for c in (kernel, reference):
                    c.step()
                bad = _same(kernel, reference)
                if bad:
                    print(f"{mode} E={E} k={k} T={T}: the kernel differs from the torch path in {bad}")
                    return 1
            kernel.set_enabled(False, False)  # a disabled tap counts nothing
            reference.set_enabled(False, False)
            for c in (kernel, reference):
                c.record(2, torch.zeros(5, k, dtype=torch.int64))
                c.step()
            if _same(kernel, reference) or int(kernel.total_counts().sum()) == 0:
                print(f"{mode}: a disabled tap changed the counters, or nothing was counted")
                return 1
    print(f"the kernel equals the torch path in {cases} taps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
