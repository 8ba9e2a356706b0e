#!/usr/bin/env python3
"""Reference dequantisation of GGML blocks, for Gristmill's bit-exactness tests.

Run by hand, never in CI (it needs the `gguf` package, which Gristmill's tests do not):

    python3 -m venv ~/.cache/gristmill/quantvenv
    ~/.cache/gristmill/quantvenv/bin/pip install gguf==0.17.1 numpy
    ~/.cache/gristmill/quantvenv/bin/python scripts/make_quant_fixtures.py [MODEL.gguf ...]

It writes tests/fixtures/quant_blocks.json: for every quantised type Gristmill reads, some
blocks (hex) and the f32 values (hex of their little-endian bits) that gguf-py's reference
dequantiser gives for them. The blocks are

  - random: every byte random, except the f16 scale fields, which get random finite values of
    either sign (and one block per type with zero scales), so every bit pattern of the values
    and the sub-block scales is exercised;
  - real: with model files given, the first blocks of the first tensor of each type in them
    (e.g. a Q4_K_M file made by llama-quantize, which holds Q4_K, Q6_K and often Q5_0).
"""

import json
import pathlib
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "quant_blocks.json"

# type: (block bytes, byte offsets of f16 fields)
LAYOUT = {
    T.Q4_0: (18, [0]),
    T.Q4_1: (20, [0, 2]),
    T.Q5_0: (22, [0]),
    T.Q5_1: (24, [0, 2]),
    T.Q8_0: (34, [0]),
    T.Q2_K: (84, [80, 82]),
    T.Q3_K: (110, [108]),
    T.Q4_K: (144, [0, 2]),
    T.Q5_K: (176, [0, 2]),
    T.Q6_K: (210, [208]),
    T.IQ4_NL: (18, [0]),
    T.IQ4_XS: (136, [0]),
}
BLOCKS = 6

rng = np.random.default_rng(20261202)


def random_blocks(qtype):
    size, f16_at = LAYOUT[qtype]
    blocks = rng.integers(0, 256, size=(BLOCKS, size), dtype=np.uint8)
    for b in range(BLOCKS):
        for at in f16_at:
            value = 0.0 if b == 0 else rng.normal() * 10.0 ** rng.integers(-4, 1)
            blocks[b, at:at + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)
    return blocks.reshape(-1)


def real_blocks(paths):
    found = {}
    for path in paths:
        reader = GGUFReader(path)
        for t in reader.tensors:
            qtype = T(t.tensor_type)
            if qtype in LAYOUT and qtype not in found:
                size = LAYOUT[qtype][0]
                raw = np.asarray(t.data).view(np.uint8).reshape(-1)
                found[qtype] = (f"{pathlib.Path(path).name}:{t.name}", raw[: BLOCKS * size].copy())
    return found


def entry(qtype, raw, source):
    values = dequantize(raw, qtype).astype(np.float32).reshape(-1)
    return {
        "type": qtype.name,
        "source": source,
        "blocks": raw.tobytes().hex(),
        "values_f32le": values.tobytes().hex(),
    }


def main():
    cases = [entry(q, random_blocks(q), "random") for q in LAYOUT]
    for qtype, (source, raw) in real_blocks(sys.argv[1:]).items():
        cases.append(entry(qtype, raw, source))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    import gguf

    doc = {"made_by": "scripts/make_quant_fixtures.py", "gguf": getattr(gguf, "__version__", "0.17.1"), "cases": cases}
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
