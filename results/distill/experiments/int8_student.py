"""The packaged default student with int8 routed experts (issue #20: "also with int8 experts ... report both").

Usage: .venv/bin/python results/distill/experiments/int8_student.py PACKAGE_DIR OUT_DIR [FORMAT]
FORMAT: int8 (weight-only, the default) or w8a8 (int8 codes, inputs quantized per token: VNNI dot products).
Rebuilds the fp32 student from a `moetune distill` package, quantizes its routed experts to int8 (group 32,
MoEStudent.quantize_, as `moetune distill --quant int8` does after training), packages it with untuned kernels,
then in one process: held-out cosine / retrieval of both packages vs the teacher (512 texts) and the encode speed
of both vs the teacher (the command's own encode_speed: same batches of 64, interleaved, 5 rounds, p50).
"""

import json
import sys
from pathlib import Path

from moetune.autotune.cli.distill import _bench_batches, encode_speed
from moetune.model.distill.pipeline import evaluate, load_teacher
from moetune.model.distill.student import MoEStudent
from moetune.model.distill.text import corpus
from moetune.model.packaging import load, load_tokenizer, package
from moetune.model.safetensors_io import load_weights

src, out = Path(sys.argv[1]), Path(sys.argv[2])
fmt = sys.argv[3] if len(sys.argv) > 3 else "int8"
meta = json.loads((src / "moetune.json").read_text())
student = MoEStudent.from_package_config(meta["config"], load_tokenizer(src))
missing, unexpected = load_weights(student, src / "model.safetensors")
assert not missing and not unexpected, (missing, unexpected)
student.quantize_(fmt)
package(student, out, targets=["cpu"])
fp32, quant = load(src, target="cpu"), load(out, target="cpu")
teacher, tok = load_teacher("minilm")
held = corpus("heldout")[:512]
for name, model in (("fp32", fp32), (fmt, quant)):
    print(name, {k: round(v, 4) for k, v in evaluate(model, teacher, tok, held).items()}, flush=True)
batches = _bench_batches(tok, held, 64, fp32.max_length)
speed = encode_speed(teacher.eval(), {"student_fp32": fp32.bert, f"student_{fmt}": quant.bert}, batches)
print({k: round(v) for k, v in speed["p50_ms"].items()}, {k: round(v, 3) for k, v in speed["speedup"].items()})
