"""`moetune bench --e2e`: a whole Hugging Face causal LM on transformers' experts implementations vs the same model
patched onto moetune's kernels, in one process, interleaved.

The model: the preset's HF family (Qwen3-MoE for qwen3-30b-a3b) with the preset's MoE dimensions, `layers`
decoder layers, a vocabulary of 8192 and attention heads of 128 (64 where H does not divide), random weights from
a fixed seed (nothing downloaded). One model in memory: each round runs every provider in turn on it:
  hf-<impl>   transformers' experts implementation <impl> (config._experts_implementation: eager, grouped_mm)
  tuned       the model after `patch(model, db=...)`: every MoE block a TunedMoE on the kernel DB's winners,
              the routed experts packed in place (model/runtime/inplace.py); afterwards the blocks are put back
              and the experts unpacked, so the next round's HF providers run on the dense weights again.
  tuned-int8  the same with the routed experts quantized (patch(model, quant=...)): its round quantizes the
  tuned-int4  dense weights, runs, and puts the dense parameters back (they stay in memory meanwhile, so its RSS
              counts both).
Per provider: greedy decode from an 8-token prompt (KV cache; tokens/s = 1 / p50 of the per-token step time),
prefill of `prefill` tokens without a cache (tokens/s = prefill / p50 over the rounds), the greedy tokens (all
providers must produce the same ones), and the process's resident memory after its round. Quality of a quantized
provider: `agree`, the fraction of the prefill's positions whose next-token argmax equals the first provider's
(teacher-forced, so one flipped token does not flip the rest), and whether its greedy tokens are the same.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moetune.model.config import MoEConfig
from moetune.model.runtime.inplace import unpack_in_place

E2E_VOCAB = 8192
PROMPT = 8
HF_IMPLEMENTATIONS = ("eager", "grouped_mm")


@dataclass
class E2EResult:
    provider: str
    decode_step_ms: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    argmax: list[int] = field(default_factory=list)  # the prefill's next-token argmax per position
    rss_gb: float = 0.0

    def summary(self, prefill: int) -> dict[str, Any]:
        step, pre = statistics.median(self.decode_step_ms), statistics.median(self.prefill_ms)
        return {
            "provider": self.provider,
            "decode_tok_s": 1e3 / step,
            "decode_step_ms_p50": step,
            "prefill_tok_s": prefill * 1e3 / pre,
            "prefill_ms_p50": pre,
            "rounds": len(self.prefill_ms),
            "rss_gb": self.rss_gb,
        }


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def causal_lm(cfg: MoEConfig, layers: int, seed: int = 0) -> nn.Module:
    """The HF causal LM of `cfg`'s family with its MoE dimensions and `layers` layers, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetune.autotune.bench.hf import family, hf_config

    fam = family(cfg)
    block = hf_config(cfg, "grouped_mm").to_dict()
    head_dim = 128 if cfg.hidden_size % 128 == 0 else 64
    heads = max(1, cfg.hidden_size // head_dim)
    keep = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts")
    keep += ("num_experts_per_tok", "norm_topk_prob", "n_routed_experts", "routed_scaling_factor")
    kw = {k: v for k, v in block.items() if k in keep}
    kw.update(num_hidden_layers=layers, vocab_size=E2E_VOCAB, num_attention_heads=heads, head_dim=head_dim)
    kw.update(num_key_value_heads=max(1, heads // 8), max_position_embeddings=4096, tie_word_embeddings=False)
    if "moe_intermediate_size" in kw:
        kw["intermediate_size"] = kw["moe_intermediate_size"]
        kw["mlp_only_layers"], kw["decoder_sparse_step"] = [], 1
    config = AutoConfig.for_model(fam, **kw)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.dtype))
    return model.eval().requires_grad_(False)


def _greedy(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[float]]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
    out = model(prompt, past_key_values=cache, use_cache=True)  # `cache=` from transformers 5.2x only
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens, times = [int(nxt)], []
    for _ in range(steps - 1):
        start = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append((time.perf_counter() - start) * 1e3)
        tokens.append(int(nxt))
    return tokens, times


def _unpatch(model: nn.Module, blocks: dict[str, nn.Module]) -> None:
    """Put the HF blocks back and the packed experts back into dense parameters (the round after is HF's)."""
    for name, block in blocks.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, block)
    unpack_in_place(model)


def _restore(model: nn.Module, saved: dict[str, nn.Parameter]) -> None:
    """Put back the parameters a quantized round replaced (the dense originals, kept in `saved`)."""
    for name, p in saved.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if module._parameters.get(attr) is not p:
            module._parameters[attr] = p


def run_e2e(
    model: nn.Module,
    providers: tuple[str, ...],
    db: Any,
    rounds: int = 3,
    decode_steps: int = 16,
    prefill: int = 256,
    on_step: Any = lambda text: None,
) -> dict[str, E2EResult]:
    """Every provider once per round, in order, on the same model and inputs (see the module doc)."""
    from moetune.model import patch
    from moetune.model.hf.blocks import SUPPORTED_BLOCKS

    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=gen)
    long = torch.randint(0, vocab, (1, prefill), generator=gen)
    blocks = {n: m for n, m in model.named_modules() if n and type(m).__name__ in SUPPORTED_BLOCKS}
    results = {p: E2EResult(p) for p in providers}
    with torch.no_grad():
        for r in range(rounds):
            for provider in providers:
                on_step(f"round {r + 1}/{rounds}: {provider}")
                saved = dict(model.named_parameters()) if provider.startswith("tuned-") else {}
                if provider.startswith("tuned"):
                    patch(model, db=db, quant=provider.partition("-")[2] or None)
                else:
                    model.config._experts_implementation = provider.removeprefix("hf-")
                try:
                    model(long)  # warm-up at both shapes: kernels built or loaded, plans made
                    _greedy(model, prompt, 2)
                    start = time.perf_counter()
                    logits = model(long).logits
                    results[provider].prefill_ms.append((time.perf_counter() - start) * 1e3)
                    results[provider].argmax = logits[0].argmax(-1).tolist()
                    tokens, steps = _greedy(model, prompt, decode_steps)
                    results[provider].decode_step_ms += steps
                    results[provider].tokens = tokens
                    results[provider].rss_gb = max(results[provider].rss_gb, rss_bytes() / 1e9)
                finally:
                    if provider.startswith("tuned"):
                        _unpatch(model, blocks)
                        _restore(model, saved)
    return results
