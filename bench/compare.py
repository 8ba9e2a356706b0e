#!/usr/bin/env python3
"""Gristmill beside llama.cpp on the same model, shapes and threads, run alternately.

    python3 bench/compare.py [--rounds 3] [--seqs 1,4,16,32,64] [--threads 2] [--out out/compare]

For each round and each number of parallel sequences N it runs llama.cpp's
`llama-batched-bench -npp 128 -ntg 128 -npl N` and then `gristmill bench throughput` with N
prompts of 128 tokens generating 128 each, once per precision (`fast`, `exact`); then one
512-token prompt on each (prompt processing). Figures are medians over rounds; ratios are
Gristmill over llama.cpp. Writes `summary.json`, `table.md` and `throughput.svg` under --out
and prints the table.

llama.cpp comes from the sources vendored in PyPI's llama-cpp-python 0.3.36 (the version the
benchmarks in docs/benchmarks.md used), built natively (`-march=native`, as its README builds
it) into $GRISTMILL_CACHE_DIR/llama.cpp (else ~/.cache/gristmill/llama.cpp) the first time:
about 12 minutes on 2 cores. `--llama-bench PATH` uses an existing `llama-batched-bench`.
Standard library only; run by hand, never in CI.
"""

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    d = os.environ.get("GRISTMILL_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "gristmill"


def build_llama_cpp() -> Path:
    """Downloads and builds llama-batched-bench once; returns its path."""
    base = cache_dir() / "llama.cpp"
    exe = base / "build" / "bin" / "llama-batched-bench"
    if exe.exists():
        return exe
    base.mkdir(parents=True, exist_ok=True)
    venv = base / "venv"
    if not (venv / "bin" / "cmake").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "cmake==3.31.6", "ninja==1.11.1.4"], check=True)
    src = base / "src"
    if not (src / "CMakeLists.txt").exists():
        dl = base / "sdist"
        dl.mkdir(parents=True, exist_ok=True)
        # The sdist straight from PyPI's simple index (`pip download --no-binary` would build
        # its build dependencies, cmake among them, from source just to read its metadata).
        index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/").read().decode()
        name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        m = re.search(r'href="([^"#]*/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', index)
        if not m:
            raise SystemExit(f"{name} not found on PyPI's simple index")
        data = urllib.request.urlopen(m.group(1)).read()
        if hashlib.sha256(data).hexdigest() != m.group(2):
            raise SystemExit(f"{name}: sha256 mismatch")
        (dl / name).write_bytes(data)
        tgz = next(dl.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(tgz) as t:
            t.extractall(base / "extract", filter="data")
        (base / "extract" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp").rename(src)
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    subprocess.run(
        ["cmake", "-S", str(src), "-B", str(base / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_SERVER=OFF"],
        check=True, env=env,
    )
    subprocess.run(["cmake", "--build", str(base / "build"), "--target", "llama-batched-bench", "-j", "2"],
                   check=True, env=env)
    return exe


def llama(exe: Path, model: str, threads: int, pp: int, tg: int, npl: int) -> dict:
    ctx = max(npl * (pp + tg) + 64, 1024)
    out = subprocess.run(
        [str(exe), "-m", model, "-t", str(threads), "-c", str(ctx), "-npp", str(pp), "-ntg", str(tg),
         "-npl", str(npl), "--output-format", "jsonl"],
        capture_output=True, text=True, check=True,
        env=dict(os.environ, LD_LIBRARY_PATH=str(exe.parent)),
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() + out.stderr.splitlines() if line.startswith("{")]
    if not rows:
        raise SystemExit(f"llama-batched-bench printed no result:\n{out.stderr[-2000:]}")
    r = rows[-1]
    return {"total_tps": r["speed"], "prompt_tps": r["speed_pp"], "decode_tps": r["speed_tg"],
            "decode_ms_per_token": 1000.0 * r["t_tg"] / tg}


def gristmill(exe: Path, model: str, threads: int, precision: str, pp: int, tg: int, n: int, tmp: Path) -> dict:
    j = tmp / f"gm-{precision}-{n}-{pp}-{tg}.json"
    subprocess.run(
        [str(exe), "bench", "throughput", "--model", model, "--threads", str(threads), "--precision", precision,
         "--num-prompts", str(n), "--max-num-seqs", str(n), "--input-len", str(pp), "--output-len", str(tg),
         "--output-json", str(j),
         # The runs alternate back to back on an otherwise idle machine: the 1-minute load
         # average (still high from the previous run) says nothing about this one.
         "--quiet-load", "1000"],
        check=True, stdout=subprocess.DEVNULL,
    )
    r = json.loads(j.read_text())
    r = r[0] if isinstance(r, list) else r
    return {"total_tps": r["tokens_per_second"], "prompt_tps": r["prompt_tokens"] / max(r["elapsed_time"], 1e-9),
            "decode_ms_per_token": r["itl"]["p50_ms"], "cpu_kernels": r.get("cpu_kernels", "")}


def svg(series: dict, seqs: list, title: str) -> str:
    w, h, l, b, t, r = 640, 400, 70, 50, 40, 150
    ymax = max(v for s in series.values() for v in s) * 1.1
    xs = {n: l + (w - l - r) * i / max(len(seqs) - 1, 1) for i, n in enumerate(seqs)}
    y = lambda v: h - b - (h - b - t) * v / ymax
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{l}" y1="{h - b}" x2="{w - r}" y2="{h - b}" stroke="black"/>',
           f'<line x1="{l}" y1="{t}" x2="{l}" y2="{h - b}" stroke="black"/>',
           f'<text x="{(l + w - r) / 2}" y="{h - 10}" text-anchor="middle">parallel sequences (128 prompt + 128 generated tokens each)</text>',
           f'<text x="15" y="{h / 2}" text-anchor="middle" transform="rotate(-90 15 {h / 2})">total tokens/s</text>']
    for n in seqs:
        out.append(f'<text x="{xs[n]}" y="{h - b + 16}" text-anchor="middle">{n}</text>')
    for i in range(6):
        v = ymax * i / 5
        out.append(f'<text x="{l - 6}" y="{y(v) + 4}" text-anchor="end">{v:.0f}</text>')
        out.append(f'<line x1="{l}" y1="{y(v)}" x2="{w - r}" y2="{y(v)}" stroke="#ddd"/>')
    for k, (name, vals) in enumerate(series.items()):
        c = colors[k % len(colors)]
        pts = " ".join(f"{xs[n]},{y(v)}" for n, v in zip(seqs, vals))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{xs[n]}" cy="{y(v)}" r="3" fill="{c}"/>' for n, v in zip(seqs, vals)]
        out.append(f'<line x1="{w - r + 10}" y1="{t + 20 * k}" x2="{w - r + 30}" y2="{t + 20 * k}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{w - r + 35}" y="{t + 20 * k + 4}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    ap.add_argument("--seqs", default="1,4,16,32,64", help="parallel sequences per point")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines")
    ap.add_argument("--model", default=str(cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--gristmill", default=str(ROOT / "target" / "release" / "gristmill"),
                    help="the gristmill binary (cargo build --release)")
    ap.add_argument("--llama-bench", help="an existing llama-batched-bench (else built into the cache)")
    ap.add_argument("--precisions", default="fast,exact")
    ap.add_argument("--out", default=str(ROOT / "out" / "compare"))
    a = ap.parse_args()
    seqs = [int(s) for s in a.seqs.split(",")]
    precisions = a.precisions.split(",")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lexe = Path(a.llama_bench) if a.llama_bench else build_llama_cpp()
    gexe = Path(a.gristmill)
    runs = {"llama.cpp": {}, **{f"gristmill {p}": {} for p in precisions}}
    for rnd in range(a.rounds):
        for n in seqs + ["pp512"]:
            pp, tg, npl = (512, 1, 1) if n == "pp512" else (128, 128, n)
            print(f"round {rnd + 1}/{a.rounds}: {n} ...", file=sys.stderr, flush=True)
            runs["llama.cpp"].setdefault(str(n), []).append(llama(lexe, a.model, a.threads, pp, tg, npl))
            for p in precisions:
                runs[f"gristmill {p}"].setdefault(str(n), []).append(
                    gristmill(gexe, a.model, a.threads, p, pp, tg, npl, out))
    med = lambda rs, key: statistics.median(r[key] for r in rs)
    kernels = runs[f"gristmill {precisions[0]}"][str(seqs[0])][0]["cpu_kernels"]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16") if f in flags]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [f"Machine: {cpu}, {os.cpu_count()} CPUs, flags {' '.join(isa)}; Gristmill kernels: {kernels}; "
             f"commit {commit}; {a.threads} threads; {a.rounds} alternating rounds, medians.", "",
             "| parallel sequences | llama.cpp total tok/s | " +
             " | ".join(f"{p} total tok/s | {p} ratio" for p in precisions) + " |",
             "|---:|---:|" + "---:|---:|" * len(precisions)]
    summary = {"machine": {"cpu": cpu, "flags": isa, "cpus": os.cpu_count(), "gristmill_kernels": kernels},
               "commit": commit, "threads": a.threads, "rounds": a.rounds, "runs": runs, "median": {}}
    for n in seqs:
        base = med(runs["llama.cpp"][str(n)], "total_tps")
        row = [f"{n}", f"{base:.1f}"]
        for p in precisions:
            v = med(runs[f"gristmill {p}"][str(n)], "total_tps")
            row += [f"{v:.1f}", f"{v / base:.2f}×"]
            summary["median"].setdefault(f"gristmill {p}", {})[str(n)] = v
        summary["median"].setdefault("llama.cpp", {})[str(n)] = base
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    single = med(runs["llama.cpp"]["1"], "decode_ms_per_token") if 1 in seqs else None
    pp = med(runs["llama.cpp"]["pp512"], "prompt_tps")
    lines.append("| | llama.cpp | " + " | ".join(precisions) + " |")
    lines.append("|---|---:|" + "---:|" * len(precisions))
    if single is not None:
        cells = []
        for p in precisions:
            v = med(runs[f"gristmill {p}"]["1"], "decode_ms_per_token")
            cells.append(f"{v:.1f} ms ({single / v:.2f}×)")
        lines.append(f"| single-stream decode, per token (p50) | {single:.1f} ms | " + " | ".join(cells) + " |")
    cells = []
    for p in precisions:
        v = med(runs[f"gristmill {p}"]["pp512"], "prompt_tps")
        cells.append(f"{v:.0f} tok/s ({v / pp:.2f}×)")
    lines.append(f"| one 512-token prompt | {pp:.0f} tok/s | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    series = {k: [summary["median"][k][str(n)] for n in seqs] for k in summary["median"]}
    (out / "throughput.svg").write_text(svg(series, seqs, f"Gristmill and llama.cpp, {a.threads} threads"))
    print(table)


if __name__ == "__main__":
    main()
