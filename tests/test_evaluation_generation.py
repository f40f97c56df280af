"""Chat generation, the official MT-Bench / AlpacaEval answer formats, and MT-Bench judging over local HTTP."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from sftmix.errors import SFTMixError
from sftmix.evaluation import generation
from sftmix.evaluation.generation import (
    generate_alpaca_eval,
    generate_chat,
    generate_mt_bench,
    load_alpaca_eval_instructions,
    load_mt_bench_questions,
    write_alpaca_eval_outputs,
    write_mt_bench_answers,
)
from sftmix.evaluation.judge import judge_mt_bench, load_judge_prompts, load_reference_answers, parse_rating

EVAL = Path(__file__).parent / "assets" / "eval"


def test_batched_greedy_generation_matches_one_by_one(tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "A much longer question that needs left padding in a batch"}],
        [{"role": "user", "content": "Medium length one"}],
    ]
    batched = generate_chat(model, tokenizer, conversations, max_new_tokens=6, batch_size=3)
    single = [generate_chat(model, tokenizer, [c], max_new_tokens=6, batch_size=1)[0] for c in conversations]
    assert batched == single
    assert all(isinstance(a, str) and len(a) <= 6 for a in batched)  # char-level tokenizer: <= 1 char a token


def _echo_generator(monkeypatch) -> list[list[dict]]:
    """Replace the model with a fake that answers "answer to: <last user turn>" and records what it saw."""
    seen: list[list[dict]] = []

    def fake_generate_chat(model, tokenizer, conversations, max_new_tokens, batch_size, desc=""):
        seen.extend([list(c) for c in conversations])
        return [f"answer to: {c[-1]['content']}" for c in conversations]

    monkeypatch.setattr(generation, "generate_chat", fake_generate_chat)
    return seen


def test_mt_bench_second_turn_sees_own_first_answer(monkeypatch, tmp_path):
    seen = _echo_generator(monkeypatch)
    questions = load_mt_bench_questions(EVAL / "mt_bench" / "question.jsonl")
    answers = generate_mt_bench(None, None, questions, "my-model")
    second_turn = [c for c in seen if len(c) == 3]
    assert second_turn[0] == [
        {"role": "user", "content": "Write a one-line travel tip."},
        {"role": "assistant", "content": "answer to: Write a one-line travel tip."},
        {"role": "user", "content": "Rewrite it starting with the letter A."},
    ]
    path = write_mt_bench_answers(answers, tmp_path, "my-model")
    assert path == tmp_path / "model_answer" / "my-model.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [81, 111]
    for record in lines:  # FastChat's model_answer schema
        assert set(record) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert record["model_id"] == "my-model" and record["choices"][0]["index"] == 0
        assert len(record["choices"][0]["turns"]) == 2
    assert lines[1]["choices"][0]["turns"][1] == "answer to: And 2 * 3?"


def test_alpaca_eval_outputs_format(monkeypatch, tmp_path):
    _echo_generator(monkeypatch)
    records = load_alpaca_eval_instructions(EVAL / "alpaca_eval.json")
    outputs = generate_alpaca_eval(None, None, records, "my-model")
    path = write_alpaca_eval_outputs(outputs, tmp_path)
    data = json.loads(path.read_text())
    assert data == [
        {
            "instruction": "Name a primary color.",
            "output": "answer to: Name a primary color.",
            "generator": "my-model",
            "dataset": "helpful_base",
        },
        {
            "instruction": "Say hello in French.",
            "output": "answer to: Say hello in French.",
            "generator": "my-model",
            "dataset": "koala",
        },
    ]


def test_question_files_are_checked(tmp_path):
    bad = tmp_path / "question.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["a"]}\n{"question_id": 2, "turns": "b"}\n')
    with pytest.raises(SFTMixError, match=r"question\.jsonl:2: an MT-Bench question needs 'turns'"):
        load_mt_bench_questions(bad)


def test_parse_rating():
    assert parse_rating("Good answer. Rating: [[8]]") == 8.0
    assert parse_rating("Rating: [7.5]") == 7.5
    assert parse_rating("no rating here") == -1.0


class _FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that rates 3 when a reference answer is shown, else 8."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body["authorization"] = self.headers.get("Authorization")
        body["path"] = self.path
        _FakeJudge.requests.append(body)
        rating = 3 if "Reference Answer" in body["messages"][1]["content"] else 8
        payload = json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": f"Rating: [[{rating}]]"}}]}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


def test_mt_bench_judging_against_local_endpoint(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeJudge.requests = []
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "test-key")
        questions = load_mt_bench_questions(EVAL / "mt_bench" / "question.jsonl")
        answers = [
            {
                "question_id": q["question_id"],
                "model_id": "m",
                "choices": [{"index": 0, "turns": ["x1", "x2"]}],
            }
            for q in questions
        ]
        metrics, judgments = judge_mt_bench(
            questions,
            answers,
            "judge-model",
            load_judge_prompts(EVAL / "mt_bench" / "judge_prompts.jsonl"),
            load_reference_answers(EVAL / "mt_bench" / "reference_answer" / "gpt-4.jsonl"),
        )
    finally:
        server.shutdown()
        thread.join()
    # Writing question: 8 and 8; math question (graded against the reference): 3 and 3.
    assert metrics == {
        "score": 5.5,
        "score_turn1": 5.5,
        "score_turn2": 5.5,
        "n_judgments": 4,
        "n_unreadable": 0,
    }
    assert [j["judge"][1] for j in judgments] == [
        "single-v1",
        "single-v1-multi-turn",
        "single-math-v1",
        "single-math-v1-multi-turn",
    ]
    sent = _FakeJudge.requests
    assert sent[0]["path"] == "/v1/chat/completions" and sent[0]["authorization"] == "Bearer test-key"
    assert sent[0]["model"] == "judge-model" and sent[0]["temperature"] == 0.0
    assert (
        "[Question]\nWrite a one-line travel tip.\n\n[The Start of Assistant's Answer]\nx1"
        in (sent[0]["messages"][1]["content"])
    )
    assert "[The Start of Reference Answer]\n5\n" in sent[2]["messages"][1]["content"]
    assert "### Assistant A:\nx2" in sent[3]["messages"][1]["content"]


def test_judging_needs_an_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(SFTMixError, match="OPENAI_BASE_URL"):
        judge_mt_bench([], [], "judge", {}, {})


def test_judgment_file_is_appended_reused_and_cleaned(monkeypatch, tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeJudge.requests = []
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    questions = load_mt_bench_questions(EVAL / "mt_bench" / "question.jsonl")
    answers = [
        {"question_id": q["question_id"], "model_id": "m", "choices": [{"turns": ["x1", "x2"]}]}
        for q in questions
    ]
    other = {
        "question_id": 999,
        "model": "m",
        "judge": ["j", "single-v1"],
        "user_prompt": "p",
        "turn": 1,
        "score": 2,
    }
    stale = {**other, "question_id": 81, "user_prompt": "an older answer", "score": 1}
    path = tmp_path / "model_judgment" / "j_single.jsonl"
    path.parent.mkdir()
    path.write_text(
        json.dumps(other) + "\n" + json.dumps(stale) + "\n" + '{"question_id": 111, "mod'
    )  # cut short
    args = ("j", load_judge_prompts(EVAL / "mt_bench" / "judge_prompts.jsonl"),
            load_reference_answers(EVAL / "mt_bench" / "reference_answer" / "gpt-4.jsonl"))  # fmt: skip
    try:
        first, _ = judge_mt_bench(questions, answers, *args, judgments_path=path)
        assert len(_FakeJudge.requests) == 4  # the stale judgment (another answer) is judged again
        again, _ = judge_mt_bench(questions, answers, *args, judgments_path=path)
        assert len(_FakeJudge.requests) == 4 and again == first  # nothing asked twice
    finally:
        server.shutdown()
        thread.join()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0] == other and len(records) == 5  # other questions' judgments stay; the stale one went
    assert [(r["question_id"], r["turn"]) for r in records[1:]] == [(81, 1), (81, 2), (111, 1), (111, 2)]
