"""Using a model: `predict` on texts or files, `serve` over HTTP, and the MLflow `ui`.

Every model goes through `load_model`: downloaded, checked (`tuning.pyfunc.verify_model_dir`:
no pickle, our own code file) and built from the installed hpn-tune, so nothing the model
directory holds is unpickled or executed. `serve` runs MLflow's scoring server app (the
endpoints and request formats of `mlflow models serve`) in this process on that model, behind
a request-body cap and a check that every text is a string with a non-space character, plus
POST /predict: every body /invocations takes, the same answer, the common JSON shapes answered
by the model without MLflow's DataFrame round trip (the low-latency route). The UI is MLflow's
own.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from hpn.errors import HPNInputError
from tuning.tracking import bound_http_retries, no_download_bar, resolve_tracking_uri

# tuning.pyfunc (TEXT_COLUMN, the loader) is imported where used: it imports torch, 3 s that
# `hpn-tune ui` and `dashboard`, which import this module too, should not pay.

#: `serve --max-body-mb` default. 1 MB is some 5,000 personas, about what 2 CPUs encode
#: (~130 texts/s, bench/RESULTS.md) inside the scoring server's 60 s request timeout: a bigger
#: body could only time out (504) while its thread still burns CPU. Measured on the tiny test
#: model, one 1 MB request took the server from 0.6 to 1.1 GB peak RSS (4 MB: 1.45 GB).
DEFAULT_MAX_BODY_MB = 1.0


def read_texts(path: str | Path) -> list[str]:
    """Texts from a JSON array (of strings, or of objects with `text`), JSONL or CSV (field
    `text`, else the first one), or plain lines (blank ones skipped). Refused in one line
    naming the file: not UTF-8, binary, empty, unparsable, or a row without a text."""
    from tuning.pyfunc import TEXT_COLUMN

    p = Path(path)
    if not p.is_file():
        raise HPNInputError(f"--input: file {str(p)!r} not found")

    def bad(why: str, fix: str) -> HPNInputError:
        return HPNInputError(f"--input: file {str(p)!r} {why}; {fix}")

    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})",
                  "save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from None
    if "\x00" in raw:
        raise bad("is binary", "give a .json, .jsonl, .csv or plain text file")
    if not raw.strip():
        raise bad("is empty", "give one text per line, row or array element")
    if p.suffix not in (".json", ".jsonl", ".csv"):
        return [line.strip() for line in raw.splitlines() if line.strip()]
    values = _csv_values(raw, bad) if p.suffix == ".csv" else _json_values(raw, bad)
    if not values:
        raise bad("has no rows", "give at least one text")
    for row, value in enumerate(values, 1):
        if not isinstance(value, str) or not value.strip():
            raise bad(f"row {row} (counting from 1) is {value!r:.40}, not a text",
                      f"give every row a non-empty `{TEXT_COLUMN}`")
    return values


def _json_values(raw: str, bad: Any) -> list[Any]:
    """A JSON array or object, else JSON lines (one value per line): strings are texts,
    objects give their `text` field (or, when none has one, their first field)."""
    from tuning.pyfunc import TEXT_COLUMN

    try:
        data = json.loads(raw)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(raw.splitlines(), 1):
            try:
                records.extend([json.loads(line)] if line.strip() else [])
            except json.JSONDecodeError as exc:
                raise bad(f"is not JSON (line {n}: {exc.msg})",
                          "give a JSON array of texts or one JSON object per line") from None
    keyed = any(isinstance(r, dict) and TEXT_COLUMN in r for r in records)
    return [(r.get(TEXT_COLUMN) if keyed else next(iter(r.values()), None))
            if isinstance(r, dict) else r for r in records]


def _csv_values(raw: str, bad: Any) -> list[Any]:
    from tuning.pyfunc import TEXT_COLUMN

    try:  # every cell a string: "NA" or "42" is a text in a CSV, an empty cell is none
        frame = pd.read_csv(io.StringIO(raw), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise bad(f"is not CSV ({first})", f"give a header row with `{TEXT_COLUMN}`") from None
    column = TEXT_COLUMN if TEXT_COLUMN in frame.columns else frame.columns[0]
    return frame[column].tolist()


def load_model(model_uri: str, tracking_uri: str | None = None) -> Any:
    """The model at `model_uri` as an `mlflow.pyfunc.PyFuncModel` (`.predict(DataFrame with
    `text`)` -> label and scores), loaded only once its downloaded directory passed
    `verify_model_dir`; every `predict`, `serve` and registration check loads through here.
    The directory is a private temporary copy, so what was checked is what is loaded."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tuning.pyfunc import load_verified

    uri = resolve_tracking_uri(tracking_uri)
    bound_http_retries()  # a server that is down fails this in about a minute, not four
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory(prefix="hpn-model-") as tmp:
        try:
            with no_download_bar():
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, dst_path=tmp, tracking_uri=uri, registry_uri=uri)
        except (MlflowException, OSError) as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise HPNInputError(
                f"--model: cannot load {model_uri!r} from {uri} ({first})") from None
        return load_verified(local, model_uri)


