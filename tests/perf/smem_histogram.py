"""The tap's alternative that was measured and not adopted: a shared-memory histogram in CUDA C++.

Compiled at run time with NVRTC through torch's private ``torch.cuda._compile_kernel`` and
launched with ctypes. Prints, in a CUDA graph (us per call, ratio to a torch copy of the ids),
the shipped Triton tap (``ours``) against this kernel at 64-512 threads per block (4 ids per
thread, one shared atomic per id, one global atomic per nonzero bin into 16 stripes); with
``floor``, the launch floor of each path (empty kernels, copies). The figures and the decision
are in the notes of ``moe_record_sdk/counter_triton.py``.

    python tests/perf/smem_histogram.py [T,T,...] | floor
"""

from __future__ import annotations

import os
import sys

import torch
import triton

from moe_record_sdk.bench import _graph_timer, _methods

sys.path.insert(0, os.path.dirname(__file__))
from tune_tap import _copy, _empty, _median  # noqa: E402

SRC = r"""
extern "C" __global__ void hist_stat(const int* __restrict__ ids, int n, long long* __restrict__ counts,
                                     int S, int G, const long long* __restrict__ enabled) {
    __shared__ int h[NB];
    const int tid = threadIdx.x;
    const int base = (blockIdx.x * blockDim.x + tid) * 4;
    int4 v = make_int4(-1, -1, -1, -1);
    if (base + 3 < n) {
        v = __ldg(reinterpret_cast<const int4*>(ids + base));
    } else {
        if (base < n) v.x = ids[base];
        if (base + 1 < n) v.y = ids[base + 1];
        if (base + 2 < n) v.z = ids[base + 2];
    }
    const long long on = *enabled;
    for (int b = tid; b < NB; b += blockDim.x) h[b] = 0;
    __syncthreads();
    if ((unsigned)v.x < (unsigned)S) atomicAdd(&h[v.x], 1);
    if ((unsigned)v.y < (unsigned)S) atomicAdd(&h[v.y], 1);
    if ((unsigned)v.z < (unsigned)S) atomicAdd(&h[v.z], 1);
    if ((unsigned)v.w < (unsigned)S) atomicAdd(&h[v.w], 1);
    __syncthreads();
    if (!on) return;
    unsigned long long* c = reinterpret_cast<unsigned long long*>(counts) + (size_t)(blockIdx.x % G) * S;
    for (int b = tid; b < S; b += blockDim.x) {
        const int x = h[b];
        if (x) atomicAdd(c + b, (unsigned long long)x);
    }
}
"""

EXTRA = r"""
extern "C" __global__ void empty_k(const long long* __restrict__ enabled, int* out) {
    if (*enabled < 0) out[0] = 1;
}
extern "C" __global__ void copy_k(const int4* __restrict__ src, int4* __restrict__ dst, int n4) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) dst[i] = src[i];
}
extern "C" __global__ void bar_k(const long long* __restrict__ enabled, int* out) {
    __shared__ int h[256];
    h[threadIdx.x] = 0;
    __syncthreads();
    atomicAdd(&h[(threadIdx.x * 7) & 255], 1);
    __syncthreads();
    if (*enabled < 0) out[threadIdx.x] = h[threadIdx.x];
}
"""


def floor() -> None:
    empty_k = torch.cuda._compile_kernel(EXTRA, "empty_k")
    copy_k = torch.cuda._compile_kernel(EXTRA, "copy_k")
    bar_k = torch.cuda._compile_kernel(EXTRA, "bar_k")
    flag = torch.ones((), dtype=torch.int64, device="cuda")
    for T in (1, 1024, 16384):
        src = torch.randint(0, 256, (T * 8,), dtype=torch.int32, device="cuda")
        dst = torch.empty_like(src)
        n = src.numel()
        n4 = n // 4
        s, d = src, dst  # bound as defaults: each lambda keeps this T's buffers
        timers = {
            "t_empty": _graph_timer(lambda i, d=d: _empty[(1,)](flag, d), 64, 5),
            "c_empty": _graph_timer(lambda i, d=d: empty_k((1, 1, 1), (32, 1, 1), [flag, d]), 64, 5),
            "c_bar": _graph_timer(lambda i, d=d: bar_k((1, 1, 1), (256, 1, 1), [flag, d]), 64, 5),
            "t_copy": _graph_timer(lambda i, s=s, d=d, n=n: _copy[(triton.cdiv(n, 1024),)](s, d, n, BLOCK=1024), 64, 5),
            "c_copy": _graph_timer(
                lambda i, s=s, d=d, n4=n4: copy_k((max(1, -(-n4 // 256)), 1, 1), (256, 1, 1), [s, d, n4]), 64, 5
            ),
            "torch_copy": _graph_timer(lambda i, s=s, d=d: d.copy_(s), 64, 5),
        }
        m = _median(timers, 15)
        print(f"floor T={T}: " + " ".join(f"{k}={v:.2f}" for k, v in m.items()), flush=True)


def main() -> None:
    E = 256
    tokens = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "1,16,128,1024,4096,16384").split(",")]
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    kern = torch.cuda._compile_kernel(SRC.replace("NB", "256"), "hist_stat")
    G = 16
    counts = torch.zeros(G, E, dtype=torch.int64, device="cuda")
    enabled = torch.ones((), dtype=torch.int64, device="cuda")
    for T in tokens:
        fns, _ = _methods(torch.device("cuda"), E, T, 8, torch.int32)
        gen = torch.Generator().manual_seed(T)
        ids = [torch.randint(-1, E + 1, (T, 8), generator=gen, dtype=torch.int32).cuda() for _ in range(8)]
        n = T * 8
        timers = {k: _graph_timer(fns[k], 64, 5) for k in ("ours", "copy")}
        for threads in (64, 128, 256, 512):
            blocks = -(-n // (threads * 4))

            def fn(i: int, threads: int = threads, blocks: int = blocks, ids: list = ids, n: int = n) -> None:
                kern((blocks, 1, 1), (threads, 1, 1), [ids[i % 8], n, counts, E, G, enabled])

            counts.zero_()
            fn(0)
            torch.cuda.synchronize()
            flat = ids[0].flatten().long()
            ref = torch.bincount(flat[(flat >= 0) & (flat < E)], minlength=E)
            if not torch.equal(counts.sum(0), ref):
                print(f"T={T} t{threads}: WRONG", flush=True)
                continue
            timers[f"smem{threads}"] = _graph_timer(fn, 64, 5)
        m = _median(timers, 15)
        print(f"T={T}: " + " ".join(f"{k}={v:.2f}({v / m['copy']:.2f})" for k, v in m.items()), flush=True)


if __name__ == "__main__":
    floor() if sys.argv[1:] == ["floor"] else main()
