"""Custom GPU kernels (Triton), each optional: callers check :func:`available` and keep a torch path beside it.

``scores_and_group_max``: one query block's fp16 scores against one corpus chunk, with the maxima of every group of
``GROUP`` adjacent columns computed in the GEMM's epilogue (from the fp32 accumulator tile, still in registers).
search.py's grouped top-k otherwise reads the whole 2 GB score block of a 4096 x 262,144 block once more just for
those maxima (0.78 ms of its 4.14 ms per block on an H200, session 12); here they cost no extra pass. The kernel is
a plain tiled GEMM: whether it matches cuBLAS's 2.55 ms on that block is for scripts/bench_gpu.py's search probe
("fused32") to show; exact_search uses it only when asked (``topk_method="fused"``).

Tested on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_kernels.py).
"""

from __future__ import annotations

import os

import torch

GROUP = 32  # adjacent columns per group maximum (BLOCK_N must be a multiple)

try:  # optional: the CUDA image carries Triton; a CPU install need not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None


def _interpreting() -> bool:
    """Triton's CPU interpreter is on (tests): kernels run in numpy, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str | None = None) -> bool:
    """Triton importable and ``device`` a CUDA device (or Triton's CPU interpreter switched on, for tests)."""
    if triton is None:
        return False
    return _interpreting() or (device is not None and torch.device(device).type == "cuda")


if triton is not None:

    @triton.jit
    def _scores_group_max_kernel(Q, C, S, G, M, N, stride_q, stride_c, stride_s, stride_g,
                                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, SWIZZLE_M: tl.constexpr):
        # K (the embedding width) is a compile-time constant: one specialisation per model width, a loop of known
        # trip count. Tiles go in bands of SWIZZLE_M row tiles, so consecutive programs share corpus tiles in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        band = pid // (SWIZZLE_M * tiles_n)
        first_m = band * SWIZZLE_M
        band_m = min(tiles_m - first_m, SWIZZLE_M)
        pid_m = first_m + (pid % (SWIZZLE_M * tiles_n)) % band_m
        pid_n = (pid % (SWIZZLE_M * tiles_n)) // band_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(Q + rm[:, None] * stride_q + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(C + rn[None, :] * stride_c + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
            acc = tl.dot(a, b, acc)
        scores = acc.to(tl.float16)
        tl.store(S + rm[:, None] * stride_s + rn[None, :], scores, mask=(rm[:, None] < M) & (rn[None, :] < N))
        # columns past the chunk's end must not win a group's maximum
        masked = tl.where(rn[None, :] < N, scores, float("-inf"))
        gmax = tl.max(tl.reshape(masked, (BLOCK_M, BLOCK_N // GROUP_N, GROUP_N)), axis=2)
        rg = pid_n * (BLOCK_N // GROUP_N) + tl.arange(0, BLOCK_N // GROUP_N)
        n_groups = tl.cdiv(N, GROUP_N)
        tl.store(G + rm[:, None] * stride_g + rg[None, :], gmax, mask=(rm[:, None] < M) & (rg[None, :] < n_groups))


#: tile shapes and launch settings scripts/bench_gpu.py's search row times on one block (Hopper fp16 GEMM tiles
#: whose pipelined shared-memory buffers fit in an H100/H200's 227 KB); the first is the default
GPU_TILE_CHOICES = (
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SWIZZLE_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, SWIZZLE_M=8, num_warps=4, num_stages=4),
)
#: the tiles a GPU call uses when given none (not yet tuned on a GPU: the bench's sweep shows the fastest)
GPU_TILES = GPU_TILE_CHOICES[0]
_INTERPRETER_TILES = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, SWIZZLE_M=2)  # numpy runs each program: small tiles


def tile_name(tiles: dict) -> str:
    """A short label of a tile setting: "128x256x64 w8 s3"."""
    return (f"{tiles['BLOCK_M']}x{tiles['BLOCK_N']}x{tiles['BLOCK_K']} w{tiles.get('num_warps', 4)} "
            f"s{tiles.get('num_stages', 3)}")


def scores_and_group_max(queries: torch.Tensor, chunk: torch.Tensor, group: int = GROUP, tiles: dict | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [q, n] fp16 = queries @ chunk.T, group maxima [q, ceil(n / group)] fp16: the maximum of columns
    g * group .. g * group + group - 1, the last group cut at n). Both inputs fp16, rows contiguous. ``tiles``: one
    of ``GPU_TILE_CHOICES`` (default ``GPU_TILES``; small fixed tiles under Triton's interpreter)."""
    if not available(queries.device):
        raise RuntimeError("kernels.scores_and_group_max needs Triton and a CUDA device")
    if queries.dtype != torch.float16 or chunk.dtype != torch.float16:
        raise TypeError(f"fp16 inputs expected, not {queries.dtype} and {chunk.dtype}")
    if queries.shape[1] != chunk.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and chunk {tuple(chunk.shape)} do not match")
    q, c = queries.contiguous(), chunk.contiguous()
    M, K = q.shape
    N = c.shape[0]
    tiles = dict(tiles or (_INTERPRETER_TILES if _interpreting() else GPU_TILES))
    if tiles["BLOCK_N"] % group:
        raise ValueError(f"group {group} must divide the tile width {tiles['BLOCK_N']}")
    scores = torch.empty((M, N), dtype=torch.float16, device=q.device)
    gmax = torch.empty((M, -(-N // group)), dtype=torch.float16, device=q.device)
    grid = (triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]),)
    _scores_group_max_kernel[grid](q, c, scores, gmax, M, N, q.stride(0), c.stride(0), scores.stride(0),
                                   gmax.stride(0), K=K, GROUP_N=group, **tiles)
    return scores, gmax
