"""The noisy-data study: does the confidence split matter when a quarter of the examples are bad, and does Mixup
beat dropping them?

The overfit study's protocol (`overfit_study`: SmolLM2-135M-Instruct, 8 epochs, evaluations after epochs 1, 2, 4
and 8 on the same clean held-out sets, in domain and out of domain) on its 256 training examples with 64 of them
(25%, seeded) made bad in three kinds, equal parts (`make_noisy_sets`):

- ``mismatched``: the response of another training example;
- ``truncated``: the response cut to its first quarter of tokens;
- ``wrong_language``: the Chinese response of the same Alpaca record (``alpaca_52k_en_zh_parts``).

The ids and kinds of the bad examples are written next to the data (``noise.jsonl``) and kept in the record.

Stage 1 only (detection, `detection_report`): for the ``reference`` (the paper's), ``warmup``, ``online`` and
``base`` scorers and for variability, the ROC AUC of low confidence (high variability) for finding the bad
examples, and the share of the bad examples in the unconfident half, overall and per kind.

Arms, 3 seeds each: ``ntp``; ``sftmix`` (the paper's stage 1 on the noisy data, mixup_weight 0.2); ``random`` (that
split's labels shuffled per seed); ``filter`` (NTP after ``selection: drop_unconfident:0.25`` by the same stage 1);
``clean`` (NTP on the 192 good examples only: a bound no user has); then ``cheap`` (the online scorer) and
``filter_mixup`` (the filter, then SFTMix on what is kept, split again at the kept examples' median).

Like the overfit study, every finished (arm, seed, epoch, set) evaluation is kept in the record
(``benchmarks/results/efficacy_noisy/``) as it finishes, the report is made from the record alone, and a rerun
continues where the record stops:

    python benchmarks/noisy_study.py --root runs/efficacy --seeds 1 2 3
    python benchmarks/noisy_study.py --report --figure docs/efficacy_noisy.png
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import overfit_study as overfit
from study_common import SEEDS, add_training_arguments, random_split, sh, training_flags

from sftmix.io_utils import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl
from sftmix.stage1.splits import UNCONFIDENT, least_confident, split_agreement

RECORD = Path(__file__).resolve().parent / "results" / "efficacy_noisy"
N_BAD = 64
KINDS = ("mismatched", "truncated", "wrong_language")
DROP = 0.25
# Arm -> extra `sftmix train` flags; "{split}" is the paper's split of the noisy data, "{random}" its shuffle.
ARMS = {
    "ntp": ["--mixup_weight", "0"],
    "sftmix": ["--mixup_weight", "0.2", "--dynamics_path", "{split}"],
    "random": ["--mixup_weight", "0.2", "--dynamics_path", "{random}"],
    "filter": [
        "--mixup_weight",
        "0",
        "--selection",
        f"drop_unconfident:{DROP}",
        "--dynamics_path",
        "{split}",
    ],
    "clean": ["--mixup_weight", "0"],  # trained on the good examples only
    "cheap": ["--mixup_weight", "0.2", "--confidence_scorer", "online"],
    "filter_mixup": [
        "--mixup_weight",
        "0.2",
        "--selection",
        f"drop_unconfident:{DROP}",
        "--dynamics_path",
        "{split}",
    ],
}
ORDER = ("ntp", "sftmix", "random", "filter", "clean", "cheap", "filter_mixup")
# Scorer -> how its stage 1 runs on the noisy data: `sftmix dynamics` flags, or a short `sftmix train` (the
# scorers that measure inside the target's own training: 2 epochs, the split written after the first).
DETECTORS = {
    "reference": ("dynamics", []),
    "base": ("dynamics", ["--confidence_scorer", "base"]),
    "warmup": (
        "train",
        ["--confidence_scorer", "warmup", "--mixup_weight", "0.2", "--num_train_epochs", "2"],
    ),
    "online": (
        "train",
        ["--confidence_scorer", "online", "--mixup_weight", "0.2", "--num_train_epochs", "2"],
    ),
}


# ---- the data ------------------------------------------------------------------------------------------------
def _chinese_responses() -> dict[str, str]:
    """The Chinese response of each Alpaca record, keyed by its English conversation (as sftmix renders it)."""
    from sftmix.data.records import parse_columns, to_messages

    columns = parse_columns(overfit.ALPACA[1])
    found = {}
    for path in sorted(Path(overfit.ALPACA[0]).glob("*.json")):
        for k, record in enumerate(json.loads(path.read_text())):
            if record["en_output"].strip() and record["output"].strip():
                messages = to_messages(record, "alpaca", f"{path.name}:{k}", columns)
                found.setdefault(json.dumps(messages, sort_keys=True), record["output"])
    return found


def make_noisy_sets(root: Path, model: str) -> dict[str, Path]:
    """The overfit study's sets in ``root`` plus ``noisy_train.jsonl`` (64 of the 256 made bad, seed 0),
    ``clean_train.jsonl`` (the 192 left untouched) and ``noise.jsonl`` (index, id, original id and kind of each
    bad example; ids are sftmix's content ids, so they match every dynamics file)."""
    from sftmix.data.models import load_tokenizer
    from sftmix.data.records import example_id

    sets = overfit.make_sets(root)
    paths = {
        **sets,
        "noisy": root / "noisy_train.jsonl",
        "clean": root / "clean_train.jsonl",
        "noise": root / "noise.jsonl",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    rows = read_jsonl(sets["train"])
    rng = random.Random(0)
    bad = sorted(rng.sample(range(len(rows)), N_BAD))
    kinds = [KINDS[k % len(KINDS)] for k in range(N_BAD)]
    rng.shuffle(kinds)
    chinese, tokenizer = _chinese_responses(), load_tokenizer(model)
    noisy, noise = [dict(r) for r in rows], []
    for index, kind in zip(bad, kinds, strict=True):
        messages = [dict(m) for m in rows[index]["messages"]]
        response = messages[-1]["content"]
        if kind == "mismatched":
            donor = rng.choice([i for i in range(len(rows)) if i != index])
            messages[-1]["content"] = rows[donor]["messages"][-1]["content"]
        elif kind == "truncated":
            tokens = tokenizer(response, add_special_tokens=False)["input_ids"]
            messages[-1]["content"] = tokenizer.decode(tokens[: max(1, len(tokens) // 4)]).strip()
        else:
            messages[-1]["content"] = chinese[json.dumps(rows[index]["messages"], sort_keys=True)]
        noisy[index] = {"messages": messages}
        noise.append(
            {
                "index": index,
                "id": example_id(messages),
                "original_id": example_id(rows[index]["messages"]),
                "kind": kind,
            }
        )
    atomic_write_jsonl(paths["noise"], noise)
    atomic_write_jsonl(paths["clean"], [r for i, r in enumerate(rows) if i not in set(bad)])
    atomic_write_jsonl(paths["noisy"], noisy)
    return paths


# ---- running -------------------------------------------------------------------------------------------------
def run_noisy(args: argparse.Namespace) -> None:
    root, record = Path(args.root) / "noisy", Path(args.record)
    root.mkdir(parents=True, exist_ok=True)
    record.mkdir(parents=True, exist_ok=True)
    log = root / "study.log"
    sets = make_noisy_sets(root, args.model)
    if not (record / "noise.jsonl").exists():
        shutil.copyfile(sets["noise"], record / "noise.jsonl")
    common = training_flags(args)
    noisy = ["--dataset_name", str(sets["noisy"])]
    for (
        scorer
    ) in args.detect:  # stage 1 of each scorer, kept in the record as id/confidence/variability/split
        _detect(scorer, root, record, [*common, *noisy], log)
        report_noisy(record)
    split = record / "dynamics-reference.jsonl"
    done = overfit.load_record(record)
    for seed in args.seeds:
        for arm in (a for a in ORDER if a in args.arms):
            run = root / f"{arm}-s{seed}"
            if overfit.all_evaluated(done, run.name):
                continue
            trained_here = not (run / "final" / "config.json").exists()
            if trained_here:
                if "{split}" in ARMS[arm] or "{random}" in ARMS[arm]:
                    _detect("reference", root, record, [*common, *noisy], log)
                fill = {
                    "{split}": str(split),
                    "{random}": str(random_split(split, root / f"random_split-s{seed}.jsonl", seed))
                    if arm == "random"
                    else "",
                }
                extra = [fill.get(flag, flag) for flag in ARMS[arm]]
                data = ["--dataset_name", str(sets["clean" if arm == "clean" else "noisy"])]
                cmd = ["sftmix", "train", *common, *data, *extra, "--num_train_epochs", str(overfit.EPOCHS)]
                sh([*cmd, "--save_strategy", "epoch", "--seed", str(seed), "--output_dir", str(run)], log)
            overfit.evaluate_run(run, record, sets, sh, log, replace=trained_here)
            report_noisy(record)
            for checkpoint in run.glob("checkpoint-*"):  # recorded: the final model is enough
                shutil.rmtree(checkpoint)
            done = overfit.load_record(record)
    report_noisy(record)


def _detect(scorer: str, root: Path, record: Path, common: list[str], log: Path) -> None:
    target = record / f"dynamics-{scorer}.jsonl"
    if target.exists():
        return
    command, flags = DETECTORS[scorer]
    out = root / f"stage1-{scorer}"
    made = out / "dynamics.jsonl" if command == "dynamics" else out / "dynamics" / "dynamics.jsonl"
    if not made.exists():
        if command == "dynamics":
            sh(["sftmix", "dynamics", *common, *flags, "--output_dir", str(out), "--seed", "0"], log)
        else:  # only its first epoch's split is needed: no checkpoints, the model is thrown away
            cmd = ["sftmix", "train", *common, *flags, "--save_strategy", "no", "--seed", "0"]
            sh([*cmd, "--output_dir", str(out)], log)
            shutil.rmtree(out / "final", ignore_errors=True)
    fields = ("id", "confidence", "variability", "split")
    atomic_write_jsonl(target, ({k: r[k] for k in fields if k in r} for r in read_jsonl(made)))


# ---- the report ----------------------------------------------------------------------------------------------
def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half: the Mann-Whitney form of ROC AUC.

    >>> roc_auc(np.array([3.0, 2.0, 1.0, 1.0]), np.array([True, False, True, False]))
    0.625
    """
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def detection_rows(record: Path) -> list[dict]:
    """Per scorer (and variability of the reference run) and per kind: ROC AUC and share in the unconfident half."""
    noise_path = record / "noise.jsonl"
    if not noise_path.exists():
        return []
    kind_of = {r["id"]: r["kind"] for r in read_jsonl(noise_path)}
    rows = []
    for scorer in DETECTORS:
        path = record / f"dynamics-{scorer}.jsonl"
        if not path.exists():
            continue
        data = read_jsonl(path)
        ids = [r["id"] for r in data]
        signals = {scorer: -np.array([r["confidence"] for r in data])}  # low confidence flags an example
        if scorer == "reference":
            signals["variability (reference)"] = np.array([r["variability"] for r in data])
        unconfident = np.array([r["split"] == UNCONFIDENT for r in data])
        dropped = least_confident([r["confidence"] for r in data], DROP)  # what drop_unconfident:DROP removes
        for name, score in signals.items():
            for kind in ("all", *KINDS):
                bad = np.array([i in kind_of and (kind == "all" or kind_of[i] == kind) for i in ids])
                good = np.array([i not in kind_of for i in ids])
                keep = bad | good
                rows.append(
                    {
                        "signal": name,
                        "kind": kind,
                        "n_bad": int(bad.sum()),
                        "auc": roc_auc(score[keep], bad[keep]),
                        "in_unconfident_half": float(unconfident[bad].mean()) if name == scorer else None,
                        "dropped": float(dropped[bad].mean()) if name == scorer else None,
                        "dropped_precision": float(bad[dropped].mean()) if name == scorer else None,
                    }
                )
    return rows


def _agreement_with_reference(record: Path) -> list[str]:
    """How far each other scorer's split agrees with the paper's on the noisy data."""
    paper = record / "dynamics-reference.jsonl"
    if not paper.exists():
        return []
    want = {r["id"]: r["confidence"] for r in read_jsonl(paper)}
    lines = []
    for scorer in DETECTORS:
        path = record / f"dynamics-{scorer}.jsonl"
        if scorer != "reference" and path.exists():
            agree = split_agreement({r["id"]: r["confidence"] for r in read_jsonl(path)}, want)
            lines.append(
                f"- `{scorer}`: {agree['same_half']:.1%} of {agree['n']} examples in the paper split's half "
                f"(Spearman's rho of confidence {agree['spearman']:.3f})"
            )
    return (
        ["", "Each scorer's split against the paper's (`reference`) on the noisy data:", *lines]
        if lines
        else []
    )


def report_noisy(record: Path) -> None:
    """Detection, tables and the paired comparisons, from the record alone, to ``<record>.md`` / ``.json``."""
    loaded = overfit.load_record(record)
    table = overfit.result_table(loaded)
    arms = [a for a in ORDER if any(a in table.get(m, {}) for m in table)]
    detection = detection_rows(record)
    lines = [
        f"Efficacy study `noisy` ({time.strftime('%Y-%m-%d')}): the overfit study's {overfit.N_TRAIN} Alpaca "
        f"examples with {N_BAD} made bad ({', '.join(KINDS)}, equal parts), x {overfit.EPOCHS} epochs; clean "
        f"held-out `indomain` ({overfit.N_INDOMAIN} Alpaca) and `ood` ({overfit.N_OOD} GPTeacher Roleplay).",
        "",
        "## Detection (stage 1 only)",
        "",
        "ROC AUC of the signal for finding the bad examples among the good (0.5: chance; low confidence, or high "
        "variability, flags an example), and the share of the bad examples that land in the unconfident half "
        f"(0.5 expected by chance, 1.0 at most); then what `drop_unconfident:{DROP}` by that scorer removes: the "
        f"share of the bad examples ({DROP:.0%} by chance), and the share of the removed that are bad (precision; "
        f"{N_BAD / overfit.N_TRAIN:.0%} by chance, of all kinds):",
        "",
        "| signal | kind | bad examples | ROC AUC | in the unconfident half | removed by the filter | precision |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in detection:
        cells = [
            "" if r[k] is None else f"{r[k]:.1%}"
            for k in ("in_unconfident_half", "dropped", "dropped_precision")
        ]
        lines.append(
            f"| {r['signal']} | {r['kind']} | {r['n_bad']} | {r['auc']:.3f} | " + " | ".join(cells) + " |"
        )
    lines += _agreement_with_reference(record)
    lines += ["", "## Training arms", "", *overfit.result_tables(table, arms)]
    # (a) the split, (b) Mixup against cleaning, (c) the distance to the bound of knowing the bad examples
    pairs = [(arm, "ntp") for arm in arms if arm not in ("ntp", "clean")]
    pairs += [("sftmix", "random"), ("sftmix", "filter"), ("filter_mixup", "filter")]
    pairs += [(arm, "clean") for arm in arms if arm != "clean"]
    rows = overfit.paired_rows(
        loaded, table, [(a, b) for a, b in pairs if a in arms and b in arms], "{arm} − {base}"
    )
    lines += [
        "Paired comparisons (lower is better for both metrics): arm minus base, at the last epoch and at each "
        "one's best epoch (lowest mean in-domain perplexity over the compared seeds), on the seeds both have; 95% "
        "paired bootstrap interval over seeds and items (10,000 resamples):",
        "",
        "| set/metric | comparison | epochs (arm / base) | seeds | difference | 95% interval | per-seed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    lines += ["", overfit.precision_line(record)]
    missing = overfit.missing_runs(loaded, ORDER, overfit.recorded_seeds(loaded, SEEDS))
    lines += ["", f"Missing (arm-seed, not all 4 epochs evaluated): {', '.join(missing) or 'none'}."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(record.parent / f"{record.name}.md", text)
    atomic_write_json(
        record.parent / f"{record.name}.json", {"detection": detection, "table": table, "missing": missing}
    )
    print(text, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_training_arguments(parser)
    parser.add_argument("--record", default=str(RECORD))
    parser.add_argument(
        "--arms", nargs="+", choices=ORDER, default=["ntp", "sftmix", "random", "filter", "clean"]
    )
    parser.add_argument(
        "--detect",
        nargs="*",
        choices=list(DETECTORS),
        default=["reference", "base"],
        help="stage-1 scorers to measure detection for before training (warmup and online train 2 epochs each)",
    )
    parser.add_argument("--report", action="store_true", help="only write the report from the record")
    parser.add_argument("--figure", default=None, help="also draw the per-epoch figure to this file")
    args = parser.parse_args()
    if not args.report:
        run_noisy(args)
    report_noisy(Path(args.record))
    if args.figure:
        overfit.draw_figure(
            Path(args.record),
            Path(args.figure),
            arms=ORDER,
            title=f"{overfit.N_TRAIN} Alpaca examples, {N_BAD} bad",
        )


if __name__ == "__main__":
    main()
