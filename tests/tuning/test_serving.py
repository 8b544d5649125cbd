"""`predict --input` files and `serve`: one-line errors for bad input, and a scoring server
that answers MLflow's request formats, refuses what is not a text (400) and bodies over its
cap (413, unread), and says in one line when the model is not there.

The server runs for real on a free port: in a thread for the request contract (uvicorn on our
app), as `hpn-tune serve` in a subprocess for the command's own behaviour.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import test_model_safety as safety
from conftest import free_port, served_in_thread, stop_process_group

from hpn.errors import HPNInputError
from tuning.cli import main
from tuning.serving import load_model, read_texts, scoring_app

ROOT = Path(__file__).resolve().parents[2]
TEXTS = safety.TEXTS
saved = safety.saved  # the tiny model and its pyfunc directory (a module-scoped fixture)
tracking_uri = safety.tracking_uri  # a store of the test's own, MLflow's globals restored
MAX_BYTES = 20_000  # the in-thread server's cap: small, so tests need not send megabytes


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -- predict --input ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "content", "reason"), [
    ("empty.csv", b"", "is empty"),
    ("blank.csv", b"\n  \n", "is empty"),
    ("header-only.csv", b"text\n", "has no rows"),
    ("latin1.txt", "Une infirmi\u00e8re \u00e0 Lyon\n".encode("latin-1"), "is not UTF-8 text"),
    ("latin1.csv", "text\nUne infirmi\u00e8re\n".encode("latin-1"), "is not UTF-8 text"),
    ("binary.jsonl", bytes(range(256)) * 4, "is not UTF-8 text"),
    ("nul.txt", b"a nurse\x00\x01\x02\n", "is binary"),
    ("broken.json", b'["a nurse", \n', "is not JSON"),
    ("numbers.json", b'["a nurse", 42]', "row 2 .* is 42, not a text"),
    ("no-text.json", b'[{"text": "a nurse"}, {"id": 2}]', "row 2 .* is None, not a text"),
    ("blank-cell.csv", b"id,text\n1,a nurse\n2,\n", "row 2 .* is '', not a text"),
])
def test_an_unusable_input_file_is_one_line_naming_the_file_and_the_fix(
        tmp_path, capsys, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)

    with pytest.raises(HPNInputError, match=reason):
        read_texts(path)
    code = main(["predict", "--model", "models:/never-loaded@champion", "--input", str(path)])

    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("hpn-tune predict: error: --input:") and str(path) in err and "; " in err


@pytest.mark.parametrize(("name", "content"), [
    ("strings.json", json.dumps(TEXTS)),
    ("objects.json", json.dumps([{"id": i, "text": t} for i, t in enumerate(TEXTS)])),
    ("one-object-per-line.json", "".join(json.dumps({"text": t}) + "\n" for t in TEXTS)),
    ("lines.jsonl", "".join(json.dumps({"id": 1, "text": t}) + "\n" for t in TEXTS)),
    ("texts.csv", pd.DataFrame({"id": [1, 2], "text": TEXTS}).to_csv(index=False)),
    ("texts.txt", "\n".join(TEXTS) + "\n\n"),
])
def test_every_text_of_an_input_file_is_read(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert read_texts(path) == TEXTS


def test_predict_classifies_every_text_of_a_json_array(saved, tmp_path, tracking_uri, capsys):
    model, model_dir = saved
    path = tmp_path / "in.json"
    path.write_text(json.dumps([{"text": t} for t in TEXTS]))

    code = main(["predict", "--model", str(model_dir), "--tracking-uri", tracking_uri,
                 "--input", str(path), "--json"])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Downloading artifacts" not in err  # MLflow's download bar: noise next to our lines
    result = json.loads(out.strip().splitlines()[-1])
    assert result["count"] == len(TEXTS)
    assert [p["label"] for p in result["predictions"]] == model.predict(TEXTS)[0]


def test_a_blank_text_argument_is_refused_before_any_model_loads(capsys):
    code = main(["predict", "--model", "models:/never-loaded@champion", "a nurse", "  "])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "hpn-tune predict: error: predict: text argument 2 is blank; give non-empty texts"


def test_in_process_predict_refuses_a_value_that_is_not_a_text_naming_its_row(saved, tracking_uri):
    from mlflow.exceptions import MlflowException

    model = load_model(str(saved[1]), tracking_uri)
    for bad in (None, "", "   "):
        with pytest.raises(MlflowException, match="`text` row 1 .* each text must be a string with a non-space"):
            model.predict(pd.DataFrame({"text": [TEXTS[0], bad]}))


# -- the scoring server's request contract ---------------------------------------------------

@pytest.fixture(scope="module")
def server(saved, tmp_path_factory):
    """Our scoring app on the tiny model, served by uvicorn in a thread on a free port."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('serve') / 'mlflow.db'}"
    with served_in_thread(scoring_app(load_model(str(saved[1]), uri), MAX_BYTES)) as port:
        yield port


