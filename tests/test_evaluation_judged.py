"""MT-Bench and AlpacaEval judged end to end: ``sftmix eval --judge_model`` against a real ``transformers serve``.

The server is the real one (``transformers serve`` on 127.0.0.1, a free port), serving tiny local judges whose
weights are set by hand so that their answers are known: ``rating`` always answers ``"M [7]"`` (an MT-Bench
rating of 7 and, for AlpacaEval, "output M is better"), ``silent`` answers nothing (every rating unreadable)
and ``slow`` writes until ``max_tokens`` (a timeout). Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from sftmix.cli import main
from sftmix.evaluation.judge import judgment_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EVAL = Path(__file__).parent / "assets" / "eval"
QUESTIONS = EVAL / "mt_bench" / "question.jsonl"
ALPACA = EVAL / "alpaca_eval_judged" / "outputs.json"
JUDGMENT_KEYS = {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
_SERVE = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
_MISSING = [m for m in ("fastapi", "uvicorn", "openai", "alpaca_eval") if importlib.util.find_spec(m) is None]
if _SERVE is None or _MISSING:
    pytest.skip(
        f"needs `transformers serve` and alpaca_eval (missing: {_MISSING or 'transformers'}): "
        "pip install -e '.[dev,eval]'",
        allow_module_level=True,
    )


def _scripted_judge(path: Path, tokenizer, default: str, then: dict[str, str]) -> str:
    """A tiny Llama whose next token depends only on the last one: ``then[token]``, else ``default``.

    Every layer's output projections are zero, so the last hidden state is the last token's embedding; each
    token of ``then`` has its own embedding dimension (all others share dimension 0) and the untied head maps
    each dimension to the token that follows it.
    """
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), tie_word_embeddings=False, max_position_embeddings=8192)
    model = LlamaForCausalLM(config)  # judge prompts are long in characters, hence tokens here
    ids = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 0] = 1.0
        head.zero_()
        head[ids(default), 0] = 10.0
        for dim, (token, following) in enumerate(then.items(), start=1):
            embed[ids(token)] = 0.0
            embed[ids(token), dim] = 1.0
            head[ids(following), dim] = 10.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def judges(tmp_path_factory, tokenizer) -> dict[str, str]:
    root = tmp_path_factory.mktemp("judges")
    eos = tokenizer.eos_token
    return {
        "rating": _scripted_judge(
            root / "rating", tokenizer, "M", {"M": " ", " ": "[", "[": "7", "7": "]", "]": eos}
        ),
        "silent": _scripted_judge(root / "silent", tokenizer, eos, {}),
        "slow": _scripted_judge(root / "slow", tokenizer, "a", {}),
    }


def _free_port() -> int:
    """A loopback port nobody listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """``transformers serve`` on 127.0.0.1 (models load on their first request); stopped at teardown."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [_SERVE, "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _sftmix(args: list[str], base_url: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OPENAI_BASE_URL": base_url,
        "OPENAI_API_KEY": "test-key",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(hf_home),  # an empty cache: alpaca_eval finds no df_gamed.csv, as on a fresh machine
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    argv = [sys.executable, "-m", "sftmix.cli", "eval", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _eval_args(task: str, model: str, judge: str, out: Path, limit: int | None = None) -> list[str]:
    data = QUESTIONS if task == "mt_bench" else ALPACA
    args = ["--task", task, "--data_path", str(data), "--model_name_or_path", model, "--judge_model", judge]
    args += ["--max_new_tokens", "8", "--dtype", "float32", "--output_dir", str(out)]
    return args + (["--limit", str(limit)] if limit else [])


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("sftmix: error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    return errors[0]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _strict_json(path: Path) -> dict:
    def no_nan(constant: str):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=no_nan)


def test_mt_bench_judged_through_the_cli_kept_and_resumed(server, judges, tiny_llama_dir, tmp_path):
    out, judge = tmp_path / "out", judges["rating"]
    path = judgment_file(out, judge)
    first = _sftmix(_eval_args("mt_bench", tiny_llama_dir, judge, out, limit=1), server, tmp_path / "hf")
    assert first.returncode == 0, first.stderr[-3000:]
    judged = _lines(path)
    assert [(j["question_id"], j["turn"]) for j in judged] == [(81, 1), (81, 2)]

    # Server down while the second question is judged: one line, the first question's judgments stay.
    down = f"http://127.0.0.1:{_free_port()}/v1"
    failed = _sftmix(_eval_args("mt_bench", tiny_llama_dir, judge, out), down, tmp_path / "hf")
    assert failed.returncode == 2
    assert f"judge endpoint {down} unreachable" in _one_error_line(failed.stderr)
    assert _lines(path) == judged

    # The rerun judges only the second question: the first one's judgments are reused as they are.
    rerun = _sftmix(_eval_args("mt_bench", tiny_llama_dir, judge, out), server, tmp_path / "hf")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    judgments = _lines(path)
    assert judgments[:2] == judged
    assert [(j["question_id"], j["turn"]) for j in judgments] == [(81, 1), (81, 2), (111, 1), (111, 2)]
    assert [j["judge"] for j in judgments] == [
        [judge, "single-v1"],
        [judge, "single-v1-multi-turn"],
        [judge, "single-math-v1"],
        [judge, "single-math-v1-multi-turn"],
    ]
    for j in judgments:  # FastChat's model_judgment/<judge>_single.jsonl records
        assert set(j) == JUDGMENT_KEYS and j["judgment"] == "M [7]" and j["score"] == 7.0
        assert j["model"] == Path(tiny_llama_dir).name
    assert "[The Start of Reference Answer]\n5\n" in judgments[2]["user_prompt"]
    results = _strict_json(out / "eval.json")["mt_bench"]
    assert results["score"] == results["score_turn1"] == results["score_turn2"] == 7.0
    assert results["n_judgments"] == 4 and results["n_unreadable"] == 0 and results["n"] == 2
    assert (out / "model_answer" / f"{Path(tiny_llama_dir).name}.jsonl").is_file()


def test_alpaca_eval_judged_through_the_cli(server, judges, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    done = _sftmix(_eval_args("alpaca_eval", tiny_llama_dir, judges["rating"], out), server, tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "df_gamed.csv" in done.stderr  # why the length-controlled win rate is missing offline
    results = _strict_json(out / "eval.json")["alpaca_eval"]
    annotations = json.loads((out / "alpaca_eval" / "annotations.json").read_text())
    model = Path(tiny_llama_dir).name
    assert [a["instruction"] for a in annotations] == [
        r["instruction"] for r in json.loads(ALPACA.read_text())
    ]
    for a in annotations:  # alpaca_eval's annotation records
        assert {"instruction", "output_1", "output_2", "annotator", "preference"} <= set(a)
        assert a["generator_1"] == "gpt4_1106_preview" and a["generator_2"] == model
        assert a["preference"] in (1.0, 2.0)
    # The judge always names "M", the second output shown: alpaca_eval shuffles which output that is.
    expected = 100 * sum(a["preference"] - 1 for a in annotations) / len(annotations)
    assert results["win_rate"] == pytest.approx(expected)
    assert results["n_total"] == 3 and results["n_unreadable"] == 0
    assert results["length_controlled_winrate"] is None
    header, row = (out / "alpaca_eval" / "leaderboard.csv").read_text().splitlines()[:2]
    assert {"win_rate", "standard_error", "n_total", "avg_length"} <= set(header.split(","))
    assert row.split(",")[0] == model

    # With df_gamed.csv in the Hub cache, alpaca_eval's own GLM gives the length-controlled win rate; the
    # rerun needs no server: every judgment comes from alpaca_eval's annotation cache.
    _fake_df_gamed(tmp_path / "hf")
    down = f"http://127.0.0.1:{_free_port()}/v1"
    rerun = _sftmix(_eval_args("alpaca_eval", tiny_llama_dir, judges["rating"], out), down, tmp_path / "hf")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = _strict_json(out / "eval.json")["alpaca_eval"]
    assert again["win_rate"] == pytest.approx(expected) and again["n_total"] == 3
    assert 0 <= again["length_controlled_winrate"] <= 100 and again["lc_standard_error"] is not None


def _fake_df_gamed(hf_home: Path) -> None:
    """A stand-in for the Hub's ``tatsu-lab/alpaca_eval/df_gamed.csv`` (instruction difficulties and two
    length-gamed baselines' annotations) in the Hugging Face cache layout, for the 3 test instructions."""
    import pandas as pd

    repo = hf_home / "hub" / "datasets--tatsu-lab--alpaca_eval"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    rows = [
        {
            "model": model,
            "index": i,
            "preference": (0.2, 0.5, 0.9)[i],
            "std_delta_len": sign * (i + 1) / 2,
            "instruction_difficulty": (-1.0, 0.0, 1.0)[i],
            "not_gamed_baseline": False,
        }
        for model, sign in (("gamed_long", 1), ("gamed_short", -1))
        for i in range(3)
    ]
    pd.DataFrame(rows).to_csv(repo / "snapshots" / commit / "df_gamed.csv", index=False)


