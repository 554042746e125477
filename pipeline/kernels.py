"""Custom GPU kernels (Triton), each optional: callers check :func:`available` and keep a torch path beside it.

``scores_and_group_max``: one query block's fp16 scores against one corpus chunk, with the maxima of every group of
``GROUP`` adjacent columns computed in the GEMM's epilogue (from the fp32 accumulator tile, still in registers).
search.py's grouped top-k otherwise reads the whole 2 GB score block of a 4096 x 262,144 block once more just for
those maxima (0.78 ms of its 4.14 ms per block on an H200, session 12); here they cost no extra pass. Three forms
of the same tiled GEMM: operands loaded through pointers (``cp.async`` pipelines), or loaded and stored by Hopper's
TMA, one tile per program or persistent (one program per multiprocessor). Whether one of them matches cuBLAS's
2.55 ms on that block, and at which tile shape, is for scripts/bench_gpu.py's search row to show (it times every
``GPU_TILE_CHOICES`` entry on one block); exact_search uses the kernel only when asked (``topk_method="fused"``).

Tested on the CPU with Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_kernels.py), and compiled there
ahead of time for sm_90 (tensor-core GEMMs, TMA copies, shared memory within an H100/H200's limit).
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
    def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWIZZLE_M: tl.constexpr):
        # tiles go in bands of SWIZZLE_M row tiles, so tiles computed together share corpus tiles in L2
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        band = tile // (SWIZZLE_M * tiles_n)
        first_m = band * SWIZZLE_M
        band_m = min(tiles_m - first_m, SWIZZLE_M)
        pid_m = first_m + (tile % (SWIZZLE_M * tiles_n)) % band_m
        pid_n = (tile % (SWIZZLE_M * tiles_n)) // band_m
        return pid_m, pid_n

    @triton.jit
    def _store_group_max(scores, G, pid_m, pid_n, M, N, stride_g, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         GROUP_N: tl.constexpr):
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # columns past the chunk's end must not win a group's maximum
        masked = tl.where(rn[None, :] < N, scores, float("-inf"))
        gmax = tl.max(tl.reshape(masked, (BLOCK_M, BLOCK_N // GROUP_N, GROUP_N)), axis=2)
        rg = pid_n * (BLOCK_N // GROUP_N) + tl.arange(0, BLOCK_N // GROUP_N)
        n_groups = tl.cdiv(N, GROUP_N)
        tl.store(G + rm[:, None] * stride_g + rg[None, :], gmax, mask=(rm[:, None] < M) & (rg[None, :] < n_groups))

    @triton.jit
    def _scores_group_max_kernel(Q, C, S, G, M, N, stride_q, stride_c, stride_s, stride_g,
                                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, SWIZZLE_M: tl.constexpr):
        # one output tile per program, operands loaded through pointers. K (the embedding width) is a compile-time
        # constant: one specialisation per model width, a loop of known trip count, and no mask along K where
        # BLOCK_K divides it
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, SWIZZLE_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            if K % BLOCK_K == 0:
                a = tl.load(Q + rm[:, None] * stride_q + kk[None, :], mask=rm[:, None] < M, other=0.0)
                b = tl.load(C + rn[None, :] * stride_c + kk[:, None], mask=rn[None, :] < N, other=0.0)
            else:
                a = tl.load(Q + rm[:, None] * stride_q + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                            other=0.0)
                b = tl.load(C + rn[None, :] * stride_c + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K),
                            other=0.0)
            acc = tl.dot(a, b, acc)
        scores = acc.to(tl.float16)
        tl.store(S + rm[:, None] * stride_s + rn[None, :], scores, mask=(rm[:, None] < M) & (rn[None, :] < N))
        _store_group_max(scores, G, pid_m, pid_n, M, N, stride_g, BLOCK_M, BLOCK_N, GROUP_N)

    @triton.jit
    def _scores_group_max_tma_kernel(q_desc, c_desc, s_desc, G, M, N, stride_g, PROGRAMS, K: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                     GROUP_N: tl.constexpr, SWIZZLE_M: tl.constexpr, TILES: tl.constexpr):
        # the same tiles with the operands loaded, and the scores stored, by the tensor-memory accelerator (Hopper's
        # TMA: whole tiles in one instruction, out-of-bounds rows read as zeros and never written). Each of the
        # PROGRAMS programs computes up to TILES tiles, PROGRAMS apart (TILES 1: one tile per program; more: a
        # persistent kernel with one program per multiprocessor). TILES is a compile-time constant, rounded up by
        # the caller to few distinct values; tiles past the last are skipped
        tiles_total = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for i in range(0, TILES):
            tile = tl.program_id(0) + i * PROGRAMS
            if tile < tiles_total:
                pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, SWIZZLE_M)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    a = q_desc.load([pid_m * BLOCK_M, k0])
                    b = c_desc.load([pid_n * BLOCK_N, k0])
                    acc = tl.dot(a, b.T, acc)
                scores = acc.to(tl.float16)
                s_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], scores)
                _store_group_max(scores, G, pid_m, pid_n, M, N, stride_g, BLOCK_M, BLOCK_N, GROUP_N)


#: tile shapes, launch settings and kernel ("pointer": operands loaded through pointers, one tile per program;
#: "tma": loads and score stores by Hopper's TMA, one tile per program; "tma_persistent": the same with one program
#: per multiprocessor looping over tiles) that scripts/bench_gpu.py's search row times on one block. Each one's
#: pipelined shared-memory buffers (and the TMA kernels' score tile for its store) fit in an H100/H200's 227 KB.
#: The first is the default
GPU_TILE_CHOICES = (
    dict(kernel="pointer", BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=3),
    dict(kernel="pointer", BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=4),
    dict(kernel="pointer", BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=3),
    dict(kernel="pointer", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=4),
    dict(kernel="tma", BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=3),
    dict(kernel="tma", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=4),
    dict(kernel="tma_persistent", BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=3),
    dict(kernel="tma_persistent", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SWIZZLE_M=8, num_warps=8, num_stages=4),
)
#: the tiles a GPU call uses when given none (not yet tuned on a GPU: the bench's sweep shows the fastest)
GPU_TILES = GPU_TILE_CHOICES[0]
_INTERPRETER_TILES = dict(kernel="pointer", BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, SWIZZLE_M=2)  # numpy runs each
#                                                                                               program: small tiles
_KERNELS = ("pointer", "tma", "tma_persistent")


def tile_name(tiles: dict) -> str:
    """A short label of a tile setting: "pointer 128x256x64 w8 s3"."""
    return (f"{tiles.get('kernel', 'pointer')} {tiles['BLOCK_M']}x{tiles['BLOCK_N']}x{tiles['BLOCK_K']} "
            f"w{tiles.get('num_warps', 4)} s{tiles.get('num_stages', 3)}")


def _programs(device: torch.device) -> int:
    """Programs of a persistent kernel: one per multiprocessor (3 under the interpreter, to exercise the loop)."""
    if _interpreting():
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


# the pointer kernel's element offsets (row x row stride + column) are 32-bit: a launch covers at most this many
_INT32_ELEMENTS = 2**31


def scores_and_group_max(queries: torch.Tensor, chunk: torch.Tensor, group: int = GROUP, tiles: dict | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [q, n] fp16 = queries @ chunk.T, group maxima [q, ceil(n / group)] fp16: the maximum of columns
    g * group .. g * group + group - 1, the last group cut at n). Both inputs fp16, rows contiguous. ``tiles``: one
    of ``GPU_TILE_CHOICES`` (default ``GPU_TILES``; small fixed tiles under Triton's interpreter). The TMA kernels
    need a width that is a multiple of 8 (16-byte rows) and a GPU of compute capability 9.0 or later; their scores
    are a view of a buffer whose rows are padded to a multiple of 8 columns."""
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
    kind = tiles.pop("kernel", "pointer")
    if kind not in _KERNELS:
        raise ValueError(f"unknown kernel {kind!r}: one of {_KERNELS}")
    if tiles["BLOCK_N"] % group:
        raise ValueError(f"group {group} must divide the tile width {tiles['BLOCK_N']}")
    gmax = torch.empty((M, -(-N // group)), dtype=torch.float16, device=q.device)
    tiles_total = triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"])
    if kind == "pointer":
        if N * K >= _INT32_ELEMENTS:
            raise ValueError(f"a chunk of {N} x {K} is past the kernel's 32-bit offsets: use a smaller corpus chunk")
        scores = torch.empty((M, N), dtype=torch.float16, device=q.device)
        # bands of query rows whose score offsets fit 32 bits (one band up to 8,191 queries x 262,144 columns);
        # past it the kernel would write before its buffer
        band = max(1, (_INT32_ELEMENTS - 1) // max(N, K))
        for r0 in range(0, M, band):
            r1 = min(M, r0 + band)
            grid = (triton.cdiv(r1 - r0, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"]),)
            _scores_group_max_kernel[grid](q[r0:r1], c, scores[r0:r1], gmax[r0:r1], r1 - r0, N, q.stride(0),
                                           c.stride(0), scores.stride(0), gmax.stride(0), K=K, GROUP_N=group, **tiles)
        return scores, gmax
    if K % 8 or not (_interpreting() or torch.cuda.get_device_capability(q.device)[0] >= 9):
        raise ValueError(f"the {kind} kernel needs a width divisible by 8 and a Hopper GPU or later (width {K})")
    from triton.tools.tensor_descriptor import TensorDescriptor

    padded = torch.empty((M, -(-N // 8) * 8), dtype=torch.float16, device=q.device)
    bm, bn, bk = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]
    q_desc = TensorDescriptor(q, [M, K], [K, 1], [bm, bk])
    c_desc = TensorDescriptor(c, [N, K], [K, 1], [bn, bk])
    s_desc = TensorDescriptor(padded, [M, N], [padded.shape[1], 1], [bm, bn])
    programs = min(tiles_total, _programs(q.device)) if kind == "tma_persistent" else tiles_total
    per_program = triton.next_power_of_2(triton.cdiv(tiles_total, programs))  # few distinct compiled loops
    _scores_group_max_tma_kernel[(programs,)](q_desc, c_desc, s_desc, gmax, M, N, gmax.stride(0), programs, K=K,
                                              GROUP_N=group, TILES=per_program, **tiles)
    return padded[:, :N], gmax