def _post(port: int, body: str | bytes, content_type: str = "application/json",
          path: str = "/invocations", method: str = "POST") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body, {"Content-Type": content_type})
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def _bodies(values: list) -> dict[str, dict]:
    """The same `text` values in each of MLflow's JSON request formats."""
    return {
        "dataframe_split": {"dataframe_split": {"columns": ["text"], "data": [[v] for v in values]}},
        "dataframe_records": {"dataframe_records": [{"text": v} for v in values]},
        "inputs": {"inputs": {"text": values}},
        "instances": {"instances": [{"text": v} for v in values]},
    }


@pytest.mark.parametrize("fmt", list(_bodies([])))
def test_good_texts_get_the_models_labels_in_every_request_format(saved, server, fmt):
    expected, scores = saved[0].predict(TEXTS)

    status, answer = _post(server, json.dumps(_bodies(TEXTS)[fmt]))

    assert status == 200, answer
    assert [p["label"] for p in answer["predictions"]] == expected
    assert [p["score"] for p in answer["predictions"]] == pytest.approx(scores.max(1), abs=1e-5)


def _exchange(port: int, body: str | None, content_type: str, path: str,
              method: str = "POST") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request(method, path, body, {"Content-Type": content_type})
    response = conn.getresponse()
    return response.status, response.read()


#: (name, body, content type, method): what a client may send; /predict must answer each one
#: as /invocations does. The first ones take its fast path (fast_texts), the rest MLflow's.
EXCHANGES = [
    *((f"fast {fmt}", json.dumps(body), "application/json", "POST")
      for fmt, body in _bodies(TEXTS).items()),
    ("fast plain strings", json.dumps({"inputs": TEXTS}), "application/json", "POST"),
    ("fast instances strings", json.dumps({"instances": TEXTS}), "application/json", "POST"),
    ("fast with params", json.dumps({"inputs": TEXTS, "params": {"k": 1}}), "application/json", "POST"),
    ("fast extra column", json.dumps({"dataframe_split": {"columns": ["id", "text"],
                                                          "data": [[1, TEXTS[0]]]}}),
     "application/json", "POST"),
    ("fast charset", json.dumps({"inputs": TEXTS}), "application/json; charset=utf-8", "POST"),
    ("one bare string", json.dumps({"inputs": TEXTS[0]}), "application/json", "POST"),
    ("no texts", json.dumps({"inputs": []}), "application/json", "POST"),
    ("split with index", json.dumps({"dataframe_split": {"columns": ["text"], "index": [7],
                                                         "data": [[TEXTS[0]]]}}),
     "application/json", "POST"),
    ("split rows longer than columns", json.dumps({"dataframe_split": {
        "columns": ["text"], "data": [[TEXTS[0], "x"]]}}), "application/json", "POST"),
    ("no text column", json.dumps({"dataframe_split": {"columns": ["persona"],
                                                       "data": [[TEXTS[0]]]}}),
     "application/json", "POST"),
    ("columns of unequal length", json.dumps({"inputs": {"text": TEXTS, "id": [1]}}),
     "application/json", "POST"),
    ("records as strings", json.dumps({"dataframe_records": TEXTS}), "application/json", "POST"),
    ("two layouts", json.dumps({"inputs": TEXTS, "instances": TEXTS}), "application/json", "POST"),
    ("unknown key", json.dumps({"texts": TEXTS}), "application/json", "POST"),
    ("llm prompt key", json.dumps({"inputs": TEXTS, "prompt": "x"}), "application/json", "POST"),
    ("not an object", json.dumps(TEXTS), "application/json", "POST"),
    ("latin-1 charset", json.dumps({"inputs": TEXTS}), "application/json; charset=latin-1", "POST"),
    ("csv", f"text\n{TEXTS[0]}\n", "text/csv", "POST"),
    ("get", None, "application/json", "GET"),
]


