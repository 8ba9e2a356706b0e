#!/usr/bin/env python3
"""Reference fixtures from HF transformers, for Gristmill's correctness tests.

Run by hand, never in CI (it needs a large PyTorch install):

    python3 -m venv ~/.cache/gristmill/fixvenv
    ~/.cache/gristmill/fixvenv/bin/pip install torch transformers gguf accelerate
    ~/.cache/gristmill/fixvenv/bin/python scripts/make_fixtures.py

It writes, under tests/fixtures/:
  smollm2_logits.json     logits of the default GGUF model (dequantised to fp32 by transformers) at
                          every position of a few prompts: the top 32 entries, 64 fixed probe ids
                          and the log-sum-exp of the full row;
  smollm2_greedy.json     64-token greedy continuations of raw and chat-templated prompts, with the
                          reference top-1 minus top-2 logit margin at every step;
  smollm2_tokenizer.json  token ids of a varied set of strings, and chat templates rendered by HF;
  tiny-qwen2/, tiny-llama3/, tiny-qwen3/, tiny-phi3/  random-weight safetensors models (config.json,
                          tokenizer.json, weights; Qwen2 with q/k/v bias and untied embeddings,
                          sharded f32; Llama with Llama-3 rope scaling and tied embeddings, single
                          bf16 file; Qwen3 with per-head q/k norms and head_dim 32 ≠ hidden/heads;
                          Phi-3 with fused qkv and gate_up projections, f32; Gemma 3 with a
                          4-wide sliding window, sandwich norms, GeGLU and linear RoPE scaling),
                          each with reference.json holding their full logits.

  tiny-qwen3-Q4_K_M.gguf  a 256-wide tiny Qwen3 converted by llama.cpp's convert_hf_to_gguf.py
                          and quantised by its llama-quantize (built from the llama.cpp sources in
                          PyPI's llama-cpp-python 0.3.36 sdist; LLAMA_CPP points at them), with
                          tiny-qwen3-Q4_K_M.json: transformers' logits for that GGUF.

`python3 scripts/make_fixtures.py tiny-qwen3` (or `k-quants`) makes one of them only. Building
llama-quantize: `cmake -S $LLAMA_CPP -B $LLAMA_CPP/build -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF &&
cmake --build $LLAMA_CPP/build --target llama-quantize`.
"""

import json
import os
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
CACHE = pathlib.Path(os.environ.get("GRISTMILL_CACHE_DIR", pathlib.Path.home() / ".cache" / "gristmill"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = CACHE / "models"

torch.manual_seed(0)
torch.set_num_threads(2)


def dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


LOGIT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWrite a haiku about rust.<|im_end|>\n<|im_start|>assistant\n",
]

RAW_PROMPTS = [
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "import numpy as np\n\ndef moving_average(x, w):\n",
    "Kubernetes is a system for",
]

CHAT_PROMPTS = [
    [{"role": "user", "content": "Write a Rust function that reverses a string."}],
    [{"role": "user", "content": "What is the capital of Japan?"}],
    [
        {"role": "system", "content": "You are a terse assistant that answers in one sentence."},
        {"role": "user", "content": "Explain what a message queue is."},
    ],
    [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Name another one, and say its colour."},
    ],
]

TOKENIZER_STRINGS = [
    "Hello, world!",
    "  leading spaces and   runs of    spaces  ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 🚀🔥 👩‍💻 🇫🇷 and ZWJ 👨‍👩‍👧‍👦",
    "fn main() {\n    println!(\"{}\", x.iter().map(|v| v * 2).sum::<i32>());\n}",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "special tokens inline: <|endoftext|> and <repo_name> and <|im_end|>",
    "   ",
    "",
    "'s 've 're 'll I'M DON'T",
    "https://example.com/path?query=1&x=%20#frag",
    "SELECT * FROM users WHERE id = 42;",
]

PROBE_IDS = list(range(0, 49152, 768))


def logit_rows(logits):
    rows = []
    for row in logits:
        top = torch.topk(row, 32)
        rows.append(
            {
                "top_ids": top.indices.tolist(),
                "top_logits": [float(v) for v in top.values],
                "probe_logits": [float(row[i]) for i in PROBE_IDS],
                "logsumexp": float(torch.logsumexp(row, dim=0)),
            }
        )
    return rows


def greedy(model, ids, steps):
    """Greedy continuation that ignores EOS, with the top-1 minus top-2 margin at every step."""
    out, margins = [], []
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        past = res.past_key_values
        logits = res.logits[0, -1]
        for _ in range(steps):
            top = torch.topk(logits, 2)
            tok = int(top.indices[0])
            margins.append(float(top.values[0] - top.values[1]))
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1]
    return out, margins