def predict_command(model_uri: str, texts: list[str], input_path: str | None,
                    output_path: str | None, tracking_uri: str | None) -> dict[str, Any]:
    """Predict `texts` (and those of `input_path`), print the first 20 and return what --json
    prints: {"task", "count", "predictions": one object per text with the task's columns
    (classification label, score; regression prediction; multilabel labels, a list, and
    score_<label>...; joint label, score, prediction)}, plus "target" (what `prediction` is)
    when the model names it. `output_path` (.csv, .jsonl) gets every column, text first."""
    from tuning.pyfunc import TEXT_COLUMN, task_of_columns

    for n, text in enumerate(texts, 1):
        if not text.strip():
            raise HPNInputError(f"predict: text argument {n} is blank; give non-empty texts")
    if input_path:
        texts = list(texts) + read_texts(input_path)
    if not texts:
        raise HPNInputError("predict: give texts as arguments or --input FILE")
    if output_path and Path(output_path).suffix not in (".csv", ".jsonl", ".json"):
        raise HPNInputError(f"--output: {output_path!r} must end in .jsonl or .csv")
    model = load_model(model_uri, tracking_uri)
    if output_path and Path(output_path).suffix == ".csv":
        _check_csv_label_sets(model)
    frame = model.predict(pd.DataFrame({TEXT_COLUMN: texts}))
    task = task_of_columns(frame.columns)
    target = _model_target(model)
    frame.insert(0, TEXT_COLUMN, texts)
    if output_path:
        out = Path(output_path)
        write_predictions(frame, out)
        print(f"wrote {len(frame)} predictions to {out}")
    for line in prediction_lines(frame.head(20), task, target):
        print(line)
    result: dict[str, Any] = {"task": task, "count": len(frame)}
    if target is not None:
        result["target"] = target
    result["predictions"] = frame[summary_columns(frame.columns, task)].to_dict("records")
    return result


def summary_columns(columns: Any, task: str) -> list[str]:
    """The columns `predict --json` gives per text: a class's label and score, a predicted
    value, a label set and every label's score (the set is a decision on those scores)."""
    from hpn.tasks import task_spec
    from tuning.pyfunc import (
        LABEL_COLUMN,
        LABELS_COLUMN,
        PREDICTION_COLUMN,
        SCORE_COLUMN,
        SCORE_PREFIX,
    )

    spec = task_spec(task)
    keep = [LABEL_COLUMN, SCORE_COLUMN] if spec.uses_labels else []
    if spec.multilabel:
        keep += [LABELS_COLUMN, *(c for c in columns if str(c).startswith(SCORE_PREFIX))]
    if spec.uses_target:
        keep.append(PREDICTION_COLUMN)
    return keep


def prediction_lines(frame: pd.DataFrame, task: str, target: str | None = None) -> list[str]:
    """One human line per row of a predictions frame (with `text`): the class and its score,
    the predicted value (named after the target when known), or the label set with scores."""
    from hpn.tasks import task_spec
    from tuning.pyfunc import LABELS_COLUMN, PREDICTION_COLUMN, SCORE_PREFIX, TEXT_COLUMN

    spec = task_spec(task)
    lines = []
    for row in frame.to_dict("records"):
        parts = []
        if spec.uses_labels:
            parts.append(f"{row['label']:<16} {row['score']:.3f}")
        if spec.multilabel:
            chosen = ", ".join(f"{name} {row[SCORE_PREFIX + name]:.3f}"
                               for name in row[LABELS_COLUMN])
            parts.append(f"{chosen or '(no label)':<40}")
        if spec.uses_target:
            parts.append(f"{target or 'prediction'} {row[PREDICTION_COLUMN]:.2f}")
        lines.append(f"  {'  '.join(parts)}  {row[TEXT_COLUMN][:70]}")
    return lines