@pytest.mark.parametrize(("name", "body", "content_type", "method"), EXCHANGES,
                         ids=[e[0] for e in EXCHANGES])
def test_predict_answers_every_body_exactly_as_invocations_does(
        server, monkeypatch, name, body, content_type, method):
    """/predict is the low-latency route to the same answer: same status, same bytes; the
    common JSON shapes are answered by the model itself, the rest by MLflow's app."""
    import tuning.pyfunc

    calls = []
    records = tuning.pyfunc.prediction_records
    monkeypatch.setattr(tuning.pyfunc, "prediction_records",
                        lambda model, texts: calls.append(texts) or records(model, texts))

    expected = _exchange(server, body, content_type, "/invocations", method)
    got = _exchange(server, body, content_type, "/predict", method)

    assert got == expected
    assert bool(calls) == name.startswith("fast"), calls  # the fast path, and only for these
    if calls:
        assert expected[0] == 200 and len(calls[0]) == len(json.loads(got[1])["predictions"])


def _call_route(route, body: dict) -> tuple[int, bytes]:
    """One POST /predict through a PredictRoute, as RequestGuard hands it on (body parsed)."""
    import asyncio

    from tuning.serving import PAYLOAD_KEY

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict",
             "headers": [(b"content-type", b"application/json")], PAYLOAD_KEY: body}
    asyncio.run(route(scope, receive, send))
    return sent[0]["status"], sent[1]["body"]


def test_a_predict_past_the_request_timeout_is_504_as_mlflow_answers_it(monkeypatch):
    import tuning.pyfunc
    from tuning.serving import PredictRoute

    monkeypatch.setattr(tuning.pyfunc, "prediction_records", lambda model, texts: time.sleep(1))
    route = PredictRoute(None, model=None)
    route.timeout = 0.05

    status, body = _call_route(route, {"inputs": TEXTS})

    assert (status, body) == (504, b"Request processing time exceeded limit")


def test_a_model_that_fails_on_predict_is_500_in_one_line(monkeypatch, capsys):
    import tuning.pyfunc
    from tuning.serving import PredictRoute

    def fail(model, texts):
        raise RuntimeError("encoder graph vanished\nTraceback (most recent call last): ...")

    monkeypatch.setattr(tuning.pyfunc, "prediction_records", fail)

    status, body = _call_route(PredictRoute(None, model=None), {"inputs": TEXTS})

    assert status == 500
    assert json.loads(body) == {"error_code": "INTERNAL_ERROR",
                                "message": "RuntimeError: encoder graph vanished"}
    assert capsys.readouterr().err.strip() == (
        "hpn-tune serve: /predict failed: RuntimeError: encoder graph vanished")


@pytest.mark.parametrize("path", ["/invocations", "/predict"])
@pytest.mark.parametrize("fmt", list(_bodies([])))
@pytest.mark.parametrize(("bad", "shown"), [(42, "42"), (None, "null"), ("", '""'), ("  \t", '"  \\t"')])
def test_a_text_that_is_not_a_non_empty_string_is_400_naming_its_row(server, fmt, bad, shown, path):
    status, answer = _post(server, json.dumps(_bodies([TEXTS[0], bad])[fmt]), path=path)

    assert status == 400
    assert answer["message"] == (f"`text` row 1 (counting from 0) is {shown}: each text must be "
                                 "a string with a non-space character")


@pytest.mark.parametrize("body", [
    {"dataframe_records": [{"text": TEXTS[0]}, {"persona": TEXTS[1]}]},
    {"dataframe_split": {"columns": ["persona"], "data": [[TEXTS[0]]]}},
    {"inputs": [{"persona": TEXTS[0]}]},
])
def test_a_request_without_the_text_column_is_400(server, body):
    status, answer = _post(server, json.dumps(body))
    assert status == 400 and ("missing" in answer["message"]), answer


def test_a_csv_request_with_an_empty_text_is_400_and_a_good_one_200(server):
    assert _post(server, f"text\n{TEXTS[0]}\n", "text/csv")[0] == 200
    status, answer = _post(server, f'text\n{TEXTS[0]}\n""\n', "text/csv")
    assert status == 400 and "`text` row 1" in answer["message"]


