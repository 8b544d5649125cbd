"""`hpn-tune`: a thin shell over functions the tests call directly.

Exit codes: 0 ok, 2 bad input (one line on stderr naming the key or file), 1 a failure
while running. No traceback reaches the user unless HPN_TUNE_DEBUG=1.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from hpn import metrics as M
from hpn.errors import HPNInputError

Handler = Callable[[argparse.Namespace], dict[str, Any]]
BASELINE_MARGIN_HELP = (
    "{what} only if it beats its task's trivial baselines on the validation split, and it "
    "loads and predicts in a fresh process (default %(default)s). A score must beat its "
    "baseline by more than M points: val_accuracy over val_majority_baseline_accuracy (always "
    "answering the training split's most frequent class; classification, joint), val_micro_f1 "
    "over val_most_frequent_baseline_micro_f1 (multilabel). An error is held to a fraction of "
    "its baseline: val_mae must be below val_mean_baseline_mae x (1 - M) (always predicting "
    "the training split's mean; regression, joint)")


def _metric_column(metric: str) -> str:
    """A metric as a table header: VAL_ACC / TEST_ACC as `show` always printed them, else
    the metric's name (VAL_MAE, TEST_MICRO_F1)."""
    return {M.VAL_ACCURACY: "VAL_ACC", M.TEST_ACCURACY: "TEST_ACC"}.get(metric, metric.upper())


def _print_table(rows: dict[str, Any]) -> None:
    width = max((len(k) for k in rows), default=0)
    for key, value in rows.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"  {key:<{width}}  {shown}")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from hpn.config import load_config
    from hpn.train import train

    cfg = load_config(args.config, args.set)
    result = train(cfg, progress=not args.json)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    if cfg.train.measure_latency:  # what serving it would cost, as each study trial logs
        from hpn.latency import measure_latency

        metrics.update(measure_latency(result.model))
    if args.output:
        import yaml

        out = Path(args.output)
        result.model.save(out / "model")
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (out / "results.json").write_text(json.dumps({"metrics": metrics, "history": result.history}, indent=2))
        print(f"wrote {out}/results.json, {out}/config.yaml and the model in {out}/model")
    print("metrics:")
    _print_table(metrics)
    return metrics


def cmd_data(args: argparse.Namespace) -> dict[str, Any]:
    """Load the corpus `train` would (no encoder), summarise it, optionally dump text + label."""
    from hpn.config import load_config
    from hpn.data import (
        check_output_file,
        corpus_summary,
        format_summary,
        load_corpus,
        write_labels_jsonl,
    )

    cfg = load_config(args.config, args.set)
    if args.output:
        check_output_file(args.output, "--output")  # before the corpus is read, not after
    corpus = load_corpus(cfg.data, cfg.model.task)  # the task's view: targets, label sets
    summary = corpus_summary(corpus, cfg.data)
    print("\n".join(format_summary(summary)))
    if args.output:
        rows = write_labels_jsonl(corpus, args.output)
        parts = ", ".join(k for k, has in (("text", True), ("label", corpus.labels is not None),
                                            ("target", corpus.targets is not None)) if has)
        print(f"wrote {rows} rows ({parts}) to {args.output}")
        summary["output"] = str(args.output)
    return summary


