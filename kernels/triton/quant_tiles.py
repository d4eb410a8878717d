"""Weight tiles of the Triton grouped GEMMs, dense or quantized (w8a16 / w4a16): kernels/triton/gemm_kernels.py.

Both GEMM kernels take a constexpr QUANT (QUANT_MODES: 0 dense weights, 1 int8 codes, 2 int4 codes) and QGROUP (G,
weights per scale; 1 when dense) and read every weight tile through `weight_ptrs` / `weight_tile` below, so the
dense GEMMs (gemm1, gemm2) and the quantized ones (qgemm1, qgemm2) are one kernel source each; QUANT = 0
compiles to the dense kernel as it was.

Format (kernels/quant.py, the natural layout, what the launchers pass): codes (E, N, Kd) int8, or (E, N, Kd/2)
uint8 for int4 with two codes per byte along Kd (low nibble: the code of even k, high nibble: odd k, value
nibble - 8); scales (E, N, Kd/G) float16; a weight is code * scale.

Dequantization, in the main loop: load the code tile, widen to fp32, multiply by the group scale (fp16 -> fp32:
the product of a code and a scale is exact in fp32), round once to the activations' dtype, then tl.dot in that
dtype with fp32 accumulation (fp32 activations: an ieee fp32 dot, so the fp32 result matches the reference, which
computes on the same dequantized values). int8 loads the (BLOCK_K, BLOCK_N) codes. int4 loads the (BLOCK_K/2,
BLOCK_N) bytes once, splits their nibbles and interleaves them back along K (tl.join, permute, reshape: row 2j is
byte j's low nibble, row 2j+1 its high one). The other way, vLLM's gptq_awq kernel's, loads a (BLOCK_K, BLOCK_N)
tile of bytes (each byte twice) and shifts each by 4 * (k % 2): compiled ahead of time for a gated 64 x 64 x 64
tile it took 255 registers and spilled 450-670 bytes on sm_80 and sm_90, where this one takes 254 (sm_80) and
151 (sm_90) without spilling, and it stages a byte per code in shared memory where this one stages half.

A K step lies inside one scale group: the Triton space requires BLOCK_K to divide G (schedules/triton.py,
`block_k_divides_group`; the kernel asserts it statically), so a tile's scales are one (BLOCK_N,) vector, loaded
once per step at group k0 // G, instead of a (BLOCK_K, BLOCK_N) gather of repeated scales (vLLM's gptq_awq kernel
loads them per element: as many scale loads as code loads). Since G divides Kd, so does BLOCK_K: no K tail, so
a code tile is masked by its columns only.
"""

from __future__ import annotations

import triton
import triton.language as tl

QUANT_MODES = {"none": 0, "int8": 1, "int4": 2}
CODE_PTR = {"int8": "*i8", "int4": "*u8"}  # the codes' Triton pointer type (ahead-of-time signatures)
SCALE_PTR = "*fp16"


@triton.jit
def weight_ptrs(w_base, cols, ks, stride_wn, QUANT: tl.constexpr):
    """Pointers of the weight tile at reduction offset 0: (BLOCK_K, BLOCK_N), column c and step k -> its weight or
    code; int4: (BLOCK_K / 2, BLOCK_N), step j -> the byte holding the codes of k = 2j and 2j + 1."""
    kk = tl.arange(0, ks.shape[0] // 2) if QUANT == 2 else ks
    return w_base + cols[None, :].to(tl.int64) * stride_wn + kk[:, None]


@triton.jit
def weight_tile(w_ptrs, s_ptrs, k0, ks, mask, col_ok, QUANT: tl.constexpr, QGROUP: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) weight tile at reduction offset k0: the dense weights as stored, or the codes
    dequantized in fp32 (the caller casts to the activations' dtype). s_ptrs: (BLOCK_N,) pointers of the
    columns' first scale; mask: (BLOCK_K, BLOCK_N) in range (dense); col_ok: (BLOCK_N,) columns in range (a
    quantized tile never crosses the reduction's end: BLOCK_K divides G, which divides it)."""
    if QUANT == 0:
        tile = tl.load(w_ptrs + k0, mask=mask, other=0.0)
    else:
        if QUANT == 1:
            codes = tl.load(w_ptrs + k0, mask=col_ok[None, :], other=0).to(tl.float32)
        else:
            byte = tl.load(w_ptrs + k0 // 2, mask=col_ok[None, :], other=0)  # (BLOCK_K / 2, BLOCK_N)
            pair = tl.join(byte & 15, byte >> 4)  # (BLOCK_K / 2, BLOCK_N, 2): even k, odd k
            nib = tl.reshape(tl.permute(pair, (0, 2, 1)), (ks.shape[0], byte.shape[1]))
            codes = nib.to(tl.float32) - 8.0
        scale = tl.load(s_ptrs + k0 // QGROUP, mask=col_ok, other=0.0).to(tl.float32)
        tile = codes * scale[None, :]
    return tile


# ---- host side: what a launch and an ahead-of-time spec pass for the weight --------------------------------
def quant_constexprs(problem) -> dict:
    quant = problem.quant
    return {"QUANT": QUANT_MODES[quant], "QGROUP": problem["G"] if quant != "none" else 1}


def check_point(problem, point) -> None:
    """A quantized GEMM's point must keep a K step inside one scale group (and on a byte for int4)."""
    if problem.quant != "none" and (problem["G"] % point["BLOCK_K"] or point["BLOCK_K"] % 2):
        raise ValueError(
            f"{problem.op}: BLOCK_K={point['BLOCK_K']} must divide the quant group G={problem['G']} "
            "(schedules/triton.py: block_k_divides_group)"
        )


def weight_strides(w, s) -> tuple[int, int, int, int]:
    """(stride_we, stride_wn, stride_se, stride_sn) of a launch: s None for dense weights (never read)."""
    return w.stride(0), w.stride(1), (s.stride(0) if s is not None else 0), (s.stride(1) if s is not None else 0)


def aot_weight(problem, dtype_ptr: str, n_rows: int, kd: int) -> tuple[dict[str, str], dict[str, int]]:
    """The weight's pointer types and representative strides for an ahead-of-time spec: a (E, n_rows, kd)
    weight in the natural layout (contiguous, as the launchers pass it)."""
    quant = problem.quant
    if quant == "none":
        types = {"w_ptr": dtype_ptr, "s_ptr": dtype_ptr}
        return types, {"stride_we": n_rows * kd, "stride_wn": kd, "stride_se": 0, "stride_sn": 0}
    row = kd // 2 if quant == "int4" else kd
    groups = kd // problem["G"]
    types = {"w_ptr": CODE_PTR[quant], "s_ptr": SCALE_PTR}
    return types, {"stride_we": n_rows * row, "stride_wn": row, "stride_se": n_rows * groups, "stride_sn": groups}
