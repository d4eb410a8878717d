"""`moetune package` and `moetune run`: ship a model with its tuned kernels, then run it from the package."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from moetune.autotune.cli.common import (
    JsonFlag,
    QuantGroupOpt,
    QuantOpt,
    console,
    err_console,
    fail,
    parse_ints,
    print_json,
)

TargetOpt = Annotated[
    list[str] | None,
    typer.Option("--target", "-t", help="Target whose tuned kernels to include (repeatable); default: cpu (the host)."),
]


def _load_source(source: Path) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a moetune package or a local Hugging Face model directory."""
    from moetune.model.packaging import is_package, load, load_tokenizer

    if is_package(source):
        return load(source), load_tokenizer(source)
    if not (source / "config.json").is_file():
        fail(f"{source} is neither a moetune package nor a Hugging Face model directory (no config.json)")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as exc:
        fail(f"{source}: cannot load it as a causal LM: {str(exc).splitlines()[0]}")
    return model, load_tokenizer(source)


def package_command(
    source: Annotated[Path, typer.Argument(help="A local Hugging Face MoE model directory, or a moetune package.")],
    out: Annotated[Path, typer.Argument(help="The package directory to write (must be new or empty).")],
    target: TargetOpt = None,
    db: Annotated[str | None, typer.Option(help="Kernel database path or URL (default: the embedded one).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Write into a non-empty OUT (files are replaced).")] = False,
    quant: QuantOpt = None,
    quant_group: QuantGroupOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Package a model with its tuned kernel records: safetensors weights, JSON configs, a SHA-256 manifest.

    With --quant the routed experts are quantized first and the package stores their codes and scales (`moetune
    run` / load() run them as they are). Example: moetune package ./my-qwen-moe ./my-qwen-moe.moetune --quant int8
    """
    from moetune.model.packaging import PackageError, is_package, package, read_manifest

    if not source.exists():
        fail(f"{source} does not exist")
    if quant_group is not None and quant is None:
        fail("--quant-group needs --quant (int8, int4, w8a8 or w4a8)")
    if quant is not None and is_package(source):
        fail("--quant quantizes a Hugging Face model directory; package the model again from its directory")
    if quant is not None and (source / "config.json").is_file():  # the format fits the model: checked before loading
        from moetune.model import MoEConfig

        try:
            MoEConfig.from_hf(source).quantized(quant, quant_group)
        except ValueError as exc:
            fail(str(exc))
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        fail(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    with console.status(f"loading {source}"):
        model, tokenizer = _load_source(source)
    if quant is not None:
        from moetune.model import patch

        try:
            with console.status(f"quantizing the experts to {quant}"):
                patch(model, db=False, quant=quant, quant_group=quant_group)
        except ValueError as exc:
            fail(str(exc))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            path = package(model, out, targets=target or ["cpu"], db=db, tokenizer=tokenizer, overwrite=overwrite)
        except (PackageError, ValueError) as exc:
            fail(str(exc))
    manifest = read_manifest(path)
    records = len(json.loads((path / "kernels.json").read_text())["records"])
    if as_json:
        print_json({"package": str(path), "kind": manifest["kind"], "records": records, **manifest})
        return
    for w in seen:
        err_console.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False, soft_wrap=True)
    size = sum(f["bytes"] for f in manifest["files"].values())
    console.print(
        f"packaged {manifest['kind']} to {path}: {len(manifest['files'])} files, {size / 1e6:.1f} MB, "
        f"{records} tuned kernel record(s) for {', '.join(manifest['targets'])}"
    )


def run_command(
    package_dir: Annotated[Path, typer.Argument(metavar="PACKAGE", help="A directory written by `moetune package`.")],
    text: Annotated[
        str | None, typer.Argument(metavar="[INPUT]", help="The prompt (causal LM) or sentence (encoder).")
    ] = None,
    ids: Annotated[
        str | None,
        typer.Option(help="The prompt as token ids, e.g. 1,2,3 (a causal LM packaged without a tokenizer)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate (causal LM).")] = 20,
    target: Annotated[str, typer.Option("--target", "-t", help="Target to run on.")] = "cpu",
    as_json: JsonFlag = False,
) -> None:
    """Run a packaged model: a causal LM generates greedily from INPUT; an encoder prints INPUT's embedding.

    Example: moetune run ./student.moetune "The cat sat on the mat."   or   moetune run ./lm.pkg --ids 1,2,3
    """
    from moetune.model.packaging import PackageError, load, load_tokenizer, read_manifest

    if (text is None) == (ids is None):
        fail("give the input as INPUT text or as --ids, not both and not neither")
    prompt_ids = parse_ints(ids, "--ids", minimum=0, noun="token ids") if ids is not None else None
    try:
        kind = read_manifest(package_dir)["kind"]  # verified first: a tampered package is reported as such
        if kind == "moe":
            fail(f"{package_dir} holds a bare MoE layer with no text interface; use moetune.model.load() in Python")
        tok = load_tokenizer(package_dir) if kind == "hf-causal-lm" else None
        if kind == "hf-causal-lm" and tok is None and prompt_ids is None:
            fail(f"{package_dir} has no tokenizer; give the prompt as token ids (--ids 1,2,3) or package a tokenizer")
        if kind == "hf-causal-lm" and prompt_ids is not None:
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(str(package_dir)).get_text_config().vocab_size
            if max(prompt_ids) >= vocab:
                fail(f"--ids must be token ids below the vocabulary size {vocab}, got {max(prompt_ids)}")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model = load(package_dir, target=target)
    except (PackageError, ValueError) as exc:
        fail(str(exc))
    if not as_json:
        for w in seen:
            err_console.print(f"[yellow]warning:[/yellow] {w.message}", highlight=False, soft_wrap=True)
    import torch

    start = time.perf_counter()
    if kind == "hf-causal-lm":
        input_ids = torch.tensor([prompt_ids]) if prompt_ids is not None else tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        new = out[0, input_ids.shape[1] :]
        result = {
            "kind": kind,
            "prompt": text if text is not None else prompt_ids,
            "completion": tok.decode(new, skip_special_tokens=True) if tok is not None else new.tolist(),
            "new_tokens": int(new.numel()),
            "seconds": seconds,
            "tokens_per_s": new.numel() / seconds,
        }
        if as_json:
            print_json(result)
        else:
            prompt, completion = result["prompt"], result["completion"]
            if text is None:
                console.print(f"prompt ids {prompt} -> new ids {completion}", highlight=False, soft_wrap=True)
            else:  # Text, not markup: a prompt holding [brackets] prints as it is
                console.print(Text(prompt) + Text(completion, style="bold"), soft_wrap=True)
            console.print(f"{result['new_tokens']} tokens in {seconds:.2f} s ({result['tokens_per_s']:.1f} tok/s)")
    elif hasattr(model, "encode"):
        if text is None:
            fail(f"{package_dir} holds an encoder: give the sentence as INPUT (--ids is for causal LMs)")
        emb = model.encode([text])[0]
        seconds = time.perf_counter() - start
        if as_json:
            print_json({"kind": kind, "input": text, "dim": emb.numel(), "embedding": emb.tolist(), "seconds": seconds})
        else:
            head = ", ".join(f"{v:+.4f}" for v in emb[:8].tolist())
            console.print(f"embedding of dim {emb.numel()} (L2 norm {emb.norm():.4f}) in {seconds * 1e3:.1f} ms")
            console.print(f"[{head}, ...]")
    else:
        fail(f"{package_dir} holds a {kind} model with no text interface; use moetune.model.load() in Python")