def cmd_prototypes(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from hpn.prototypes import fixed_prototypes, separation

    if args.count < 1:
        raise HPNInputError(f"--count: must be >= 1, got {args.count}")
    if args.dim < 2:
        raise HPNInputError(f"--dim: must be >= 2, got {args.dim}")
    if args.seed < 0:
        raise HPNInputError(f"--seed: must be >= 0, got {args.seed}")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise HPNInputError(f"--out: folder {str(Path(args.out).parent)!r} does not exist")
    protos = fixed_prototypes(args.count, args.dim, seed=args.seed)
    stats = separation(protos)
    if args.out:
        np.save(args.out, protos)
        print(f"wrote {args.out}")
    result = {"count": args.count, "dim": args.dim, **stats}
    _print_table(result)
    return result


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.study import StudyOptions, run_study

    opts = StudyOptions(
        space=args.space, trials=args.trials, config=args.config, overrides=args.set,
        name=args.name, tracking_uri=args.tracking_uri, experiment=args.experiment,
        gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
        max_concurrent=args.max_concurrent, sampler=args.sampler, scheduler=args.scheduler,
        objectives=args.objectives,
        address=args.address, storage_path=args.storage_path, resume=args.resume, seed=args.seed,
        optuna_storage=args.optuna_storage, verbose=args.verbose,
        repeats=args.repeats,
        register=not args.no_register, model_name=args.model_name, progress=not args.json,
        baseline_margin=args.baseline_margin,
    )
    if opts.register:
        from tuning.registry import check_margin

        check_margin(opts.baseline_margin)  # before the study, not after its last trial
    summary = run_study(opts)
    print(f"study {summary['study']}: {summary['trials_completed']} completed, "
          f"{summary['trials_pruned']} pruned, {summary['trials_errored']} errored "
          f"in {summary['wall_s']:.1f} s (sampler seed {summary['seed']})")
    if summary["best_config"] is not None:
        over = f" (means over {summary['repeats']} repeats)" if summary["repeats"] > 1 else ""
        print(f"best {summary['best_metric']} {summary['best_value']:.4f}, "
              f"{summary['best_test_metric']} {summary['best_test_value']:.4f}{over} with:")
        _print_table(summary["best_config"])
    if summary.get("objectives"):  # a multi-objective study: the best primary is one end
        print(run_front_line(summary, opts))
    if summary.get("registered_version"):
        what = "registered as" if summary.get("registered_new") else "the best trial is already"
        where = _store_flags(opts, model_name=True)
        print(f"{what} {summary['model_name']} version {summary['registered_version']}; "
              f"promote it with: hpn-tune promote --study {summary['study']}{where}")
    elif summary.get("registration_refused"):
        print(summary["registration_refused"])  # "run <id> not registered: <why>"
    if summary.get("delivered_after_outage"):
        print(f"{summary['delivered_after_outage']} trial runs were recorded late, from the "
              "study's outbox: the MLflow server did not answer when they ended")
    experiment = "" if opts.experiment == "hpn-tune" else f" --experiment {shlex.quote(opts.experiment)}"
    print(f"browse it: hpn-tune ui --tracking-uri {shlex.quote(summary['tracking_uri'])}{experiment}")
    return summary


def run_front_line(summary: dict[str, Any], opts: Any) -> str:
    """What `run` prints for a multi-objective study: how many trials are on its Pareto front,
    over which metrics, and the `show` command that marks them."""
    count = len(summary["pareto_run_ids"])
    return (f"pareto front: {count} trial{'' if count == 1 else 's'} over "
            f"{', '.join(summary['objectives'])}; list them with: "
            f"hpn-tune show {shlex.quote(summary['study'])}{_store_flags(opts)}")


def _store_flags(opts: Any, model_name: bool = False) -> str:
    """The flags a printed follow-up command needs to find what this one used: the tracking
    store (without credentials: they are in the environment) and a non-default model name."""
    flags = ""
    if opts.tracking_uri:
        from tuning.tracking import resolve_tracking_uri

        flags += f" --tracking-uri {shlex.quote(resolve_tracking_uri(opts.tracking_uri))}"
    if model_name and opts.model_name:  # given: promote would find it anyway, say it plainly
        flags += f" --model-name {shlex.quote(opts.model_name)}"
    return flags


def _client(tracking_uri: str | None) -> Any:
    """A client on an existing store: MLflow would create an empty SQLite database for a
    mistyped path, and a command that only reads must not leave one behind."""
    from mlflow.tracking import MlflowClient

    from tuning.tracking import bound_http_retries, check_server, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    bound_http_retries()
    check_server(uri)  # seconds, not MLflow's minutes of retries
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):].split("?")[0]).is_file():
        raise HPNInputError(f"--tracking-uri: no MLflow store at {uri} (the file does not exist); "
                            "give the store your studies logged to")
    return MlflowClient(uri, uri)


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.registry import promote, promote_model_name

    client = _client(args.tracking_uri)
    args.model_name = args.model_name or promote_model_name(client, args.study, args.run_id)
    result = promote(client, args.model_name, study=args.study,
                     run_id=args.run_id, metric=args.metric, force=args.force,
                     margin=args.baseline_margin)
    if result["promoted"]:
        def test(value: float | None) -> str:
            return f", {result['test_metric']} {value:.4f}" if value is not None else ""

        held = result["champion_value"]  # None: a champion of another task (--force)
        was = (f" (was version {result['champion_version']}"
               + (f" at {held:.4f}" if held is not None else "")
               + f"{test(result['champion_test_value'])})" if result["champion_version"] else "")
        if result.get("format_switch"):  # the champion's own run in another serving format
            print(f"{args.model_name}@champion -> version {result['version']}: format switch "
                  f"{result['format_switch']} of version {result['champion_version']}'s run "
                  "(same model, not compared)")
        else:
            print(f"{args.model_name}@champion -> version {result['version']} "
                  f"({result['metric']} {result['candidate_value']:.4f}"
                  f"{test(result['candidate_test_value'])}){was}")
    else:
        print(result["reason"])
    return result


