"""The sampler on a device against the same sampler on the CPU: a GPU session's check.

    python benchmark/gpu/sampling_check.py --device cuda [--out sampling.json]

Runs OutputProcessor.sample (the path the scheduler takes) over one batch that builds every
table the sampler has: greedy, sampled with temperature and min-p, top-k/top-p, penalised,
logit-biased and banned (min_new_tokens) rows, seeded, with logprobs, over a vocabulary of
SmolLM2's size, for several steps. Checks that the tokens come back on the device; that the
rows whose choice is an argmax (greedy, penalised, banned) pick what the CPU picks; that sampled
rows pick a token of nonzero probability inside their top-k, and the CPU's token in nearly every
row (a GPU's parallel scan may round a cumulative sum differently); and that the logprobs match.
`--device cpu` runs it here (CPU against CPU). Prints a JSON summary; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from sglang.srt.layers.logits_processor import LogitsProcessorOutput  # noqa: E402
from sglang.srt.managers.output_processor import OutputProcessor  # noqa: E402
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch, ScheduledReq  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

VOCAB = 49152
EOS = 2
CASES = {
    "greedy": dict(temperature=0),
    "sampled": dict(temperature=0.8, min_p=0.05),
    "top-k-p": dict(temperature=0.8, top_k=20, top_p=0.9),
    "penalised": dict(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3),
    "biased": dict(temperature=0.7, logit_bias={"11": 8.0}),
    "banned": dict(temperature=0, min_new_tokens=64),
}
ARGMAX_CASES = ("greedy", "penalised", "banned")


def make_reqs(rows_per_case: int) -> list[Req]:
    reqs = []
    for name, kw in CASES.items():
        params = SamplingParams(max_new_tokens=64, **kw)
        params.normalize()
        for i in range(rows_per_case):
            req = Req(
                f"{name}-{i}",
                list(range(3, 3 + 5 * (i + 1))),
                params,
                seed=1000 + len(reqs),
                return_logprob=True,
                top_logprobs_num=3,
            )
            req.output_ids = [EOS, 5, 5, 9][: i % 5]
            reqs.append(req)
    return reqs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows-per-case", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    reqs = make_reqs(args.rows_per_case)
    batch = ScheduleBatch([ScheduledReq(r, 1, True) for r in reqs])
    processor = OutputProcessor(None, {EOS}, VOCAB)
    gen = torch.Generator().manual_seed(0)
    failures: list[str] = []
    sampled_rows = sampled_mismatch = 0
    max_logprob_err = 0.0
    for step in range(args.steps):
        logits = torch.randn(len(reqs), VOCAB, generator=gen) * 3
        ref = processor.sample(batch, LogitsProcessorOutput(next_token_logits=logits))
        out = processor.sample(batch, LogitsProcessorOutput(next_token_logits=logits.to(args.device)))
        if out.next_token_ids.device.type != torch.device(args.device).type:
            failures.append(f"step {step}: tokens on {out.next_token_ids.device}")
        got, want = out.next_token_ids.cpu().tolist(), ref.next_token_ids.tolist()
        err = (out.next_token_logprobs.cpu() - ref.next_token_logprobs).abs().max().item()
        max_logprob_err = max(max_logprob_err, err)
        for row, req in enumerate(reqs):
            case = req.rid.rsplit("-", 1)[0]
            if case in ARGMAX_CASES:
                if got[row] != want[row]:
                    failures.append(f"step {step} {req.rid}: {got[row]} != CPU {want[row]}")
                continue
            sampled_rows += 1
            sampled_mismatch += got[row] != want[row]
            top_k = req.sampling_params.top_k
            if not 0 <= got[row] < VOCAB or (top_k > 0 and got[row] not in logits[row].topk(top_k).indices.tolist()):
                failures.append(f"step {step} {req.rid}: token {got[row]} outside its top-k")
        for req, token in zip(reqs, want):
            req.output_ids.append(token)  # the next step's penalties and seeds move on
    if max_logprob_err > 1e-3:
        failures.append(f"logprobs differ from the CPU's by {max_logprob_err:.2e}")
    if sampled_mismatch > max(1, sampled_rows // 50):
        failures.append(f"{sampled_mismatch} of {sampled_rows} sampled rows differ from the CPU's draw")
    summary = {
        "device": args.device,
        "rows": len(reqs),
        "steps": args.steps,
        "sampled_rows": sampled_rows,
        "sampled_rows_differing_from_cpu": sampled_mismatch,
        "max_logprob_err": max_logprob_err,
        "failures": failures[:20],
        "ok": not failures,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
