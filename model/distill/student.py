"""The distilled student: a BERT-style encoder whose FFNs are moetune MoE layers, and its sentence embedding.

Data flow: tokenizer -> BertModel (embeddings, attention as the teacher's) where each chosen layer's FFN
(intermediate.dense -> act -> output.dense -> dropout -> LayerNorm(. + residual)) is replaced by MoEFFN:
LayerNorm(MoE(x) [+ SharedFFN(x)] + x), MoE a `moetune.model.moe.MoE` (non-gated experts, `topk_hard` router),
SharedFFN an optional always-on dense FFN (the teacher's most important neurons, biases included) -> mean pooling
over the attention mask -> L2 normalisation (what sentence-transformers does for all-MiniLM-L6-v2).

Legend: B batch, L sequence length, T = B*L tokens, H hidden, I per-expert intermediate, E experts, K top-k.

Packaging protocol (the generic package()/load() live elsewhere): `package_kind`, `package_config()` (JSON-able),
`from_package_config(cfg, tokenizer)` (the architecture with placeholder weights; the loader then calls
`load_state_dict`). The MoE layers sit at `bert.encoder.layer.<n>.output.moe`, so TunedMoE.from_module can swap
them in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moetune.kernels.reference import plain_act
from moetune.model.config import MoEConfig
from moetune.model.moe import MoE

PACKAGE_KIND = "moetune-encoder"
DEFAULT_MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden (B, L, H), mask (B, L) -> L2-normalised mean of the unmasked tokens (B, H) fp32."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(dim=1)
    pooled = summed / m.sum(dim=1).clamp_min(1e-9)
    return F.normalize(pooled.float(), p=2, dim=-1)


def teacher_max_length(model: nn.Module, tokenizer) -> int:
    """The sequence length the teacher embeds with: sentence-transformers' max_seq_length when its model dir
    says so (256 for all-MiniLM-L6-v2), else what both the tokenizer and the position embeddings allow."""
    import json
    from pathlib import Path

    st_cfg = Path(str(getattr(model.config, "name_or_path", "") or "")) / "sentence_bert_config.json"
    if st_cfg.is_file():
        return int(json.loads(st_cfg.read_text())["max_seq_length"])
    limits = [getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH), DEFAULT_MAX_LENGTH]
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1e6:
        limits.append(int(tokenizer.model_max_length))
    return int(min(limits))


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def encode_with(model: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 64):
    """Sentence embeddings (N, H) of any BertModel-like module: mean pooling + L2 normalisation.

    Texts run in batches of similar length (longest first, as sentence-transformers does), so little of the
    work is padding; the rows come back in the input order.
    """
    if not texts:
        return torch.empty(0, model.config.hidden_size)
    order = sorted(range(len(texts)), key=lambda j: -len(texts[j]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenize(tokenizer, [texts[j] for j in rows], max_length)
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        out[rows] = mean_pool(hidden, batch["attention_mask"])
    return out


class SharedFFN(nn.Module):
    """The always-on shared expert of a distilled FFN: down(act(up(x))), both with biases (a BERT FFN's b1, b2).

    Not MoEConfig's shared expert: that one has no biases, and a dense FFN's neurons need their b1 to be copied
    exactly. It runs as two torch Linear GEMMs (dense, every token), beside the routed MoE.
    """

    def __init__(self, hidden: int, width: int, activation: str):
        super().__init__()
        self.up = nn.Linear(hidden, width)
        self.down = nn.Linear(width, hidden)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(plain_act(self.up(x), self.activation))


class MoEFFN(nn.Module):
    """BertOutput with an MoE in place of intermediate+output dense: LayerNorm(MoE(x) [+ shared(x)] + x).

    Installed as `layer.output` with `layer.intermediate` an identity, so BertLayer's feed_forward_chunk
    calls forward(x, x). `train_forward`, when set (by distillation only; never packaged), replaces the MoE
    call by a differentiable equivalent with the same forward value. `shared` > 0 adds a SharedFFN that wide.
    """

    def __init__(self, cfg: MoEConfig, eps: float, shared: int = 0):
        super().__init__()
        self.moe = MoE(cfg)
        self.shared = SharedFFN(cfg.hidden_size, shared, cfg.activation) if shared else None
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.train_forward: Callable[[MoE, torch.Tensor], torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        moe_out = self.moe(hidden_states) if self.train_forward is None else self.train_forward(self.moe, hidden_states)
        if self.shared is not None:
            moe_out = moe_out + self.shared(hidden_states)
        return self.LayerNorm(moe_out + input_tensor)


class MoEStudent(nn.Module):
    """A BERT encoder with MoE FFNs; encode(texts) -> normalised sentence embeddings (N, H)."""

    package_kind = PACKAGE_KIND

    def __init__(self, bert: nn.Module, tokenizer, moe_cfgs: dict[int, MoEConfig], max_length: int, shared: int = 0):
        """bert: a BertModel whose FFNs get replaced here (their weights are dropped, MoE weights left random);
        shared: the width of every MoE layer's SharedFFN (0: none)."""
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer  # not a module: stays out of the state_dict
        self.max_length = int(max_length)
        self.moe_cfgs = dict(sorted(moe_cfgs.items()))
        self.shared = int(shared)
        eps = bert.config.layer_norm_eps
        for n, cfg in self.moe_cfgs.items():
            layer = bert.encoder.layer[n]
            layer.intermediate = nn.Identity()
            layer.output = MoEFFN(cfg, eps, self.shared)

    def moe_ffn(self, n: int) -> MoEFFN:
        return self.bert.encoder.layer[n].output

    def moe_layers(self) -> list[MoE]:
        return [self.moe_ffn(n).moe for n in self.moe_cfgs]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return encode_with(self.bert, self.tokenizer, list(texts), self.max_length, batch_size)

    def quantize_(self, quant: str, group: int | None = None, target_kind: str = "cpu") -> MoEStudent:
        """Every MoE layer's routed experts quantized in place (MoE.quantize_); every layer's format is checked
        before the first one changes. The package then stores codes and scales. Returns self."""
        cfgs = {n: cfg.quantized(quant, group, target_kind) for n, cfg in self.moe_cfgs.items()}
        for n, cfg in cfgs.items():
            self.moe_ffn(n).moe.quantize_(cfg.quant, cfg.quant_group)
        self.moe_cfgs = cfgs
        return self

    def ffn_flops_per_token(self) -> int:
        """FFN FLOPs (2 x multiply-adds) of one token through every layer: MoE layers + any dense ones left."""
        c = self.bert.config
        dense = 4 * c.hidden_size * c.intermediate_size
        moe = sum(cfg.flops_per_token() + 4 * c.hidden_size * self.shared for cfg in self.moe_cfgs.values())
        return moe + dense * (c.num_hidden_layers - len(self.moe_cfgs))

    # ---- packaging protocol ------------------------------------------------------------------------
    def package_config(self) -> dict[str, Any]:
        return {
            "kind": PACKAGE_KIND,
            "hf_config": self.bert.config.to_dict(),
            "moe_layers": list(self.moe_cfgs),
            "moe": [cfg.to_dict() for cfg in self.moe_cfgs.values()],
            "max_length": self.max_length,
            "shared": self.shared,
            "pooling": "mean",
            "normalize": True,
        }

    @classmethod
    def from_package_config(cls, cfg: dict[str, Any], tokenizer) -> MoEStudent:
        from transformers import BertConfig, BertModel

        hf_cfg = BertConfig.from_dict(cfg["hf_config"])
        bert = BertModel(hf_cfg, add_pooling_layer=False)
        moe_cfgs = {int(n): MoEConfig.from_dict(d) for n, d in zip(cfg["moe_layers"], cfg["moe"], strict=True)}
        max_length = cfg.get("max_length", DEFAULT_MAX_LENGTH)
        return cls(bert.eval(), tokenizer, moe_cfgs, max_length, cfg.get("shared", 0))