def test_alpaca_eval_server_down_is_one_line(tiny_llama_dir, tmp_path):
    down = f"http://127.0.0.1:{_free_port()}/v1"
    failed = _sftmix(
        _eval_args("alpaca_eval", tiny_llama_dir, "judge", tmp_path / "out"), down, tmp_path / "hf"
    )
    assert failed.returncode == 2
    assert f"judge endpoint {down} unreachable" in _one_error_line(failed.stderr)


def _main(args: list[str], base_url: str, monkeypatch) -> int:
    """``sftmix eval`` in this process (no start-up cost), with the endpoint in the environment."""
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    return main(["eval", *args])


def test_unreadable_ratings_are_counted_and_null(server, judges, tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert (
        _main(_eval_args("mt_bench", tiny_llama_dir, judges["silent"], out, limit=1), server, monkeypatch)
        == 0
    )
    assert [j["score"] for j in _lines(judgment_file(out, judges["silent"]))] == [-1.0, -1.0]  # FastChat's -1
    results = _strict_json(out / "eval.json")["mt_bench"]
    assert results["score"] is None and results["score_turn1"] is None and results["n_unreadable"] == 2
    assert _main(_eval_args("alpaca_eval", tiny_llama_dir, judges["silent"], out), server, monkeypatch) == 0
    results = _strict_json(out / "eval.json")["alpaca_eval"]
    assert results["win_rate"] is None and results["n_total"] == 0 and results["n_unreadable"] == 3


def test_timeout_is_one_line(server, judges, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    args = _eval_args("mt_bench", tiny_llama_dir, judges["slow"], tmp_path / "out", limit=1)
    assert _main([*args, "--judge_timeout", "1", "--judge_max_retries", "0"], server, monkeypatch) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"judge endpoint {server} did not answer within 1.0s (0 retries)" in line


class _RefusingServer(BaseHTTPRequestHandler):
    """What an API with a key check answers to a wrong key. `transformers serve` checks no key, so this one
    case needs a stand-in."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_refused_key_is_one_line(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    refusing = HTTPServer(("127.0.0.1", 0), _RefusingServer)
    thread = threading.Thread(target=refusing.serve_forever, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{refusing.server_port}/v1"
    try:
        for task in ("mt_bench", "alpaca_eval"):
            assert (
                _main(_eval_args(task, tiny_llama_dir, "judge", tmp_path / task), base_url, monkeypatch) == 2
            )
            line = _one_error_line(capsys.readouterr().err)
            assert f"judge endpoint {base_url} refused the key (HTTP 401): check OPENAI_API_KEY" in line
    finally:
        refusing.shutdown()
        thread.join()
