"""ggml, llama.cpp's tensor library, as a bench provider ("ggml"): the anchor moetune's CPU layer is measured against.

It runs ggml's own MoE FFN graph for one layer, the op sequence of llama.cpp's `build_moe_ffn`
(src/llama-graph.cpp) for a softmax-gated SwiGLU layer with merged gate_up experts, on the CPU backend with
torch.get_num_threads() threads, on the reference layer's weights:
  logits   = mul_mat(router, x)                          [E, T]   router kept F32, as llama.cpp's GGUF converter does
  probs    = soft_max(logits)                            [E, T]
  selected = argsort_top_k(probs, K)                     [K, T]   i32
  weights  = get_rows(probs as [1, E, T], selected)      [1, K, T]
             / clamp(sum_rows(weights), 2^-14, inf)      when norm_topk_prob
             * routed_scaling_factor                     when it is not 1
  gate_up  = mul_mat_id(gate_up_exps, x as [H, 1, T], selected)   [2I, K, T]
  h        = swiglu_split(view gate_up[:I], view gate_up[I:])     [I, K, T]
  experts  = mul_mat_id(down_exps, h, selected) * weights         [H, K, T]
  out      = experts[:, 0] + ... + experts[:, K-1]                [H, T]   (views and adds, as llama.cpp orders them)
The graph is built and allocated once per T (ggml-alloc's gallocr) and reused: each call copies x in (f32),
computes, and copies the output out. Expert weights are in the cell's format (fp32 -> GGML_TYPE_F32, bf16 ->
GGML_TYPE_BF16, fp16 -> GGML_TYPE_F16); activations are f32, as in llama.cpp (ggml converts the activations to the
weights' vec-dot type inside mul_mat). A quantized cell (cfg.quant int8 / int4) gives ggml llama.cpp's formats of
the same bits, Q8_0 / Q4_0 (32 weights per fp16 scale), made by `ggml_quantize_chunk` from the values moetune's
layer computes with (its dequantized codes): ggml's rounding, not moetune's, so the two differ by a quantization
step, and the check against the reference allows that.

Weight buffers, as llama.cpp chooses them (`select_weight_buft`): each expert tensor goes to the first of the CPU
device's extra buffer types ("CPU_REPACK", "AMX", ... from `ggml_backend_dev_get_extra_bufts`) whose
supports_op accepts that tensor in a MUL_MAT_ID, else to the plain CPU buffer. ggml 0.15's CPU_REPACK and AMX
repack only quantized types (Q4_0, Q4_K, Q8_0, IQ4_NL, MXFP4, ...), so for F32/BF16/F16 both decline and the
weights stay in the plain CPU layout, exactly as in llama.cpp; `describe()` names the buffer each weight is in.
A weight in the plain CPU buffer is not copied: ggml reads the reference layer's own storage (a CPU buffer
over the tensor's pointer, as llama.cpp's mmap path reads the model file); a repacked one is copied in.

Only configs this graph computes (ValueError, with the reason, otherwise): softmax router, gated SiLU experts,
no shared expert, no biases, no group-limited routing, router weight on the output (Qwen3-MoE, Mixtral, OLMoE).
Needs the `ggml-python` package (`pip install 'moetune[anchors]'`; it compiles ggml with -march=native); without
it, asking for the provider raises ImportError with a one-line reason, which the bench lists as a skip.
Legend: T tokens, H hidden, I intermediate, E experts, K top-k.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import weakref
from typing import Any

import torch

from moetune.model.config import MoEConfig

WEIGHT_TYPES = {"float32": "GGML_TYPE_F32", "bfloat16": "GGML_TYPE_BF16", "float16": "GGML_TYPE_F16"}
# quantized experts (cfg.quant): llama.cpp's own formats of the same bits, quantized by ggml from our weights' values
# (ggml's CPU dot products of Q8_0 / Q4_0 quantize the activations to Q8_0 whatever moetune's format: w8a8 / w4a8)
QUANT_TYPES = {"int8": "GGML_TYPE_Q8_0", "int4": "GGML_TYPE_Q4_0", "w8a8": "GGML_TYPE_Q8_0", "w4a8": "GGML_TYPE_Q4_0"}
NORM_CLAMP = 6.103515625e-5  # llama.cpp clamps the top-k weight sum to the smallest normal f16 before dividing
PROBE_TOKENS = 512  # the token count of the MUL_MAT_ID llama.cpp asks a buffer type about


def bindings() -> Any:
    """ggml-python's ctypes module (ggml.ggml); ImportError with a one-line reason when it is missing or broken."""
    try:
        return importlib.import_module("ggml.ggml")
    except (ImportError, OSError, RuntimeError) as exc:  # RuntimeError: its library failed to load
        why = " ".join(str(exc).split())[:120]
        raise ImportError(f"ggml provider needs ggml-python: pip install 'moetune[anchors]' ({why})") from None