def write_predictions(frame: pd.DataFrame, out: Path) -> None:
    """A predictions frame as CSV or JSON lines. A label set is a JSON array in JSON lines and
    one cell joined on LABEL_SET_SEPARATOR in CSV ("" for an empty set): the default
    `data.label_separator`, so the file reads back as multi-label data."""
    from tuning.pyfunc import LABEL_SET_SEPARATOR, LABELS_COLUMN

    if out.suffix == ".csv":
        if LABELS_COLUMN in frame.columns:
            joined = frame[LABELS_COLUMN].map(LABEL_SET_SEPARATOR.join)
            frame = frame.assign(**{LABELS_COLUMN: joined})
        frame.to_csv(out, index=False)
    else:
        frame.to_json(out, orient="records", lines=True)


def _model_target(model: Any) -> str | None:
    from tuning.pyfunc import TARGET_METADATA, declared_metadata

    name = declared_metadata(model).get(TARGET_METADATA)
    return str(name) if name else None


def _check_csv_label_sets(model: Any) -> None:
    """A label set joined on the separator must split back into the same labels."""
    from tuning.pyfunc import LABEL_SET_SEPARATOR, LABELS_COLUMN, SCORE_PREFIX, declared_outputs

    names = declared_outputs(model)
    if LABELS_COLUMN not in names:
        return
    clash = [n[len(SCORE_PREFIX):] for n in names
             if n.startswith(SCORE_PREFIX) and LABEL_SET_SEPARATOR in n[len(SCORE_PREFIX):]]
    if clash:
        raise HPNInputError(
            f"--output: the model's label {clash[0]!r} contains {LABEL_SET_SEPARATOR!r}, which "
            "separates the labels of a set in a CSV cell; write .jsonl (a JSON array per set)")


# -- serve -------------------------------------------------------------------------------------

_MISSING = object()  # a request row without a `text` field


def request_texts(payload: dict[str, Any]) -> list[Any]:
    """The raw `text` values of a JSON request in MLflow's formats (dataframe_split,
    dataframe_records, inputs, instances), read before MLflow's parsing, which casts to the
    signature's string type and so answers 42 or null as if they were texts. [] when the
    layout has no `text` to find: MLflow's own checks then answer."""
    from tuning.pyfunc import TEXT_COLUMN

    split = payload.get("dataframe_split")
    if isinstance(split, dict):
        columns, data = split.get("columns"), split.get("data")
        if not (isinstance(columns, list) and TEXT_COLUMN in columns and isinstance(data, list)):
            return []
        i = columns.index(TEXT_COLUMN)
        return [row[i] if isinstance(row, list) and i < len(row) else _MISSING for row in data]
    for key in ("dataframe_records", "inputs", "instances"):
        if key in payload:
            rows = payload[key]
            if isinstance(rows, dict):  # {"text": [...]} or {"text": "one"}
                rows = rows.get(TEXT_COLUMN, [])
            rows = rows if isinstance(rows, list) else [rows]
            return [r.get(TEXT_COLUMN, _MISSING) if isinstance(r, dict) else r for r in rows]
    return []


def _parse_request(body: bytes) -> tuple[Any, str | None]:
    """(the JSON payload, why the body is refused with 400 or None to hand it on)."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # not echoed back, unlike MLflow
        return None, f"the body is not UTF-8 JSON ({str(exc)[:120]})"
    if not isinstance(payload, dict):
        return payload, None
    for row, value in enumerate(request_texts(payload)):
        if not isinstance(value, str) or not value.strip():
            shown = "missing" if value is _MISSING else json.dumps(value)[:40]
            return payload, (f"`text` row {row} (counting from 0) is {shown}: each text must be "
                             "a string with a non-space character")
    return payload, None


def _media_type(scope: dict) -> tuple[bytes, list[bytes]]:
    """A request's Content-Type, lower-cased: (the type, its parameters)."""
    raw = dict(scope["headers"]).get(b"content-type", b"").lower()
    kind, *params = (part.strip() for part in raw.split(b";"))
    return kind, [p.replace(b" ", b"") for p in params if p]


