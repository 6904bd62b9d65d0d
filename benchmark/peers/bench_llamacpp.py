"""llama.cpp (llama-cpp-python, built from source for this CPU) on the peer workloads.

    .peers/llama/bin/python benchmark/peers/bench_llamacpp.py [--workloads 8x128/128,...] [--repeats 3]
    .peers/llama/bin/python benchmark/peers/bench_llamacpp.py --check "The capital of France is"

Uses the f16 GGUF that prepare_weights.py wrote (the default model's Q4_1 weights dequantized)
through llama.cpp's own C API (llama_cpp's low-level bindings), batching the N sequences the
way llama.cpp's batched examples do:
  - one context per workload with n_seq_max = N, n_threads = n_threads_batch = --threads
    (default: all CPUs), n_ctx = N * (IN+OUT rounded up to 256), i.e. KV room for every
    sequence (llama.cpp's default non-unified KV cache: one stream per sequence), other
    context parameters at llama.cpp's defaults (n_batch 2048, n_ubatch 512, flash attention auto);
  - prefill: all N prompts in llama_batch'es of up to n_batch tokens, each token tagged with
    its sequence id and position, logits requested only for each prompt's last token;
  - decode: one llama_batch per step holding the N sequences' last tokens (seq ids 0..N-1),
    logits for all N; the next tokens are the argmax of those logits (greedy; EOS is never
    checked, so each sequence gets exactly OUT tokens);
  - the KV memory is cleared between runs.
Prints one JSON line per workload.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_cpp as lc  # noqa: E402
import numpy as np  # noqa: E402
from workloads import add_common_args, default_paths, emit, log, measure, parse_workloads  # noqa: E402

_KEEP = []  # ctypes callbacks must outlive their registration


def quiet_logs() -> None:
    @lc.llama_log_callback
    def _drop(level, text, user_data):
        pass

    _KEEP.append(_drop)
    lc.llama_log_set(_drop, ctypes.c_void_p(0))


class BatchedGreedy:
    def __init__(self, model_path: str, threads: int):
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(model_path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.threads = threads
        self.ctx = None
        self.shape = None

    def context_for(self, num: int, seq_len: int) -> None:
        per_seq = -(-seq_len // 256) * 256
        if self.shape == (num, per_seq):
            return
        if self.ctx:
            lc.llama_free(self.ctx)
        p = lc.llama_context_default_params()
        p.n_ctx = num * per_seq
        p.n_seq_max = num
        p.n_threads = self.threads
        p.n_threads_batch = self.threads
        self.n_batch = max(p.n_batch, num)
        p.n_batch = self.n_batch
        self.ctx = lc.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={p.n_ctx}, n_seq_max={num})")
        self.params = {
            "n_ctx": p.n_ctx,
            "n_seq_max": num,
            "n_batch": p.n_batch,
            "n_ubatch": p.n_ubatch,
            "flash_attn_type": p.flash_attn_type,
            "kv_unified": bool(p.kv_unified),
        }
        self.shape = (num, per_seq)
        self.batch = lc.llama_batch_init(self.n_batch, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """entries: (token, pos, seq_id, want_logits); returns argmax ids of the wanted rows in order."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(entries)
        rc = lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} ({len(entries)} tokens)")
        n_out = sum(1 for e in entries if e[3])
        if n_out == 0:
            return np.empty(0, dtype=np.int64)
        logits = np.ctypeslib.as_array(lc.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
        return logits.argmax(axis=1)

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        num = len(prompts)
        self.context_for(num, max(len(p) for p in prompts) + output_len)
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        # Prefill, chunked to n_batch tokens; the last token of each prompt asks for logits.
        entries = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        last: list[int] = []
        for k in range(0, len(entries), self.n_batch):
            last.extend(int(x) for x in self._decode(entries[k : k + self.n_batch]))
        outputs = [[t] for t in last]
        # Decode: one token per sequence per step.
        for step in range(1, output_len):
            nxt = self._decode([(outputs[s][-1], len(prompts[s]) + step - 1, s, True) for s in range(num)])
            for s in range(num):
                outputs[s].append(int(nxt[s]))
        return outputs


def check(model_path: str, prompt: str, n: int, threads: int) -> None:
    """Greedy continuation of a text prompt (single sequence), printed as {"check_output": text}."""
    g = BatchedGreedy(model_path, threads)
    buf = (lc.llama_token * 512)()
    n_tok = lc.llama_tokenize(g.vocab, prompt.encode(), len(prompt.encode()), buf, 512, True, False)
    ids = list(buf[:n_tok])
    out = g.generate([ids], n)[0]
    text = b""
    piece = ctypes.create_string_buffer(256)
    for t in out:
        k = lc.llama_token_to_piece(g.vocab, t, piece, 256, 0, False)
        text += piece.raw[:k]
    print(json.dumps({"check_output": text.decode(errors="replace")}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--model", default=default_paths()["f16_gguf"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--check", metavar="PROMPT", default=None, help="print a greedy continuation and exit")
    parser.add_argument("--check-tokens", type=int, default=16)
    parser.add_argument("--verbose", action="store_true", help="keep llama.cpp's own log")
    args = parser.parse_args()
    if not os.path.exists(args.model):
        log(f"no model at {args.model}: run benchmark/peers/prepare_weights.py first")
        return 2
    if not args.verbose:
        quiet_logs()
    if args.check is not None:
        check(args.model, args.check, args.check_tokens, args.threads)
        return 0
    workloads = parse_workloads(args.workloads)
    g = BatchedGreedy(args.model, args.threads)
    sysinfo = lc.llama_print_system_info().decode()
    # "CPU : SSE3 = 1 | AVX = 1 | ... |": the features the build uses
    isa = sorted(
        {
            kv.split("=")[0].split(":")[-1].strip()
            for kv in sysinfo.split("|")
            if "=" in kv and kv.split("=")[1].strip() == "1"
        }
    )

    def run_batch(prompts: list[list[int]], output_len: int) -> int:
        return sum(len(o) for o in g.generate(prompts, output_len))

    for w in workloads:
        runs = measure(w, args.repeats, g.n_vocab, run_batch, log=log)
        emit(
            "llamacpp",
            w,
            runs,
            version=lc.__version__,
            model=os.path.basename(args.model),
            weights="f16 GGUF (dequantized Q4_1)",
            dtype="float16",
            threads=args.threads,
            context=g.params,
            cpu_features=isa,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
