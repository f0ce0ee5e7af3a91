"""CounterFact and zsRE case scoring on SmolLM2-135M: today's scorer against the 0.1.0 one.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/scoring_speed.py [--cases 100] [--threads 2]

Both scorers run on the same cases in the same process, twice each, alternating (the faster of
the two runs counts), so the ratio is measured under the same machine load. The 0.1.0 scorer is
reconstructed here from the library's own pieces: single-token targets read from one pass over
each distinct prompt, every multi-token target as its own ``prompt + target`` sequence
(:func:`~rlsedit_llm.pipeline.scoring.score_targets`, in order of character length). The
metrics of both must agree up to float round-off (printed: cases whose metrics differ, which
happens only where two tokens' probabilities are tied to round-off).
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import torch

import rlsedit_llm
from rlsedit_llm.evaluation import data, metrics
from rlsedit_llm.pipeline.facts import encode_target
from rlsedit_llm.pipeline.scoring import TargetScore, score_targets


def score_pairs_v010(model, tokenizer, prompts, targets, *, batch_size: int = 32):
    """The 0.1.0 ``score_pairs`` (for this measurement only)."""
    out = [None] * len(prompts)
    ids = [encode_target(tokenizer, t) for t in targets]
    single = [i for i in range(len(prompts)) if len(ids[i]) == 1]
    multi = [i for i in range(len(prompts)) if len(ids[i]) != 1]
    if single:
        distinct = sorted({prompts[i] for i in single})
        logp = {}
        for rows, logits in metrics._last_token_logits(model, tokenizer, distinct, batch_size=batch_size):
            picked = torch.log_softmax(logits, dim=-1).cpu()
            for r, i in enumerate(rows):
                logp[distinct[i]] = picked[r]
        for i in single:
            lp, t = logp[prompts[i]], ids[i][0]
            out[i] = TargetScore(lp[t].reshape(1).clone(), (lp.argmax() == t).reshape(1))
    if multi:
        order = sorted(multi, key=lambda i: len(prompts[i]) + len(targets[i]))
        scored = score_targets(model, tokenizer, [prompts[i] for i in order], [targets[i] for i in order],
                               batch_size=batch_size)
        for i, sc in zip(order, scored, strict=True):
            out[i] = sc
    return out


def _timed(fn) -> tuple[float, list[dict]]:
    tic = time.perf_counter()
    rows = fn()
    return time.perf_counter() - tic, rows


def _differing_cases(a: list[dict], b: list[dict], tol: float = 1e-4) -> int:
    """Cases with any per-case metric differing by more than ``tol`` (float round-off can flip a
    near-tie of two tokens' probabilities, which moves a 0/1 metric of that case)."""
    def differs(x, y):
        return isinstance(x, float) and not (math.isnan(x) and math.isnan(y)) and abs(x - y) > tol
    return sum(any(differs(v, rb[k]) for k, v in ra.items()) for ra, rb in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = rlsedit_llm.load_model("smollm2")
    print(f"SmolLM2-135M, {args.cases} cases per data set, torch threads {torch.get_num_threads()}")
    print("| data set | prompts | 0.1.0 scorer (s) | today (s) | speed-up | cases differing (near-ties) |")
    print("|---|---|---|---|---|---|")
    for name, scorer in (("counterfact", metrics.counterfact_case_scores), ("zsre", metrics.zsre_case_scores)):
        facts = data.load_stream(name, args.cases, tok)
        n_prompts = sum(1 + len(f.paraphrases) + len(f.neighbourhood) for f in facts)
        old_times, new_times = [], []
        for _ in range(2):
            original = metrics.score_pairs
            metrics.score_pairs = score_pairs_v010
            try:
                t_old, old = _timed(partial(scorer, model, tok, facts))
            finally:
                metrics.score_pairs = original
            t_new, new = _timed(partial(scorer, model, tok, facts))
            old_times.append(t_old)
            new_times.append(t_new)
        t_old, t_new = min(old_times), min(new_times)
        print(f"| {name} | {n_prompts} | {t_old:.1f} | {t_new:.1f} | {t_old / t_new:.2f}x | "
              f"{_differing_cases(old, new)} of {len(new)} |")


if __name__ == "__main__":
    main()
