"""Quantized expert weights: moetune's own int8 / int4 format, quantization, and QuantizedWeight.

Format (weight-only, symmetric, per group). A (G, N, Kd) weight (N output columns over a reduction of Kd) is cut
into groups of `group` consecutive weights along Kd; each group keeps one scale s = max|w| / qmax (qmax 127 for
int8, 7 for int4) stored as float16 (as llama.cpp's Q8_0 / Q4_0 store theirs), and each weight the code
c = clamp(round(w / s), -qmax - 1, qmax). The weight's value is c * s. Round-to-nearest, deterministic, no
calibration data; `quantization_error` reports what it costs per tensor.
  codes   int8: (G, N, Kd) int8.  int4: (G, N, Kd/2) uint8, two codes per byte along Kd in offset binary:
          byte = (c[2j] + 8) | (c[2j+1] + 8) << 4, so a code is (byte & 15) - 8 or (byte >> 4) - 8.
  scales  (G, N, Kd/group) float16.
Quantizing the dequantized values gives the same codes back (the extreme of each group is exactly +-qmax * s).

Layout. Like PackedWeight (kernels/packed.py), a QuantizedWeight keeps its codes and scales in the CPU kernels'
panel layout (both packed along N with the same `pack`, gate|up interleaved for a gated gemm1): int8 codes as
(G, ceil(N/P), Kd, W), the scales as (G, ceil(N/P), Kd/group, W). int4 codes pair their nibbles across the
panel instead of along Kd, (G, ceil(N/P), Kd, W/2) bytes: byte c of a row holds column c (low nibble) and
column c + W/2 (high nibble; for a gated panel, gate column c and its up column). One load of W/2 bytes then
gives two vectors of codes with an AND and a shift, where pairs along Kd needed a load, a shift and an AND per
vector (measured: see results/<machine>/quant.md). Panel None keeps the natural layout above (what the GPU
kernels and the torch backend read, and what a package stores).
VNNI layout (kpack 4, the CPU's integer dot-product kernels of w8a8 / w4a8, ir/tvm_vnni.py): the codes of 4
consecutive k of one column sit in one 32-bit word, as unsigned offset binary (code + 128, code + 8), because
`vpdpbusd` multiplies unsigned bytes by signed ones (the activations): int8 (G, ceil(N/P), Kd/4, W, 4) bytes;
int4 (G, ceil(N/P), Kd/8, W, 4) bytes whose low nibbles are k 0..3 of the 8 and high nibbles k 4..7, so one
64-byte load gives two words' worth of unsigned codes with an AND and a shift. The scales as in the panels.

Activations (w8a8 / w4a8). `quantize_rows` quantizes a GEMM's input per row and group of G along the reduction,
symmetric, fp32 scale s = max|x| / 127, codes round(x / s) in [-127, 127] (llama.cpp's Q8_0, with an fp32
scale); the reference computes on `fake_quant_rows` (codes * s in fp32) and the integer kernels on the codes,
so both see the same inputs. With bf16 activations the layer reference and the fallbacks (torch, Triton, the
weight-only TVM kernels) round those values to bf16 and a routing weight on the input (w_in) is applied before
quantizing rather than after: a few codes flip, ~1e-2 norm-wise against the reference layer (measured), inside
the bf16 tolerance of the bench.

QuantizedWeight is a tensor of the original shape and activation dtype whose only storage is the codes and
scales: torch ops see the dequantized values (kernels/packed.py's StoredWeight), an in-place write
(`load_state_dict` of dense values) re-quantizes into the same buffers. A move that keeps the dtype
(`.to(device)`, `.cuda()`, `.cpu()`, `nn.Module.to(device)`) moves the codes and scales and stays quantized; a
dtype change (`.to(torch.bfloat16)`, `.half()`) gives the dense values in that dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from moetune.kernels.packed import StoredWeight, layout_of, pack, unpack

aten = torch.ops.aten

QMAX = {"int8": 127, "int4": 7}
OFFSET = {"int8": 128, "int4": 8}  # the VNNI layout's unsigned codes are code + OFFSET
SCALE_DTYPE = torch.float16
CODE_KPACKS = (1, 4)  # codes of consecutive k per column stored together: 1 (the panels), 4 (VNNI)


def quantize_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (codes (..., K) int8 in [-127, 127], scales (..., K/group) fp32), per row and group."""
    blocks = x.detach().float().unflatten(-1, (x.shape[-1] // group, group))
    scales = blocks.abs().amax(dim=-1) / 127.0
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    codes = (blocks * inv.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8).flatten(-2)
    return codes, scales


def fake_quant_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """The values quantize_rows' codes stand for, in fp32: what a w8a8 / w4a8 GEMM multiplies."""
    codes, scales = quantize_rows(x, group)
    return (codes.float().unflatten(-1, (scales.shape[-1], group)) * scales.unsqueeze(-1)).flatten(-2)


def _to_vnni(values: torch.Tensor, fmt: str) -> torch.Tensor:
    """Panel-layout code values (G, NP, Kd, W) int8 -> the VNNI layout's bytes (module doc)."""
    g, npanel, kd, w = values.shape
    u = (values.to(torch.int16) + OFFSET[fmt]).to(torch.uint8)
    if fmt == "int8":
        return u.reshape(g, npanel, kd // 4, 4, w).transpose(-1, -2).contiguous()
    u = u.reshape(g, npanel, kd // 8, 2, 4, w).permute(0, 1, 2, 5, 3, 4)  # (.., Kd/8, W, half, 4)
    return (u[..., 0, :] | (u[..., 1, :] << 4)).contiguous()


def _from_vnni(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """The inverse of _to_vnni: (G, NP, Kd, W) int8 code values."""
    if fmt == "int8":
        u = codes.transpose(-1, -2).flatten(2, 3)
    else:
        u = torch.stack((codes & 15, codes >> 4), dim=-2).permute(0, 1, 2, 4, 5, 3).flatten(2, 4)
    return (u.to(torch.int16) - OFFSET[fmt]).to(torch.int8)


def _check(w: torch.Tensor, fmt: str, group: int) -> None:
    if fmt not in QMAX:
        raise ValueError(f"quantized weight format must be one of {', '.join(QMAX)}; got {fmt!r}")
    if w.dim() != 3:
        raise ValueError(f"quantize takes (G, N, Kd) weights, got shape {tuple(w.shape)}")
    if group < 1 or w.shape[2] % group or (fmt == "int4" and group % 2):
        raise ValueError(f"quant group {group} must divide the reduction length {w.shape[2]} (and be even for int4)")


def quantize(w: torch.Tensor, fmt: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, N, Kd) float weight -> (codes, scales) in the natural layout (module doc). Round to nearest."""
    _check(w, fmt, group)
    g, n, kd = w.shape
    qmax = QMAX[fmt]
    blocks = w.detach().float().reshape(g, n, kd // group, group)
    scales = (blocks.abs().amax(dim=-1) / qmax).to(SCALE_DTYPE)
    inv = 1.0 / scales.float().clamp_min(torch.finfo(torch.float32).tiny)
    codes = (blocks * inv.unsqueeze(-1)).round_().clamp_(-qmax - 1, qmax).reshape(g, n, kd).to(torch.int8)
    return (_nibbles(codes[..., 0::2], codes[..., 1::2]) if fmt == "int4" else codes), scales


def _nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Two int8 code tensors in [-8, 7] -> one uint8 tensor, offset binary: (low + 8) | (high + 8) << 4."""
    return (low + 8).to(torch.uint8) | ((high + 8).to(torch.uint8) << 4)


def _halves(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of _nibbles: (low, high) int8 codes."""
    return (codes & 15).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8


def decode(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Natural-layout codes -> (G, N, Kd) int8 code values."""
    if fmt == "int8":
        return codes
    return torch.stack(_halves(codes), dim=-1).reshape(*codes.shape[:-1], 2 * codes.shape[-1])


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """Natural-layout (codes, scales) -> the (G, N, Kd) fp32 weight they stand for."""
    values = decode(codes, fmt).float()
    group = values.shape[-1] // scales.shape[-1]
    return (values.reshape(*scales.shape, group) * scales.float().unsqueeze(-1)).reshape(values.shape)


def quantization_error(w: torch.Tensor, fmt: str, group: int) -> float:
    """Norm-wise relative error of `w` quantized and dequantized (reported per tensor, never asserted)."""
    deq = dequantize(*quantize(w, fmt, group), fmt)
    ref = w.detach().double()
    return ((deq.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class QuantizedWeight(StoredWeight):
    """A (G, N, Kd) weight stored as codes + group scales (module doc), in panels of `panel` or natural (None)."""

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: str
    group: int
    panel: int | None
    interleave: int | None
    kpack: int

    @staticmethod
    def __new__(cls, codes, scales, shape, dtype, fmt: str, group: int, panel=None, interleave=None, kpack=1):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=codes.device)
        t.codes, t.scales, t.fmt, t.group, t.panel, t.interleave = codes, scales, fmt, group, panel, interleave
        t.kpack = kpack
        return t

    @classmethod
    def of(
        cls,
        w: torch.Tensor,
        fmt: str,
        group: int,
        panel: int | None = None,
        interleave: int | None = None,
        kpack: int = 1,
    ) -> QuantizedWeight:
        """Quantize `w` (G, N, Kd) and store it in panels of `panel` columns (None: natural layout)."""
        codes, scales = quantize(w, fmt, group)
        return cls.from_parts(codes, scales, w.shape, w.dtype, fmt, group, panel, interleave, kpack)

    @classmethod
    def from_parts(
        cls, codes, scales, shape, dtype, fmt, group, panel=None, interleave=None, kpack=1
    ) -> QuantizedWeight:
        """From natural-layout codes and scales (a package's), laid out in `panel` (no re-quantization); kpack 4:
        the VNNI layout (module doc; panels only)."""
        g, n, kd = shape
        want = ((g, n, kd if fmt == "int8" else kd // 2), (g, n, kd // group))
        if (tuple(codes.shape), tuple(scales.shape)) != want:
            got = (tuple(codes.shape), tuple(scales.shape))
            raise ValueError(f"{fmt} codes/scales of a {tuple(shape)} weight must be {want}, got {got}")
        if kpack not in CODE_KPACKS or (kpack != 1 and (panel is None or kd % (4 if fmt == "int8" else 8))):
            step = 4 if fmt == "int8" else 8
            raise ValueError(f"kpack {kpack} needs panels and a reduction of a multiple of {step}; got {shape}")
        if panel is not None and kpack == 4:
            codes, scales = _to_vnni(pack(decode(codes, fmt), panel, interleave), fmt), pack(scales, panel, interleave)
        elif panel is not None and fmt == "int4":  # nibbles paired across the panel (module doc)
            values = pack(decode(codes, fmt), panel, interleave)
            half = values.shape[-1] // 2
            codes, scales = _nibbles(values[..., :half], values[..., half:]), pack(scales, panel, interleave)
        elif panel is not None:
            codes, scales = pack(codes, panel, interleave), pack(scales, panel, interleave)
        return cls(codes, scales, torch.Size(shape), dtype, fmt, group, panel, interleave, kpack)

    def natural(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, scales) in the natural layout (views when already natural)."""
        if self.panel is None:
            return self.codes, self.scales
        n = self.shape[1]
        scales = unpack(self.scales, n, self.panel, self.interleave)
        if self.kpack != 1:
            values = unpack(_from_vnni(self.codes, self.fmt), n, self.panel, self.interleave)
            return (values if self.fmt == "int8" else _nibbles(values[..., 0::2], values[..., 1::2])), scales
        if self.fmt == "int4":
            values = unpack(torch.cat(_halves(self.codes), dim=-1), n, self.panel, self.interleave)
            return _nibbles(values[..., 0::2], values[..., 1::2]), scales
        return unpack(self.codes, n, self.panel, self.interleave), scales

    def in_layout(self, panel: int | None, interleave: int | None = None, kpack: int = 1) -> QuantizedWeight:
        """The same codes in another layout (itself when it is that layout already)."""
        if (panel, interleave, kpack) == (self.panel, self.interleave, self.kpack):
            return self
        return QuantizedWeight.from_parts(
            *self.natural(), self.shape, self.dtype, self.fmt, self.group, panel, interleave, kpack
        )

    def dequantized(self) -> torch.Tensor:
        """The values c * s in fp32 (what the kernels compute with): a new dense tensor."""
        return dequantize(*self.natural(), self.fmt)

    def unpack(self) -> torch.Tensor:
        """The dequantized weight in this weight's dtype: a new dense tensor."""
        return self.dequantized().to(self.dtype)

    def _store(self, dense: torch.Tensor) -> None:
        fresh = QuantizedWeight.of(dense, self.fmt, self.group, self.panel, self.interleave, self.kpack)
        self.codes.copy_(fresh.codes)
        self.scales.copy_(fresh.scales)

    def _alias(self) -> QuantizedWeight:
        return self._with(self.codes, self.scales)

    def _with(self, codes: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
        return QuantizedWeight(
            codes, scales, self.shape, self.dtype, self.fmt, self.group, self.panel, self.interleave, self.kpack
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._to_copy.default and isinstance(args[0], QuantizedWeight) and _moves_only(args[0], kwargs):
            # a device move (.to(device), .cuda(), Module.to / _apply): move the codes and scales, stay quantized
            where = {k: kwargs[k] for k in ("device", "non_blocking", "pin_memory") if k in kwargs}
            q = args[0]
            return q._with(aten._to_copy.default(q.codes, **where), aten._to_copy.default(q.scales, **where))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "data" and isinstance(value, QuantizedWeight):
            # nn.Module._apply moves a parameter with `param.data = moved` when the two tensor types are
            # compatible: the moved codes and scales must come along (the C setter only swaps the tensor metadata)
            if (value.fmt, value.group, value.layout()) != (self.fmt, self.group, self.layout()):
                raise ValueError(f"cannot set the data of {self!r} to {value!r}")
            super().__setattr__(name, value)
            self.codes, self.scales = value.codes, value.scales
            return
        super().__setattr__(name, value)

    def layout(self) -> tuple[int | None, ...]:
        return layout_of(self.panel, self.interleave, self.kpack)

    def nbytes_stored(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        where = "natural" if self.panel is None else f"panel={self.panel}" + (f" kpack={self.kpack}" * (self.kpack > 1))
        return f"QuantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, {self.fmt} group={self.group}, {where})"


def _moves_only(q: QuantizedWeight, kwargs: dict[str, Any]) -> bool:
    """Whether an aten._to_copy of `q` changes at most its device (and pinning): its values stay the codes'."""
    dtype, layout = kwargs.get("dtype"), kwargs.get("layout")
    fmt = kwargs.get("memory_format")
    return (
        dtype in (None, q.dtype)
        and layout in (None, torch.strided)
        and fmt in (None, torch.preserve_format, torch.contiguous_format)
    )


def as_quantized(w: torch.Tensor, fmt: str, group: int) -> QuantizedWeight:
    """`w` as a QuantizedWeight of `fmt` / `group`: itself when it is one (of that format, else ValueError), else
    quantized now (natural layout): what a quantized GEMM's launcher does with a dense weight it is handed."""
    if isinstance(w, QuantizedWeight):
        if (w.fmt, w.group) != (fmt, group):
            raise ValueError(f"expected {fmt} weights of group {group}, got {w!r}")
        return w
    return QuantizedWeight.of(w.detach(), fmt, group)