def smollm2():
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF, torch_dtype=torch.float32)
    model.eval()

    dump(
        OUT / "smollm2_tokenizer.json",
        {
            "source": f"transformers {__import__('transformers').__version__}, {GGUF}",
            "encode_without_special_tokens": [
                {"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in TOKENIZER_STRINGS
            ],
            "chat_templates": [
                {
                    "messages": m,
                    "text": tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                }
                for m in CHAT_PROMPTS
            ],
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
    )

    cases = []
    with torch.no_grad():
        for p in LOGIT_PROMPTS:
            ids = tok.encode(p, add_special_tokens=False)
            logits = model(torch.tensor([ids])).logits[0]
            cases.append({"prompt": p, "ids": ids, "positions": logit_rows(logits)})
    dump(OUT / "smollm2_logits.json", {"probe_ids": PROBE_IDS, "cases": cases})

    cases = []
    for p in RAW_PROMPTS:
        ids = tok.encode(p, add_special_tokens=False)
        out, margins = greedy(model, ids, 64)
        cases.append({"kind": "raw", "prompt": p, "ids": ids, "tokens": out, "margins": margins})
    for m in CHAT_PROMPTS:
        text = tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        out, margins = greedy(model, ids, 64)
        cases.append({"kind": "chat", "messages": m, "ids": ids, "tokens": out, "margins": margins,
                      "text": tok.decode(out)})
    dump(OUT / "smollm2_greedy.json", {"cases": cases})


def tiny_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [s for s in TOKENIZER_STRINGS + RAW_PROMPTS + LOGIT_PROMPTS] * 20
    t.train_from_iterator(corpus, trainer)
    t.save(str(path / "tokenizer.json"))
    return t


def tiny_model(name, cfg_cls, model_cls, extra, dtype, shard):
    path = OUT / name
    path.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        f.unlink()
    t = tiny_tokenizer(path)
    vocab = t.get_vocab_size()
    cfg = cfg_cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(1234)
    model = model_cls(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        # Keep norms near one so activations stay in a realistic range.
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.8, 1.2)
    model = model.to(dtype)
    model.save_pretrained(path, max_shard_size=shard, safe_serialization=True)
    # Reload from disk in fp32: the reference sees exactly the saved weights, and buffers such as
    # RoPE's inv_freq are recomputed in fp32 rather than kept at the saving dtype's precision.
    model = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    prompts = ["Hello, world!", "fn main() { println!(\"hi\"); }", "1234567890 digits"]
    cases = []
    with torch.no_grad():
        for p in prompts:
            ids = t.encode(p).ids
            logits = model(torch.tensor([ids])).logits[0]
            cases.append({"prompt": p, "ids": ids, "logits": [[float(v) for v in r] for r in logits]})
    dump(path / "reference.json", {"dtype": str(dtype), "cases": cases})


def tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 32 with 4 heads of a 64-wide model: the attention width differs from the hidden
    # size, as in the real Qwen3 models (2048 vs 1024 in Qwen3-0.6B).
    tiny_model("tiny-qwen3", Qwen3Config, Qwen3ForCausalLM,
               {"tie_word_embeddings": True, "rope_theta": 1000000.0, "head_dim": 32}, torch.bfloat16, "10MB")


def tiny_phi3_longrope():
    from transformers import Phi3Config, Phi3ForCausalLM

    # Phi-3.5's long-context RoPE: per-dimension short factors (used up to the original length,
    # 64 here; the prompts are shorter) and an attention factor from max/original = 4.
    short = [1.0 + 0.15 * i for i in range(8)]
    tiny_model("tiny-phi3-longrope", Phi3Config, Phi3ForCausalLM,
               {"tie_word_embeddings": False, "rope_theta": 10000.0, "pad_token_id": 0,
                "original_max_position_embeddings": 64,
                "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": [4.0] * 8}},
               torch.float32, "10MB")


def tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # Local layer first with a 4-position window (the prompts are longer), a global layer with
    # linear RoPE scaling, an attention scale apart from the head size, tied embeddings.
    tiny_model("tiny-gemma3", Gemma3TextConfig, Gemma3ForCausalLM,
               {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                "tie_word_embeddings": True, "pad_token_id": 0}, torch.float32, "10MB")


def tiny_phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    # Fused qkv_proj and gate_up_proj; a sliding window wider than the prompts (it caps the
    # context Gristmill accepts); no rope scaling (the 4k models).
    tiny_model("tiny-phi3", Phi3Config, Phi3ForCausalLM,
               {"tie_word_embeddings": False, "rope_theta": 10000.0, "sliding_window": 200,
                "pad_token_id": 0}, torch.float32, "10MB")


SPM_EXTRA = [
    "<s>starts with BOS</s> and ends with EOS",
    "a <|user|> marker written in text, and <unk>",
    " one leading space",
    "trailing space ",
    "ends with newline\n",
    "ǅ ﬁ ＡＢＣ ① — full-width and ligatures",
]


def tiny_spm():
    """SentencePiece BPE vocabularies in GGUF, as llama.cpp's converter writes them (scores,
    token types, byte fallback, no merges), for a Llama and a Phi-3 model (they differ in how a
    leading space is marked) and a Gemma 3 model (no prefix; merges in file order), with the ids
    transformers' GGUF tokenizer gives."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    work = CACHE / "fixture-work" / "tiny-spm"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join((TOKENIZER_STRINGS + RAW_PROMPTS + LOGIT_PROMPTS) * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<|user|>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    texts = TOKENIZER_STRINGS + SPM_EXTRA
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    for arch, cfg_cls, model_cls in [("llama", LlamaConfig, LlamaForCausalLM), ("phi3", Phi3Config, Phi3ForCausalLM),
                                     ("gemma3", Gemma3TextConfig, Gemma3ForCausalLM)]:
        hf = work / arch
        hf.mkdir(exist_ok=True)
        cfg = cfg_cls(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        if arch == "gemma3":
            # llama.cpp scales Gemma 3's attention by the head size (as every real Gemma 3 but
            # the 27B has it); the tiny config says so too.
            cfg.head_dim, cfg.query_pre_attn_scalar = 16, 16
        torch.manual_seed(7)
        model_cls(cfg).save_pretrained(hf, safe_serialization=True)
        (hf / "tokenizer.model").write_bytes((work / "tokenizer.model").read_bytes())
        target = OUT / f"tiny-spm-{arch}.gguf"
        convert_to_gguf(hf, target)
        tok = AutoTokenizer.from_pretrained(OUT, gguf_file=target.name)
        cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False), "prompt_ids": tok.encode(t),
                  "decoded": tok.decode(tok.encode(t, add_special_tokens=False), skip_special_tokens=True)}
                 for t in texts]
        logits = []
        if True:
            # transformers reading the GGUF's weights back (with the config, as for head_dim above).
            ref = model_cls.from_pretrained(OUT, gguf_file=target.name, config=cfg, dtype=torch.float32).eval()
            with torch.no_grad():
                for p in LOGIT_PROMPTS[:2]:
                    ids = tok.encode(p)
                    logits.append({"prompt": p, "ids": ids,
                                   "logits": [[float(v) for v in r] for r in ref(torch.tensor([ids])).logits[0]]})
        dump(OUT / f"tiny-spm-{arch}.json", {"file": target.name, "cases": cases, "logits": logits})


CHAT_TEMPLATES = {
    # Real templates, as llama.cpp keeps copies of them (models/templates/ of its sources).
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", "<|endoftext|>", "<|im_end|>"),
    "phi3.5": ("microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>"),
    # Gemma 3's own template is not among them; Gemma 2's has the same raise_exception role
    # checks and turn markers.
    "gemma2": ("google-gemma-2-2b-it.jinja", "<bos>", "<eos>"),
}

CHAT_CONVERSATIONS = [
    [{"role": "user", "content": "Scaffold a Go service."}],
    [{"role": "system", "content": "You write Rust."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write  code\nwith  spaces."}],
    [{"role": "user", "content": "ünïcödé 🚀"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nok"},
     {"role": "user", "content": "again"}],
]


def chat_templates():
    """Real chat templates rendered by transformers' own renderer, with a generation prompt."""
    from transformers import PreTrainedTokenizerFast

    cases = []
    for name, (file, bos, eos) in CHAT_TEMPLATES.items():
        template = (LLAMA_CPP / "models" / "templates" / file).read_text()
        tok = PreTrainedTokenizerFast(tokenizer_file=str(OUT / "tiny-qwen3" / "tokenizer.json"),
                                      bos_token=bos, eos_token=eos)
        for messages in CHAT_CONVERSATIONS:
            try:
                text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
                cases.append({"template": name, "messages": messages, "rendered": text})
            except Exception as e:  # a template that refuses a conversation (Gemma: system role)
                cases.append({"template": name, "messages": messages, "error": str(e)})
    templates = {name: (LLAMA_CPP / "models" / "templates" / f).read_text() for name, (f, _, _) in CHAT_TEMPLATES.items()}
    specials = {name: {"bos": b, "eos": e} for name, (_, b, e) in CHAT_TEMPLATES.items()}
    dump(OUT / "chat_templates.json", {"templates": templates, "specials": specials, "cases": cases})


LLAMA_CPP = pathlib.Path(os.environ.get("LLAMA_CPP", "/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp"))


def convert_to_gguf(hf_dir, out):
    """llama.cpp's own converter (vendored in llama-cpp-python's sdist), F32. Its pre-tokenizer
    check knows only published tokenizers; the tiny one is byte-level BPE with GPT-2's split
    pattern, which GGUF calls `default`."""
    sys.path[:0] = [str(LLAMA_CPP), str(LLAMA_CPP / "gguf-py")]
    import conversion.base as base
    import convert_hf_to_gguf as conv

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outtype", "f32", "--outfile", str(out)]
    try:
        conv.main()
    finally:
        sys.argv = argv


def tiny_qwen3_k_quants():
    """A tiny Qwen3 with 256-wide rows (whole K-quant super-blocks), converted by llama.cpp's
    converter and quantised by its llama-quantize to Q4_K_M (Q4_K and Q6_K blocks, F32 norms);
    the reference is transformers loading that GGUF (it dequantises to f32 with gguf-py)."""
    import subprocess

    from transformers import Qwen3Config, Qwen3ForCausalLM

    work = CACHE / "fixture-work" / "tiny-qwen3-256"
    work.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():
        f.unlink()
    t = tiny_tokenizer(work)
    cfg = Qwen3Config(vocab_size=t.get_vocab_size(), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=True, rope_theta=1000000.0)
    torch.manual_seed(4321)
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(work, safe_serialization=True)
    f32 = work / "f32.gguf"
    convert_to_gguf(work, f32)
    made = {}
    for kind in ["Q4_K_M", "Q5_K_M", "Q3_K_M", "Q2_K"]:
        out = work / f"tiny-qwen3-{kind}.gguf"
        subprocess.run([str(LLAMA_CPP / "build" / "bin" / "llama-quantize"), str(f32), str(out), kind],
                       check=True, capture_output=True)
        made[kind] = out
    # The Q4_K_M file is committed with transformers' logits for it; every file's blocks go to
    # quant_blocks.json (scripts/make_quant_fixtures.py).
    target = OUT / "tiny-qwen3-Q4_K_M.gguf"
    target.write_bytes(made["Q4_K_M"].read_bytes())
    # transformers reads the GGUF's weights (dequantised) but not its head_dim: give it the config.
    ref = Qwen3ForCausalLM.from_pretrained(OUT, gguf_file=target.name, config=cfg, dtype=torch.float32).eval()
    prompts = ["Hello, world!", "fn main() { println!(\"hi\"); }", "1234567890 digits"]
    cases = []
    with torch.no_grad():
        for p in prompts:
            ids = t.encode(p).ids
            logits = ref(torch.tensor([ids])).logits[0]
            cases.append({"prompt": p, "ids": ids, "logits": [[float(v) for v in r] for r in logits]})
    dump(OUT / "tiny-qwen3-Q4_K_M.json", {"file": target.name, "cases": cases})
    print("quantised files for scripts/make_quant_fixtures.py:", " ".join(str(p) for p in made.values()))


def tiny_models():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tiny_qwen3()
    tiny_phi3()
    tiny_phi3_longrope()
    tiny_gemma3()
    tiny_model("tiny-qwen2", Qwen2Config, Qwen2ForCausalLM,
               {"tie_word_embeddings": False, "rope_theta": 1000000.0}, torch.float32, "60KB")
    tiny_model(
        "tiny-llama3",
        LlamaConfig,
        LlamaForCausalLM,
        {
            "tie_word_embeddings": True,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
        torch.bfloat16,
        "10MB",
    )


TARGETS = {
    "tiny": tiny_models,
    "tiny-qwen3": tiny_qwen3,
    "tiny-phi3": tiny_phi3,
    "tiny-phi3-longrope": tiny_phi3_longrope,
    "tiny-gemma3": tiny_gemma3,
    "chat": chat_templates,
    "spm": tiny_spm,
    "k-quants": tiny_qwen3_k_quants,
    "smollm2": smollm2,
}

if __name__ == "__main__":
    what = sys.argv[1:] or ["smollm2", "tiny"]
    unknown = [w for w in what if w not in TARGETS]
    if unknown:
        sys.exit(f"unknown fixture target(s) {unknown}; choose from {sorted(TARGETS)}")
    for w in what:
        TARGETS[w]()
