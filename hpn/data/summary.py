"""A corpus at a glance, and its labels as JSONL: what `hpn-tune data` prints and writes.

Why: before a study spends hours on a corpus, see which labels it really yields (how much of
PersonaHub falls in `other`, which classes are tiny), the fingerprint a study will log, and
the split sizes; for a regression target its range, for label sets how many labels a text
carries; and export text + label (+ target) to check the labelling by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpn.data.corpus import Corpus
from hpn.errors import DataError
from hpn.tasks import target_name

if TYPE_CHECKING:
    from hpn.config import DataConfig


def label_source(cfg: DataConfig) -> str:
    """Where the labels come from: the synthetic corpus brings its own, whatever data.labels says."""
    return "synthetic" if cfg.source == "synthetic" else cfg.labels


def label_counts(corpus: Corpus) -> dict[str, int]:
    """Examples per label name, most frequent first (ties by name, so the order is stable);
    with label sets a text counts once for each label it carries."""
    counts = corpus.label_set_counts()
    pairs = sorted(zip(corpus.label_names, counts.tolist()), key=lambda p: (-p[1], p[0]))
    return {name: int(count) for name, count in pairs if count > 0}


def corpus_summary(corpus: Corpus, cfg: DataConfig) -> dict[str, Any]:
    """Everything a study would log about its data, split as `train` splits it."""
    split = corpus.split(cfg.val_fraction, cfg.test_fraction, cfg.seed)
    summary: dict[str, Any] = {
        "source": cfg.source,
        "labels": label_source(cfg),
        "path": cfg.path if cfg.source != "synthetic" else None,
        "size": len(corpus),
        "num_classes": corpus.num_classes,
        "label_counts": label_counts(corpus),
        "fingerprint": corpus.fingerprint(),
        "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
    }
    if corpus.targets is not None:
        y = corpus.targets
        summary["target"] = {
            "column": target_name(cfg.source, cfg.target_column),
            "min": float(y.min()), "mean": float(y.mean()), "max": float(y.max()),
        }
    if corpus.label_sets is not None:  # labels per text: what a multi-label model must match
        summary["label_cardinality"] = float(corpus.label_sets.sum(axis=1).mean())
    return summary


def format_summary(summary: dict[str, Any]) -> list[str]:
    """The summary as lines for a person: counts with percentages, largest class first."""
    source = summary["source"] + (f" ({summary['path']})" if summary.get("path") else "")
    size = summary["size"]
    split = summary["split"]
    lines = [f"source       {source}"]
    if summary["num_classes"]:  # a regression corpus has no labels: no "classes 0" line
        lines.append(f"labels       {summary['labels']}")
    lines.append(f"size         {size}")
    if summary["num_classes"]:
        lines.append(f"classes      {summary['num_classes']}")
    width = max((len(name) for name in summary["label_counts"]), default=0)
    for name, count in summary["label_counts"].items():
        lines.append(f"  {name:<{width}}  {count:>7}  {100.0 * count / max(size, 1):5.1f}%")
    if "label_cardinality" in summary:
        lines.append(f"cardinality  {summary['label_cardinality']:.3f} labels per text")
    if "target" in summary:
        t = summary["target"]
        lines.append(f"target       {t['column']}: min {t['min']:g}, mean {t['mean']:.4g}, "
                     f"max {t['max']:g}")
    lines += [
        f"fingerprint  {summary['fingerprint']}",
        f"split        train {split['train']}, val {split['val']}, test {split['test']}",
    ]
    return lines


def check_output_file(path: str | Path, key: str = "--output") -> Path:
    """Refuse, before any work, an output that cannot be written: a folder, or a missing folder."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{key}={str(p)!r} is a folder; give a file name such as labels.jsonl")
    if not p.resolve().parent.is_dir():
        raise DataError(
            f"{key}={str(p)!r}: folder {str(p.parent)!r} does not exist; create it or pick another"
        )
    return p


def write_labels_jsonl(corpus: Corpus, path: str | Path) -> int:
    """One row per text, in corpus order, UTF-8 kept readable; returns rows. A row holds
    `text`, `label` (the class name, or the list of a label set) and `target` when the corpus
    has one: the columns a file needs to be read back with the default config keys."""
    names = corpus.label_names
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i, text in enumerate(corpus.texts):
            row: dict[str, Any] = {"text": text}
            if corpus.label_sets is not None:
                main = int(corpus.labels[i])  # first, so reading the file back keeps it main
                others = [c for c in map(int, corpus.label_sets[i].nonzero()[0]) if c != main]
                row["label"] = [names[c] for c in [main, *others]]
            elif corpus.labels is not None:
                row["label"] = names[int(corpus.labels[i])]
            if corpus.targets is not None:
                row["target"] = float(corpus.targets[i])
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(corpus)
