"""`hpn-tune`: a thin shell over functions the tests call directly.

Exit codes: 0 ok, 2 bad input (one line on stderr naming the key or file), 1 a failure
while running. No traceback reaches the user unless HPN_TUNE_DEBUG=1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from hpn.errors import HPNInputError

Handler = Callable[[argparse.Namespace], dict[str, Any]]


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
    corpus = load_corpus(cfg.data)
    summary = corpus_summary(corpus, cfg.data)
    print("\n".join(format_summary(summary)))
    if args.output:
        rows = write_labels_jsonl(corpus, args.output)
        print(f"wrote {rows} rows (text, label) to {args.output}")
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
        address=args.address, storage_path=args.storage_path, resume=args.resume, seed=args.seed,
        repeats=args.repeats,
        register=not args.no_register, model_name=args.model_name, progress=not args.json,
    )
    summary = run_study(opts)
    print(f"study {summary['study']}: {summary['trials_completed']} completed, "
          f"{summary['trials_pruned']} pruned, {summary['trials_errored']} errored "
          f"in {summary['wall_s']:.1f} s (sampler seed {summary['seed']})")
    if summary["best_config"] is not None:
        over = f" (means over {summary['repeats']} repeats)" if summary["repeats"] > 1 else ""
        print(f"best val_accuracy {summary['best_val_accuracy']:.4f}, "
              f"test_accuracy {summary['best_test_accuracy']:.4f}{over} with:")
        _print_table(summary["best_config"])
    if summary.get("registered_version"):
        print(f"registered as {opts.model_name} version {summary['registered_version']}; "
              f"promote it with: hpn-tune promote --study {summary['study']}")
    print(f"browse it: hpn-tune ui --tracking-uri {summary['tracking_uri']}")
    return summary


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    from tuning.tracking import resolve_tracking_uri

    return MlflowClient(resolve_tracking_uri(tracking_uri), resolve_tracking_uri(tracking_uri))


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.registry import promote

    result = promote(_client(args.tracking_uri), args.model_name, study=args.study,
                     run_id=args.run_id, metric=args.metric, force=args.force)
    if result["promoted"]:
        def test(value: float | None) -> str:
            return f", test_accuracy {value:.4f}" if value is not None else ""

        was = (f" (was version {result['champion_version']} at {result['champion_value']:.4f}"
               f"{test(result['champion_test_accuracy'])})" if result["champion_version"] else "")
        print(f"{args.model_name}@champion -> version {result['version']} "
              f"({args.metric} {result['candidate_value']:.4f}"
              f"{test(result['candidate_test_accuracy'])}){was}")
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


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.serving import serve

    serve(args.model, args.port, args.tracking_uri, args.host)
    return {}


def cmd_ui(args: argparse.Namespace) -> dict[str, Any]:
    from tuning.serving import ui

    ui(args.tracking_uri, args.port, args.host)
    return {}


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
    p.add_argument("--name", help="study name (needed for --resume)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="hpn-tune", help="MLflow experiment")
    p.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial (default 0.25 with a GPU)")
    p.add_argument("--cpus-per-trial", type=float, help="default 1")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default 2)")
    p.add_argument("--sampler", help="tpe (default) | random | cmaes | nsga2 | grid")
    p.add_argument("--scheduler", help="asha | fifo (default asha; fifo for grid, --repeats and "
                   "nsga2 studies, which must not stop trials early)")
    p.add_argument("--address", help="join an existing Ray cluster (auto, ray://host:10001, host:6379)")
    p.add_argument("--storage-path", help="where Ray keeps study state (shared path/URI on a cluster)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study (needs --name)")
    p.add_argument("--seed", type=int, help="sampler seed (default: a new one per study, "
                   "recorded on the study's run and printed, to replay it)")
    p.add_argument("--repeats", type=int,
                   help="runs of each proposed config with train.seed, +1, ...; the sampler "
                   "sees their mean and each repeat is its own MLflow run (default 1)")
    p.add_argument("--model-name", default="hpn-persona", help="registered model for the best trial")
    p.add_argument("--no-register", action="store_true", help="do not register the best model")

    p = add("promote", cmd_promote, "move the champion alias to a better version")
    p.add_argument("--study")
    p.add_argument("--run-id")
    p.add_argument("--model-name", default="hpn-persona")
    p.add_argument("--metric", default="val_accuracy",
                   help="validation metric the gate compares (default val_accuracy); test "
                   "accuracy is printed beside it, never used to choose")
    p.add_argument("--force", action="store_true", help="promote even if it is not better")
    p.add_argument("--tracking-uri")

    p = add("rollback", cmd_rollback, "move champion back to the previous version")
    p.add_argument("--model-name", default="hpn-persona")
    p.add_argument("--tracking-uri")

    p = add("predict", cmd_predict, "classify persona texts with a logged or registered model")
    p.add_argument("--model", required=True, help="e.g. models:/hpn-persona@champion or runs:/ID/model")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument("--input", help="JSONL, CSV or text file (one text per line)")
    p.add_argument("--output", help="write predictions to a .jsonl or .csv file")
    p.add_argument("--tracking-uri")

    p = add("serve", cmd_serve, "serve a model over HTTP with MLflow's scoring server")
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    p.add_argument("--tracking-uri")

    p = add("ui", cmd_ui, "open the MLflow UI for the study's tracking store")
    p.add_argument("--tracking-uri")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    if args.json and result is not None:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