def unsupported(cfg: MoEConfig) -> str | None:
    """Why ggml's MoE FFN graph here does not compute `cfg`'s layer; None when it does."""
    checks = (
        (cfg.router == "softmax", f"router {cfg.router!r} (only softmax)"),
        (cfg.gated and cfg.activation == "silu", f"experts {'gated' if cfg.gated else 'plain'} {cfg.activation}"),
        (not cfg.num_shared_experts, "a shared expert"),
        (not (cfg.router_bias or cfg.expert_bias or cfg.score_correction_bias), "router or expert biases"),
        (cfg.n_group == 1, "group-limited routing"),
        (not cfg.apply_router_weight_on_input, "router weight on the input"),
        (cfg.dtype in WEIGHT_TYPES, f"dtype {cfg.dtype}"),
    )
    bad = [what for ok, what in checks if not ok]
    return f"the ggml graph covers softmax-routed SiLU-gated experts only, not: {'; '.join(bad)}" if bad else None


class GgmlMoE:
    """One MoE layer as a ggml graph on the CPU backend, on `ref`'s (model.MoE) weights: (T, H) -> (T, H)."""

    def __init__(self, ref: torch.nn.Module, threads: int | None = None):
        cfg: MoEConfig = ref.cfg
        reason = unsupported(cfg)
        if reason:
            raise ValueError(reason)
        if ref.router.weight.device.type != "cpu":
            raise ValueError("the ggml provider runs on ggml's CPU backend only")
        g = self.g = bindings()
        # ggml-python 0.0.45 declares these two with an int result, which cuts their pointers to 32 bits
        self._cpu_buffer_from_ptr = _function(g, "ggml_backend_cpu_buffer_from_ptr", [ctypes.c_void_p, ctypes.c_size_t])
        self._cpu_buffer_type = _function(g, "ggml_backend_cpu_buffer_type", [])
        self.cfg, self.threads = cfg, threads or torch.get_num_threads()
        self._free: list[tuple[Any, Any]] = []  # (free function, handle), freed in reverse order
        self._finalizer = weakref.finalize(self, _free_all, self._free)
        self.backend = g.ggml_backend_cpu_init()
        if not self.backend:
            raise RuntimeError("ggml_backend_cpu_init failed")
        self._free.append((g.ggml_backend_free, self.backend))
        g.ggml_backend_cpu_set_n_threads(self.backend, self.threads)
        self.device = g.ggml_backend_get_device(self.backend)
        self.weight_type = (QUANT_TYPES.get(cfg.quant) or WEIGHT_TYPES[cfg.dtype]).removeprefix("GGML_TYPE_")
        wtype = getattr(g, f"GGML_TYPE_{self.weight_type}")
        h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        # the torch tensors ggml reads (or copies from); held so that borrowed storage outlives the graph
        self._host = {
            "router": ref.router.weight.detach().float().contiguous(),
            "gate_up": self._expert_bytes(ref.experts.gate_up_proj, wtype),
            "down": self._expert_bytes(ref.experts.down_proj, wtype),
        }
        self.weights = {
            "router": self._weight("router", g.GGML_TYPE_F32, (h, e), probe=False),
            "gate_up": self._weight("gate_up", wtype, (h, 2 * i, e)),
            "down": self._weight("down", wtype, (i, h, e)),
        }
        self.buffers: dict[str, str] = {}
        for name, t in self.weights.items():
            buft = g.ggml_backend_buffer_get_type(ctypes.c_void_p(t.contents.buffer))
            self.buffers[name] = g.ggml_backend_buft_name(buft).decode()
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}  # T -> (graph, input, output)

    # -- weights ---------------------------------------------------------------------------------------------------

    def _expert_bytes(self, w: torch.Tensor, gtype: int) -> torch.Tensor:
        """An expert weight (E, N, Kd) as ggml stores it: the tensor itself, or for a quantized cell its values
        quantized by ggml into `gtype` rows of Kd weights (a byte tensor)."""
        if self.cfg.quant == "none":
            return w.detach().contiguous()
        g = self.g
        dense = w.unpack().float().contiguous() if hasattr(w, "unpack") else w.detach().float().contiguous()
        rows, per_row = dense.numel() // dense.shape[-1], dense.shape[-1]
        out = torch.empty(rows * g.ggml_row_size(gtype, per_row), dtype=torch.uint8)
        src = ctypes.cast(dense.data_ptr(), ctypes.POINTER(ctypes.c_float))
        g.ggml_quantize_chunk(gtype, src, out.data_ptr(), 0, rows, per_row, None)
        return out

    def _context(self, tensors: int, graph: bool = False) -> Any:
        g = self.g
        size = g.ggml_tensor_overhead() * tensors + (g.ggml_graph_overhead() if graph else 0)
        ctx = g.ggml_init(g.ggml_init_params(mem_size=size, mem_buffer=None, no_alloc=True))
        if not ctx:
            raise RuntimeError("ggml_init failed")
        self._free.append((g.ggml_free, ctx))
        return ctx

    def _weight(self, name: str, gtype: int, ne: tuple[int, ...], probe: bool = True) -> Any:
        """A ggml weight tensor holding self._host[name], in the buffer type llama.cpp would pick for it."""
        g, src = self.g, self._host[name]
        ctx = self._context(1)
        t = g.ggml_new_tensor(ctx, gtype, len(ne), (ctypes.c_int64 * len(ne))(*ne))
        g.ggml_set_name(t, name.encode())
        buft = self._weight_buft(gtype, ne) if probe else None
        if buft is None and src.data_ptr() % 64 == 0:  # plain CPU layout: read torch's storage in place
            buf = self._cpu_buffer_from_ptr(src.data_ptr(), src.nbytes)
            self._free.append((g.ggml_backend_buffer_free, buf))
            if g.ggml_backend_tensor_alloc(buf, t, src.data_ptr()) != g.GGML_STATUS_SUCCESS:
                raise RuntimeError(f"ggml could not place {name} on its storage")
        else:
            buf = g.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft or self._cpu_buffer_type())
            if not buf:
                raise RuntimeError(f"ggml could not allocate {src.nbytes / 2**30:.2f} GiB for {name}")
            self._free.append((g.ggml_backend_buffer_free, buf))
            g.ggml_backend_tensor_set(t, src.data_ptr(), 0, src.nbytes)  # a repacking buffer repacks here
            if buft is not None:
                del self._host[name]  # the repacked copy replaces it
        g.ggml_backend_buffer_set_usage(ctypes.c_void_p(t.contents.buffer), g.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
        return t

    def _extra_bufts(self) -> list[Any]:
        """The CPU device's extra buffer types (repacking ones), as llama.cpp reads them."""
        g = self.g
        reg = g.ggml_backend_dev_backend_reg(self.device)
        addr = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not addr:
            return []
        get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
        found, arr = [], get(self.device)
        while arr and arr[len(found)]:
            found.append(arr[len(found)])
        return found

    def _weight_buft(self, gtype: int, ne: tuple[int, ...]) -> Any:
        """The first extra buffer type that takes this weight in a MUL_MAT_ID (llama.cpp's weight_buft_supported)."""
        g, k = self.g, self.cfg.top_k
        for buft in self._extra_bufts():
            if not g.ggml_backend_dev_supports_buft(self.device, buft):
                continue
            ctx = g.ggml_init(g.ggml_init_params(mem_size=8 * g.ggml_tensor_overhead(), mem_buffer=None, no_alloc=True))
            try:
                w = g.ggml_new_tensor(ctx, gtype, 3, (ctypes.c_int64 * 3)(*ne))
                b = g.ggml_new_tensor_3d(ctx, g.GGML_TYPE_F32, ne[0], k, PROBE_TOKENS)
                ids = g.ggml_new_tensor_2d(ctx, g.GGML_TYPE_I32, k, PROBE_TOKENS)
                op = g.ggml_mul_mat_id(ctx, w, b, ids)
                buf = g.ggml_backend_buft_alloc_buffer(buft, 0)
                w.contents.buffer = buf
                ok = g.ggml_backend_dev_supports_op(self.device, op)
                g.ggml_backend_buffer_free(buf)
            finally:
                g.ggml_free(ctx)
            if ok:
                return buft
        return None

    # -- graph -----------------------------------------------------------------------------------------------------

    def _graph(self, t: int) -> tuple[Any, Any, Any]:
        if t in self._graphs:
            return self._graphs[t]
        g, cfg, w = self.g, self.cfg, self.weights
        h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k
        ctx = self._context(64 + 2 * k, graph=True)
        gf = g.ggml_new_graph(ctx)
        x = g.ggml_new_tensor_2d(ctx, g.GGML_TYPE_F32, h, t)
        g.ggml_set_input(x)
        probs = g.ggml_soft_max(ctx, g.ggml_mul_mat(ctx, w["router"], x))  # [E, T]
        selected = g.ggml_argsort_top_k(ctx, probs, k)  # [K, T]
        weights = g.ggml_get_rows(ctx, g.ggml_reshape_3d(ctx, probs, 1, e, t), selected)  # [1, K, T]
        if cfg.norm_topk_prob:
            flat = g.ggml_reshape_2d(ctx, weights, k, t)
            total = g.ggml_clamp(ctx, g.ggml_sum_rows(ctx, flat), NORM_CLAMP, math.inf)  # [1, T]
            weights = g.ggml_reshape_3d(ctx, g.ggml_div(ctx, flat, total), 1, k, t)
        if cfg.routed_scaling_factor != 1.0:
            weights = g.ggml_scale(ctx, weights, cfg.routed_scaling_factor)
        g.ggml_build_forward_expand(gf, weights)
        gate_up = g.ggml_mul_mat_id(ctx, w["gate_up"], g.ggml_reshape_3d(ctx, x, h, 1, t), selected)  # [2I, K, T]
        nb1, nb2, nb0 = gate_up.contents.nb[1], gate_up.contents.nb[2], gate_up.contents.nb[0]
        gate = g.ggml_view_3d(ctx, gate_up, i, k, t, nb1, nb2, 0)
        up = g.ggml_view_3d(ctx, gate_up, i, k, t, nb1, nb2, i * nb0)
        experts = g.ggml_mul_mat_id(ctx, w["down"], g.ggml_swiglu_split(ctx, gate, up), selected)  # [H, K, T]
        experts = g.ggml_mul(ctx, experts, weights)
        g.ggml_build_forward_expand(gf, experts)
        views = [
            g.ggml_view_2d(ctx, experts, h, t, experts.contents.nb[2], j * experts.contents.nb[1]) for j in range(k)
        ]
        for v in views:
            g.ggml_build_forward_expand(gf, v)
        out = views[0]
        for v in views[1:]:
            out = g.ggml_add(ctx, out, v)
            g.ggml_build_forward_expand(gf, out)
        if k == 1:
            out = g.ggml_cont(ctx, out)
        g.ggml_set_output(out)
        g.ggml_build_forward_expand(gf, out)
        alloc = g.ggml_gallocr_new(g.ggml_backend_get_default_buffer_type(self.backend))
        self._free.append((g.ggml_gallocr_free, alloc))
        if not g.ggml_gallocr_alloc_graph(alloc, gf):
            raise RuntimeError(f"ggml could not allocate the graph at T={t}")
        self._graphs[t] = (gf, x, out)
        return self._graphs[t]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        gf, xt, out = self._graph(t)
        xf = x.detach().to(torch.float32).contiguous()
        self.g.ggml_backend_tensor_set(xt, xf.data_ptr(), 0, xf.nbytes)
        status = self.g.ggml_backend_graph_compute(self.backend, gf)
        if status != self.g.GGML_STATUS_SUCCESS:
            raise RuntimeError(f"ggml graph compute failed (status {status})")
        y = torch.empty(t, self.cfg.hidden_size, dtype=torch.float32)
        self.g.ggml_backend_tensor_get(out, y.data_ptr(), 0, y.nbytes)
        return y.to(x.dtype)

    def describe(self, t: int | None = None) -> dict[str, Any]:
        g = self.g
        return {
            "library": "ggml",
            "version": _version(),
            "threads": self.threads,
            "weight_type": self.weight_type,
            "buffers": self.buffers,
            "cpu": {f: bool(getattr(g, f"ggml_cpu_has_{f}")()) for f in ("avx2", "avx512", "avx512_bf16", "amx_int8")},
        }


def _function(g: Any, name: str, argtypes: list[Any]) -> Any:
    """A fresh ctypes handle on a ggml function returning a pointer (ggml-python's own handle is left alone)."""
    address = ctypes.cast(getattr(g, name), ctypes.c_void_p).value
    return ctypes.CFUNCTYPE(ctypes.c_void_p, *argtypes)(address)


def _free_all(handles: list[tuple[Any, Any]]) -> None:
    while handles:
        free, handle = handles.pop()
        free(handle)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ggml-python")
    except PackageNotFoundError:
        return "unknown"