@pytest.mark.parametrize("path", ["/invocations", "/predict"])
def test_a_body_that_is_not_json_is_400_without_echoing_it(server, path):
    status, answer = _post(server, "secret-token-like-garbage {", path=path)
    assert status == 400 and "not UTF-8 JSON" in answer["message"]
    assert "secret" not in answer["message"]


HEAD = (b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"%s\r\n\r\n")


def _raw_response(port: int, request: bytes) -> bytes:
    """Send `request` as it is and read the response until the server closes.

    Only what the server reads is sent: a server that answers 413 and closes with a body
    unread resets the connection (TCP), and the reset can overtake its answer; curl and
    clients sending `Expect: 100-continue` wait for the answer instead of sending."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
        return response


@pytest.mark.parametrize("path", [b"/invocations", b"/predict"])
def test_a_declared_body_over_the_cap_is_413_before_any_of_it_is_sent(server, path):
    started = time.time()
    head = HEAD.replace(b"/invocations", path)
    response = _raw_response(server, head % b"Content-Length: 30000000")  # no body follows

    assert response.startswith(b"HTTP/1.1 413") and b"--max-body-mb" in response
    assert str(MAX_BYTES).encode() in response and time.time() - started < 10


def test_a_chunked_body_is_413_as_soon_as_it_passes_the_cap(server):
    chunk = b"x" * 4096
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BYTES // 4096 + 1))
    response = _raw_response(server, HEAD % b"Transfer-Encoding: chunked" + chunks)  # no end
    assert response.startswith(b"HTTP/1.1 413")


def test_a_body_of_exactly_the_cap_is_served(server):
    body = json.dumps({"inputs": {"text": TEXTS}}).encode()
    body += b" " * (MAX_BYTES - len(body))  # JSON allows trailing whitespace
    assert _post(server, body)[0] == 200


@pytest.mark.parametrize(("path", "body"), [("/ping", b"\n"), ("/health", b"\n"), ("/version", None)])
def test_the_health_and_version_endpoints_answer(server, path, body):
    with urllib.request.urlopen(f"http://127.0.0.1:{server}{path}", timeout=30) as response:
        assert response.status == 200
        assert body is None or response.read() == body


# -- hpn-tune serve ----------------------------------------------------------------------------

def _serve(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "tuning.cli", "serve", *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=_env(),
                                start_new_session=True)


def test_hpn_tune_serve_checks_the_model_then_serves_it_with_its_body_cap(saved, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    proc = _serve(["--model", str(saved[1]), "--port", str(port), "--max-body-mb", "0.01",
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"], log)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        assert f"serving {saved[1]} at http://127.0.0.1:{port}/invocations" in log.read_text()
        assert _post(port, json.dumps({"inputs": {"text": TEXTS}}))[0] == 200
        assert _raw_response(port, HEAD % b"Content-Length: 10001").startswith(b"HTTP/1.1 413")
        assert _post(port, json.dumps({"inputs": {"text": [42]}}))[0] == 400
    finally:
        stop_process_group(proc)


def test_hpn_tune_serve_of_a_missing_alias_is_one_line_and_exit_2(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri, uri).create_registered_model("hpn-persona")  # a model, but no champion
    proc = subprocess.run(
        [sys.executable, "-m", "tuning.cli", "serve", "--model", "models:/hpn-persona@champion",
         "--tracking-uri", uri, "--port", str(free_port())],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300, check=False)

    assert proc.returncode == 2 and "serving" not in proc.stdout
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hpn-tune serve: error: --model: cannot load 'models:/hpn-persona@champion'")
    assert "alias champion not found" in err


def test_hpn_tune_serve_on_a_port_in_use_is_one_line_and_exit_2(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = main(["serve", "--model", "models:/never-loaded@champion",
                     "--port", str(busy.getsockname()[1])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("hpn-tune serve: error: --port")


def test_the_served_socket_sends_answers_without_waiting_for_the_clients_ack():
    """`serve` listens on a TCP socket (proto IPPROTO_TCP) with TCP_NODELAY: asyncio sets
    TCP_NODELAY on the connections only then. Without it every one-text answer waited about
    40 ms for the client's delayed ACK (Nagle), four times the encoder's own time."""
    from tuning import serving

    sock = serving._listen_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()