class RequestGuard:
    """ASGI middleware in front of MLflow's scoring app: a body over `max_bytes` is answered
    413 (a declared Content-Length at once, unread; a chunked one as soon as it passes the
    cap), and a JSON /invocations or /predict with a text that is not a string with a
    non-space character 400, naming the row. The body is read here once and replayed to the app (which reads it whole
    anyway); a JSON body it parsed is left in the scope (PAYLOAD_KEY) for PredictRoute."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        too_big = (f"the request body is over the server's limit of {self.max_bytes} bytes "
                   "(hpn-tune serve --max-body-mb); send fewer texts per request")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big, close=True)
        body = await _read_body(receive, stop_after=self.max_bytes)
        if body is None:
            return None
        if len(body) > self.max_bytes:
            return await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big, close=True)
        is_json = (scope["method"] == "POST" and scope["path"] in ("/invocations", PREDICT_PATH)
                   and _media_type(scope)[0] == b"application/json")
        if is_json:
            payload, problem = _parse_request(body)
            if problem:
                return await _answer(send, 400, "INVALID_PARAMETER_VALUE", problem)
            scope = {**scope, PAYLOAD_KEY: payload}
        replay = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_again() -> dict:
            return replay.pop() if replay else await receive()

        return await self.app(scope, receive_again, send)


async def _read_body(receive: Any, stop_after: int | None = None) -> bytes | None:
    """An ASGI request's body, None when the client went away first; with `stop_after`, read
    no further once the body passed that many bytes (the caller refuses it)."""
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if stop_after is not None and len(body) > stop_after:
            break
    return bytes(body)


async def _answer(send: Any, status: int, code: str, message: str, close: bool = False) -> None:
    """An MLflow-shaped JSON error; `close` ends the connection (the rest of a refused body is
    never read, so the connection cannot carry another request)."""
    content = json.dumps({"error_code": code, "message": message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(content)).encode())]
    headers += [(b"connection", b"close")] if close else []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


PREDICT_PATH = "/predict"
PAYLOAD_KEY = "hpn.payload"  # the scope key RequestGuard leaves a parsed JSON body under
#: MLflow's JSON request layouts (`mlflow models serve`); /predict takes the same ones.
JSON_LAYOUTS = ("dataframe_split", "dataframe_records", "inputs", "instances")


class PredictRoute:
    """ASGI app: POST /predict, the low-latency route to /invocations' answer; every other
    request goes on to MLflow's scoring app unchanged.

    /predict takes every body /invocations takes and gives the same answer (status and JSON).
    The common JSON shapes (`fast_texts`: texts in one of MLflow's layouts) are answered by
    the model itself: `tuning.pyfunc.prediction_records` builds the rows from the same
    `prediction_columns` as the pyfunc's frame, skipping what a one-text request spends in
    MLflow's app outside the model (JSON to DataFrame, schema enforcement, the frame's
    `to_dict`, FastAPI's routing; 5-8 ms of 16-20 on 2 cores, bench/serving.py). Anything
    else (CSV, an index, an empty or unusual layout, another method) is handed to MLflow's
    /invocations, so its edge cases get MLflow's own answer. The texts are checked by
    RequestGuard in front, as for /invocations; params are ignored, as MLflow ignores them
    for a model whose signature has none; a request running past MLflow's request timeout
    gets its 504. One difference: a model that fails gets 500 and one line, not MLflow's 400
    with a stack trace."""

    def __init__(self, app: Any, model: Any) -> None:
        from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

        self.app, self.model = app, model
        self.timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH:
            return await self.app(scope, receive, send)
        kind, params = _media_type(scope)
        texts = None
        if (scope["method"] == "POST" and kind == b"application/json"
                and params in ([], [b"charset=utf-8"])):
            texts = fast_texts(scope.get(PAYLOAD_KEY))
        if texts is None:  # MLflow's own answer, status and all
            return await self.app({**scope, "path": "/invocations", "raw_path": b"/invocations"},
                                  receive, send)
        from tuning.pyfunc import prediction_records

        try:
            records = await asyncio.wait_for(
                asyncio.to_thread(prediction_records, self.model, texts), self.timeout)
        except TimeoutError:  # what MLflow's timeout middleware answers
            return await _send(send, 504, b"Request processing time exceeded limit")
        except Exception as exc:  # noqa: BLE001 - one line to the client and the log
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            print(f"hpn-tune serve: /predict failed: {type(exc).__name__}: {first}",
                  file=sys.stderr, flush=True)
            return await _answer(send, 500, "INTERNAL_ERROR", f"{type(exc).__name__}: {first}")
        await _send(send, 200, json.dumps({"predictions": records}).encode())


def fast_texts(payload: Any) -> list[str] | None:
    """The texts of a JSON body in a shape MLflow's /invocations answers with one prediction
    row per text and nothing else, or None for any other body (handed to MLflow). The shapes:
    `dataframe_split` {columns, data} with a `text` column and rows as long as the columns,
    `dataframe_records` [{text, ...}], `inputs` / `instances` as [text, ...], [{text, ...}]
    or {"text": [text, ...]}; at least one text; `params` beside it, nothing else."""
    from tuning.pyfunc import TEXT_COLUMN

    if not isinstance(payload, dict) or not set(payload) <= {*JSON_LAYOUTS, "params"}:
        return None
    layouts = [k for k in JSON_LAYOUTS if k in payload]
    if len(layouts) != 1:
        return None
    layout, rows = layouts[0], payload[layouts[0]]
    if layout == "dataframe_split":
        if not (isinstance(rows, dict) and set(rows) == {"columns", "data"}):
            return None
        columns, data = rows["columns"], rows["data"]
        if (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)
                or len(set(columns)) != len(columns) or TEXT_COLUMN not in columns
                or not isinstance(data, list)
                or not all(isinstance(r, list) and len(r) == len(columns) for r in data)):
            return None
        texts = [r[columns.index(TEXT_COLUMN)] for r in data]
    elif layout in ("inputs", "instances") and isinstance(rows, dict):
        texts = rows.get(TEXT_COLUMN) if set(rows) == {TEXT_COLUMN} else None
    elif isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        texts = [r.get(TEXT_COLUMN) for r in rows]
    elif layout in ("inputs", "instances"):
        texts = rows
    else:
        return None
    if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
        return None
    return texts


async def _send(send: Any, status: int, content: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})


def scoring_app(model: Any, max_bytes: int) -> Any:
    """MLflow's scoring server app (/invocations, /ping, /health, /version) for a loaded
    PyFuncModel, with /predict (PredictRoute) beside it, behind RequestGuard."""
    from mlflow.pyfunc import scoring_server

    from tuning.pyfunc import INPUT_EXAMPLE, prediction_records, served_model

    raw = served_model(model)
    # The first request would load the frozen encoder (seconds); load it now, once.
    prediction_records(raw, INPUT_EXAMPLE[:1])
    return RequestGuard(PredictRoute(scoring_server.init(model), raw), max_bytes)


def _listen_socket(host: str, port: int) -> socket.socket:
    """Bound before the model loads: a port in use is one line, not a traceback after a load.

    Made with proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on the
    connections of a socket that says it is TCP (`asyncio.base_events._set_nodelay`). Without
    it Nagle's algorithm held each answer's body until the client's delayed ACK of its
    headers, 40 ms added to every request (a one-text answer took ~50 ms, ~10 with it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise HPNInputError(f"--port: cannot listen on {host}:{port} ({exc.strerror}); "
                            "choose another --port or --host") from None
    return sock


def serve(model_uri: str, port: int, tracking_uri: str | None, host: str = "127.0.0.1",
          max_body_mb: float | None = None) -> None:
    """Serve the model in this process (uvicorn, one worker) once it loaded: the URL line is
    printed only then, so a missing model or alias is one line and exit 2."""
    import uvicorn

    max_body_mb = DEFAULT_MAX_BODY_MB if max_body_mb is None else max_body_mb
    if not max_body_mb > 0:
        raise HPNInputError(f"--max-body-mb: {max_body_mb} must be > 0")
    sock = _listen_socket(host, port)
    try:
        app = scoring_app(load_model(model_uri, tracking_uri), int(max_body_mb * 1_000_000))
        print(f"serving {model_uri} at http://{host}:{port}/invocations (MLflow's scoring "
              f"protocol) and /predict (the same bodies and answers, lower latency); request bodies "
              f"up to {max_body_mb:g} MB", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()


def ui(tracking_uri: str | None, port: int, host: str = "127.0.0.1",
       experiment: str = "hpn-tune") -> None:
    """`mlflow ui` on the store, printing the page of the experiment's runs (in the UI's model
    training mode; MLflow 3 opens on GenAI pages otherwise), or the front page before the
    first study made the experiment. A tracking server is its own UI: its page is printed."""
    from tuning.tracking import check_server, experiment_id_if_any, runs_view_url

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        bound_http_retries()
        check_server(uri)
        print(f"MLflow UI: the tracking server serves it at "
              f"{runs_view_url(uri.rstrip('/'), experiment_id_if_any(uri, experiment))}", flush=True)
        return
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # where a browser here finds it
    url = runs_view_url(f"http://{shown}:{port}", experiment_id_if_any(uri, experiment))
    print(f"MLflow UI for {uri} at {url}", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--registry-store-uri", uri, "--host", host, "--port", str(port),
           # One local user: one worker answers in about a third of the time on 2 cores.
           "--workers", "1", "--uvicorn-opts", "--log-level warning --no-access-log"]
    # Nor does a local browse need MLflow's GenAI job runner (seven more processes), or
    # Starlette's deprecation warnings about MLflow's own server code.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PYTHONWARNINGS": "ignore:starlette.middleware.wsgi is deprecated", **os.environ}
    os.execvpe(sys.executable, cmd, env)


def dashboard(optuna_storage: str | None, tracking_uri: str | None, study: str | None,
              port: int, host: str = "127.0.0.1", experiment: str = "hpn-tune") -> None:
    """optuna-dashboard on the studies' Optuna storage, in this process (a storage URL with
    a password is never handed to another process's command line). Which storage: --optuna-storage, else the
    one --study recorded, else the default beside the MLflow store."""
    from optuna_dashboard import run_server

    from tuning import optuna_store

    uri = resolve_tracking_uri(tracking_uri)
    url = optuna_store.resolve_storage(optuna_storage, uri) if optuna_storage else None
    if url is None and study:
        url = _study_storage(uri, experiment, study)
    url = url or optuna_store.default_storage(uri)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise HPNInputError(f"--optuna-storage: no Optuna storage at {url}; run a study first "
                            "(hpn-tune run) or pass the storage it used")
    storage = optuna_store.open_storage(url)
    names = sorted(s.study_name for s in storage.get_all_studies())
    if study and study not in names:
        raise HPNInputError(f"--study: no study {study!r} in {optuna_store.redact(url)}; it holds: "
                            f"{', '.join(names) or 'none'}")
    page = f"http://{host}:{port}/dashboard"
    if study:
        page += f"/studies/{storage.get_study_id_from_name(study)}"
    print(f"optuna-dashboard on {optuna_store.redact(url)} ({len(names)} studies: "
          f"{', '.join(names) or 'none yet'}) at {page}", flush=True)
    run_server(storage, host=host, port=port)


def _study_storage(tracking_uri: str, experiment: str, study: str) -> str | None:
    """The Optuna storage a study recorded: None when it recorded none (or there is no store
    yet); refused in one line when its URL needs a password the tag does not hold."""
    from mlflow.tracking import MlflowClient

    from tuning.tracking import OPTUNA_STORAGE_TAG, find_study_run

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return None  # no MLflow store there yet: do not create one just to look
    client = MlflowClient(tracking_uri, tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    run_id = find_study_run(client, exp.experiment_id, study) if exp else None
    stored = client.get_run(run_id).data.tags.get(OPTUNA_STORAGE_TAG) if run_id else None
    if stored and "***" in stored:
        raise HPNInputError(f"--optuna-storage: study {study!r}'s storage {stored} needs its "
                            "password; pass the full URL with --optuna-storage")
    return stored