def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.registry import rollback

    result = rollback(_client(args.tracking_uri), args.model_name)
    print(f"{args.model_name}@champion -> version {result['champion']} (previous: {result['previous']})")
    return result


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.serving import predict_command

    return predict_command(args.model, args.texts, args.input, args.output, args.tracking_uri)


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.export_model import export_command

    return export_command(args.model, args.format, args.int8, args.output, args.tracking_uri,
                          args.register, args.model_name, args.sample)


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.serving import serve

    serve(args.model, args.port, args.tracking_uri, args.host, args.max_body_mb)
    return {}


def cmd_dashboard(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.serving import dashboard

    dashboard(args.optuna_storage, args.tracking_uri, args.study, args.port, args.host,
              args.experiment)
    return {}


def cmd_ui(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.serving import ui

    ui(args.tracking_uri, args.port, args.host, args.experiment)
    return {}


# Study commands: read the tracking store (tuning/studies.py); these only format and print.

def _cell(value: Any, digits: int = 4) -> str:
    if value is None:  # tuning/studies.py turns NaN into None
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits else f"{value:.4g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return (f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200
            else f"{seconds / 3600:.1f} h")


def _local_time(iso: str | None) -> str:
    from datetime import datetime

    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M") if iso else "-"


def _print_rows(header: list[str], rows: list[list[str]]) -> None:
    """An aligned plain-text table: numbers right, words left (a column of numbers is
    right-aligned whole, so the decimal points line up)."""
    def numeric(text: str) -> bool:
        try:
            float(text.split()[0])
            return True
        except (ValueError, IndexError):
            return text == "-"

    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    right = [all(numeric(r[i]) for r in rows) and bool(rows) for i in range(len(header))]
    for cells in [header, *rows]:
        print("  ".join(c.rjust(w) if r else c.ljust(w)
                        for c, w, r in zip(cells, widths, right)).rstrip())


def _best_cell(row: dict[str, Any]) -> str:
    """A study's best as `studies` lists it: the number, and the metric's name when it is not
    val_accuracy (a regression study's `3.1042 val_mae`: lower is better there)."""
    metric = row.get("best_metric", M.VAL_ACCURACY)
    cell = _cell(row.get("best_value"))
    return cell if metric == M.VAL_ACCURACY or cell == "-" else f"{cell} {metric}"


def cmd_studies(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.studies import list_studies, open_store

    store = open_store(args.tracking_uri, args.experiment)
    rows = list_studies(store)
    if not rows:
        print(f"no studies in experiment {args.experiment}")
    else:
        _print_rows(
            ["STUDY", "STATE", "DONE", "PRUNED", "ERRORED", "TARGET", "BEST VAL", "STARTED", "WALL"],
            [[r["study"], r["state"], str(r["trials_completed"]), str(r["trials_pruned"]),
              str(r["trials_errored"]),
              _cell(r["trials_target"]) + (f"x{r['repeats']}" if r["repeats"] > 1 else ""),
              _best_cell(r), _local_time(r["started"]), _duration(r["wall_s"])]
             for r in rows])
    return {"experiment": args.experiment, "tracking_uri": store.tracking_uri, "studies": rows}


def cmd_show(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.studies import open_store, show_study

    if args.limit < 0:
        raise HPNInputError(f"--limit: must be >= 0 (0 lists every trial), got {args.limit}")
    s = show_study(open_store(args.tracking_uri, args.experiment), args.study, args.limit or None)
    repeats = f", {s['repeats']} repeats per config" if s["repeats"] > 1 else ""
    print(f"study {s['study']} ({s['state']}), parent run {s['run_id']}")
    _print_table({
        "sampler": f"{s['sampler']} (seed {_cell(s['seed'])})", "scheduler": s["scheduler"],
        "space": s["space_file"],
        "searched": f"{', '.join(s['searched']) or '-'} (from the {s['searched_from']})",
        "trials": f"{s['trials_completed']} completed, {s['trials_pruned']} pruned, "
                  f"{s['trials_errored']} errored of {_cell(s['trials_target'])}{repeats}",
        "started": f"{_local_time(s['started'])} (wall {_duration(s['wall_s'])})",
    })
    print()
    if s["trials"]:
        # the task's: val/test primary (and joint's MAE), a multi-objective study's other
        # objectives, runtime
        metrics = s["trial_metrics"]
        front = "objectives" in s  # a multi-objective study: its Pareto front is marked
        _print_rows(
            ["RUN", "RUN ID", "STATE", *(["PARETO"] if front else []),
             *map(_metric_column, metrics), *s["searched"]],
            [[t["run_name"], t["run_id"], t["state"],
              *(["*" if t["pareto"] else ""] if front else []),
              *(_cell(t[m], 1 if m == M.RUNTIME_S else 4) for m in metrics),
              *(_cell(t["params"][k], 0) for k in s["searched"])] for t in s["trials"]])
        if len(s["trials"]) < s["trials_total"]:
            print(f"({s['trials_total'] - len(s['trials'])} more; --limit 0 lists all)")
        if front:
            print(_front_line(s))
    else:
        print("no trials yet")
    print()
    if s["report_path"]:
        print(f"report: {s['report_path']} of run {s['run_id']}  ({s['report_uri']})")
    else:
        print("report: none yet (a study writes report/ when it finishes)")
    if s["promote_command"]:
        print(f"best {s['best_metric']} {s['best_value']:.4f} "
              f"({s['best_test_metric']} {_cell(s['best_test_value'])}); "
              f"promote it: {s['promote_command']}")
    return s


def _front_line(s: dict[str, Any]) -> str:
    """How many trials a multi-objective study's Pareto front holds and over what, so the `*`
    column reads without knowing how the study was run."""
    over = ", ".join(f"{m} ({mode})" for m, mode in zip(s["objectives"], s["objective_modes"]))
    return (f"pareto front: {s['trials_pareto']} of {s['trials_completed']} completed trials "
            f"(* in PARETO), over {over}")


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.studies import check_plot_path, compare_studies, draw_compare, open_store

    if args.output:
        check_plot_path(args.output)  # before the studies are read, not after
    rows, data = compare_studies(open_store(args.tracking_uri, args.experiment), args.studies)
    metric, test_metric = rows[0]["best_metric"], rows[0]["best_test_metric"]  # one task
    lines = [("state", "state", str), ("sampler", "sampler", str),
             ("trials completed", "trials_completed", str),
             (f"best {metric}", "best_value", _cell),
             (f"median {metric}", "median_value", _cell),
             (f"{test_metric} of best", "best_test_value", _cell),
             ("median runtime_s", "median_runtime_s", lambda v: _cell(v, 1)),
             ("wall time", "wall_s", _duration)]
    _print_rows(["", *(r["study"] for r in rows)],
                [[label, *(fmt(r[key]) for r in rows)] for label, key, fmt in lines])
    lower = ", lower is better" if data.mode == "min" else ""
    print(f"(best is chosen on {metric}{lower}; {test_metric} is shown, never used to choose)")
    result: dict[str, Any] = {"studies": rows}
    if args.output:
        draw_compare(data, args.output)
        print(f"wrote {args.output}")
        result["output"] = str(args.output)
    return result


_STUDY_EPILOGS = {
    "studies": """examples:
  hpn-tune studies
  hpn-tune studies --tracking-uri http://mlflow.internal:5000 --experiment persona
  hpn-tune studies --json | tail -n 1      # {"studies": [{"study": ..., "state": ...}, ...]}""",
    "show": """examples:
  hpn-tune show my-study
  hpn-tune show my-study --limit 5
  hpn-tune show my-study --json | tail -n 1  # header, trials, best_run_id, report_uri

a multi-objective study (--sampler nsga2) also lists each trial's objective metrics
(latency_p50_ms, model_size_mb, peak_rss_mb) and marks its Pareto front over all its
objectives with * in PARETO (--json: objectives, trials_pareto, each trial's pareto)""",
    "compare": """examples:
  hpn-tune compare tpe-study random-study
  hpn-tune compare tpe-study random-study cmaes-study --output compare.png""",
}


def _add_study_commands(sub: Any) -> None:
    """studies / show / compare: --help shows examples and each flag's default."""
    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=_STUDY_EPILOGS[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        p.add_argument("--experiment", default="hpn-tune", help="MLflow experiment (default: %(default)s)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                       "else sqlite:///mlflow.db in this folder)")
        return p

    add("studies", cmd_studies, "list the studies in the tracking store, newest first")
    p = add("show", cmd_show, "show one study: its settings, its trials best first, its report")
    p.add_argument("study", help="study name (as `hpn-tune studies` lists it)")
    p.add_argument("--limit", type=int, default=20,
                   help="trials to list, best first; 0 lists all (default: %(default)s)")
    p = add("compare", cmd_compare, "compare studies of one task side by side on its primary "
            "metric (val_accuracy, val_mae, val_micro_f1) and runtime")
    p.add_argument("studies", nargs="+", metavar="STUDY", help="studies to compare, in the order to show them")
    p.add_argument("--output", metavar="PLOT.png",
                   help="also write a box plot of the primary metric per study (default: no plot)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpn-tune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.set_defaults(handler=handler)
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        return p

    p = add("train", cmd_train, "train and evaluate one HPN config")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--output", help="directory for results.json, config.yaml and the model")

    p = add("data", cmd_data, "load the corpus and print its labels, counts, fingerprint and split")
    p.add_argument("--config", help="YAML config file (its data keys are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--output", help="write one JSON row {text, label} per text to this .jsonl file")

    p = add("prototypes", cmd_prototypes, "place fixed prototypes and print their separation")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the prototypes as a .npy file")

    p = add("run", cmd_run, "run a tuning study (Ray Tune + Optuna, logged to MLflow)")
    p.add_argument("--space", help="search space YAML (default search_spaces/default.yaml)")
    p.add_argument("--trials", type=int, help="configs to try (default 12; on --resume the "
                   "study's own)")
    p.add_argument("--config", help="YAML config file with the fixed keys")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--name", help="study name (needed for --resume): letters, digits, '.', '_' "
                   "and '-', starting with a letter or digit, at most 100 characters "
                   "(default study-<date>-<time>)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="hpn-tune", help="MLflow experiment")
    p.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial (default 0.25 with a GPU)")
    p.add_argument("--cpus-per-trial", type=float, help="default 1")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default 2)")
    p.add_argument("--sampler", help="tpe (default) | random | cmaes | nsga2 | grid")
    p.add_argument("--objectives", metavar="LIST",
                   help="with --sampler nsga2: what to trade the task's metric against, a comma "
                   "list of memory (peak RSS/VRAM; the default), latency (latency_p50_ms) and "
                   "size (model_size_mb), each minimised; e.g. --objectives latency,size")
    p.add_argument("--scheduler", help="asha | fifo (default asha; fifo for grid, --repeats and "
                   "nsga2 studies, which must not stop trials early)")
    p.add_argument("--address", help="join an existing Ray cluster (auto, ray://host:10001, host:6379)")
    p.add_argument("--storage-path", help="where Ray keeps study state (shared path/URI on a cluster)")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="Optuna RDB storage for the study's Optuna trials (default: "
                   "sqlite:///optuna.db beside the MLflow store; on a cluster, e.g. "
                   "postgresql://user@db/optuna)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (needs --name)")
    p.add_argument("--seed", type=int, help="sampler seed (default: a new one per study, "
                   "recorded on the study's run and printed, to replay it)")
    p.add_argument("--repeats", type=int,
                   help="runs of each proposed config with train.seed, +1, ...; the sampler "
                   "sees their mean and each repeat is its own MLflow run (default 1)")
    p.add_argument("--model-name", default=None,
                   help="registered model for the best trial (default: hpn-persona for "
                   "classification, hpn-persona-<task> for regression, multilabel and joint)")
    p.add_argument("--no-register", action="store_true", help="do not register the best model")
    p.add_argument("--baseline-margin", type=float, default=M.DEFAULT_BASELINE_MARGIN, metavar="M",
                   help=BASELINE_MARGIN_HELP.format(what="register the best trial's model"))
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print a line for each finished trial above the live progress line")

    p = add("promote", cmd_promote, "move the champion alias to a better version")
    p.add_argument("--study", help="promote the newest version from this study")
    p.add_argument("--run-id", help="promote this trial run's model (registered first if need "
                   "be); not a study's own run, which holds no model")
    p.add_argument("--model-name", default=None,
                   help="registered model (default: the one the study's or run's versions are "
                   "under; hpn-persona when neither is given)")
    p.add_argument("--metric", default=None,
                   help="a trial's validation metric the gate compares, in its direction (an "
                   "error such as val_mae: lower wins) (default: the candidate's task's primary "
                   "metric: val_accuracy, val_mae for regression, val_micro_f1 for multilabel, "
                   "val_joint_score for joint); "
                   "the task's test metric is printed beside it, never used to choose")
    p.add_argument("--force", action="store_true", help="promote even if it is not better than "
                   "the champion (it must still pass the registration check)")
    p.add_argument("--baseline-margin", type=float, default=M.DEFAULT_BASELINE_MARGIN, metavar="M",
                   help=BASELINE_MARGIN_HELP.format(what="promote (or register) a model"))
    p.add_argument("--tracking-uri", help="MLflow store holding the registry (an existing one)")

    p = add("rollback", cmd_rollback, "move champion back to the previous version")
    p.add_argument("--model-name", default="hpn-persona",
                   help="registered model (default hpn-persona; the other tasks' models are "
                   "hpn-persona-regression, -multilabel, -joint)")
    p.add_argument("--tracking-uri", help="MLflow store holding the registry (an existing one)")

    p = add("predict", cmd_predict, "predict for persona texts with a logged or registered model "
            "(a label, a label set or a value, by the model's task)")
    p.add_argument("--model", required=True, help="e.g. models:/hpn-persona@champion or runs:/ID/model")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--input", help="UTF-8 JSON array (of texts, or objects with `text`), JSONL, "
                   "CSV (column `text`) or text file (one text per line)")
    p.add_argument("--output", help="write predictions to a .jsonl or .csv file")
    p.add_argument("--tracking-uri")

    p = add("serve", cmd_serve, "serve a model over HTTP with MLflow's scoring server app, "
            "loaded through the same checks as predict")
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    p.add_argument("--max-body-mb", type=float, metavar="MB",
                   help="answer request bodies over this size with 413, unread (default 1 MB: "
                   "about 5,000 personas, what 2 CPUs encode within the 60 s request timeout)")
    p.add_argument("--tracking-uri")

    p = add("export", cmd_export, "export a logged or registered model (encoder, pooling, head, "
            "prototypes) as one ONNX graph, checked against its predictions, logged to its run")
    p.add_argument("--model", required=True, help="e.g. models:/hpn-persona@champion or runs:/ID/model")
    p.add_argument("--format", default="onnx", help="onnx (the one format; default %(default)s)")
    p.add_argument("--int8", action="store_true", help="dynamic int8 weights: smaller and faster, "
                   "at least 99%% of sample texts keep their label (fp32: all, scores within 1e-4)")
    p.add_argument("--output", required=True, metavar="PATH", help="where to write the .onnx file")
    p.add_argument("--register", action="store_true",
                   help="also register it as a new version of the registered model (tagged "
                   "hpn.serving_format=onnx|onnx-int8), which predict and serve then run")
    p.add_argument("--model-name", default=None, help="registered model for --register (default: "
                   "the one --model names)")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="synthetic sample texts the check predicts (default 300)")
    p.add_argument("--tracking-uri")

    p = add("dashboard", cmd_dashboard, "open optuna-dashboard on the studies' Optuna storage")
    p.add_argument("--study", help="open this study's page (and use the storage it recorded)")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="Optuna storage URL (default: sqlite:///optuna.db beside the MLflow store)")
    p.add_argument("--tracking-uri", help="MLflow store the studies were logged to "
                   "(default sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="hpn-tune", help="MLflow experiment of --study")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")

    p = add("ui", cmd_ui, "open the MLflow UI for the study's tracking store")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment", default="hpn-tune",
                   help="experiment whose runs view is printed (default hpn-tune)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    _add_study_commands(sub)
    return parser


def _sigterm_as_ctrl_c(signum: int, frame: Any) -> None:
    """SIGTERM (kill, docker stop, a batch scheduler) stops like Ctrl-C: the SIGINT handler
    in force runs, Ray Tune's graceful stop during a study's fit() (the study ends
    interrupted, resumable, with its resume command) or Python's KeyboardInterrupt. Left to
    Ray's own SIGTERM handler, the driver died in a native abort (SIGABRT). Called directly,
    not re-sent, so a SIGINT ignored (a background job's) still stops the command."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    previous = None
    # A study only: its driver must end interrupted and resumable. The servers (serve, ui,
    # dashboard) keep their own SIGTERM handling (uvicorn's graceful stop, or the default).
    if args.command == "run" and threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)  # tuning.ray_tune.init_ray keeps it
    try:
        result = args.handler(args)
    except HPNInputError as exc:
        print(f"hpn-tune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hpn-tune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure while running: one line, traceback on request
        code = getattr(exc, "exit_code", None)  # a decision, not a crash: refused, interrupted
        if code is not None:
            print(f"hpn-tune {args.command}: {getattr(exc, 'label', 'stopped')}: {exc}", file=sys.stderr)
            return code
        if os.environ.get("HPN_TUNE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"hpn-tune {args.command}: failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:  # main() called in-process (tests) leaves SIGTERM as it was
            signal.signal(signal.SIGTERM, previous)
    if args.json and result is not None:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
