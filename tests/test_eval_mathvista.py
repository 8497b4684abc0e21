"""MathVista testmini from its released layouts: reading, the reference query, answer extraction by
rules (and by a stand-in OpenAI-compatible extractor), normalisation and accuracy per task and skill.
Expectations are worked out by hand from MathVista's evaluation/ (extract_answer.py, calculate_score.py)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from helpers import hf_image, png, write_parquet

from solo.cli import main as solo_main
from solo.eval import EvalDataError, load_samples
from solo.eval.protocols import resolve_protocol

MC = ["3/11", "8/11", "6/11", "3/5"]
CITIES = ["tokyo", "osaka", "shanghai", "hong kong"]
TASKS = {"fqa": "figure question answering", "mwp": "math word problem", "tqa": "textbook question answering"}
# pid: (question_type, answer_type, choices, precision, answer, task, skills, response)
PROBLEMS = {
    "1": ("multi_choice", "text", MC, None, "8/11", "fqa", ["algebraic reasoning", "arithmetic reasoning"],
          "The correct answer is (B) 8/11."),
    "2": ("free_form", "integer", None, None, "14", "mwp", ["arithmetic reasoning"], "The number missing is 14."),
    "3": ("free_form", "float", None, 1.0, "0.6", "tqa", ["statistical reasoning"], "0.60"),
    "4": ("free_form", "float", None, 2.0, "1.45", "tqa", ["arithmetic reasoning"], "Luca needs $1.449 in total"),
    "5": ("free_form", "list", None, None, "[2007, 2008]", "tqa", ["statistical reasoning"], "It is [2007, 2008]"),
    "6": ("multi_choice", "text", CITIES, None, "tokyo", "fqa", ["commonsense"], ""),
    "7": ("free_form", "integer", None, None, "3", "mwp", ["arithmetic reasoning"], "I am not sure"),
    "8": ("multi_choice", "text", CITIES, None, "osaka", "fqa", ["commonsense"], 'The answer is "Osaka".'),
    "9": ("free_form", "integer", None, None, "5", "mwp", ["arithmetic reasoning"], "6 apples"),
}
# Reference steps: 1 not a choice, no quoted answer → (GPT-4; here VLMEvalKit's rule: B, one letter among
#   the last words) → "B" → choices[1] "8/11" ✓ | 2 last number "14" → str(int(float)) ✓ |
#   3 float("0.60") = 0.6 → round(0.6, 1) "0.6" ✓ | 4 last number 1.449 → round(·, 2) "1.45" ✓ |
#   5 last "[…]" → "[2007, 2008]" ✓ | 6 "" → the choice nearest "" in edit distance: "tokyo" (5, first of
#   the two shortest) ✓ — the reference credits an empty answer there | 7 no number → "" → int fails →
#   None ✗ | 8 'The answer is "Osaka".' → "Osaka" → nearest choice "osaka" ✓ | 9 "6" ✗
# → 7/9; fqa 3/3, mwp 1/3, tqa 3/3; arithmetic reasoning 3/5 (1, 2, 4 of 1, 2, 4, 7, 9)
EXPECTED = {"1": True, "2": True, "3": True, "4": True, "5": True, "6": True, "7": False, "8": True, "9": False}


def query(pid):
    question_type, _, choices, *_ = PROBLEMS[pid]
    hint = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
            if question_type == "multi_choice" else "Hint: Please answer the question requiring an answer.")
    lines = [f"({chr(65 + i)}) {c}" for i, c in enumerate(choices or [])]
    return "\n".join([hint, f"Question: problem {pid}?"] + (["Choices:"] + lines if lines else []))


def row(pid, answer=True):
    question_type, answer_type, choices, precision, value, task, skills, _ = PROBLEMS[pid]
    return {
        "pid": pid, "question": f"problem {pid}?", "image": f"images/{pid}.jpg", "decoded_image": hf_image(png()),
        "choices": choices, "unit": None, "precision": precision, "answer": value if answer else "",
        "question_type": question_type, "answer_type": answer_type,
        "metadata": {"category": "math-targeted-vqa", "context": "table", "grade": "high school", "img_height": 32,
                     "img_width": 40, "language": "english", "skills": skills, "source": "TabMWP",
                     "split": "testmini" if answer else "test", "task": TASKS[task]},
        "query": query(pid),
    }


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """An AI4Math/MathVista snapshot: data/testmini-*.parquet and data/test-*.parquet (answers unreleased)."""
    root = tmp_path_factory.mktemp("mathvista") / "MathVista"
    write_parquet(root / "data" / "testmini-00000-of-00001.parquet", [row(pid) for pid in PROBLEMS])
    write_parquet(root / "data" / "test-00000-of-00002.parquet", [row("2", answer=False)])
    return root


def answers_file(path, responses):
    path.write_text("".join(json.dumps({"id": pid, "prediction": text}) + "\n" for pid, text in responses.items()))
    return path


def test_testmini_is_read_with_the_reference_query(snapshot):
    samples = load_samples("mathvista", snapshot)
    assert [s.id for s in samples] == list(PROBLEMS)  # the test split is not read
    first = samples[0]
    assert first.error is None and first.options == MC and first.answer == "8/11"
    assert first.meta == {"question_type": "multi_choice", "answer_type": "text", "precision": None}
    assert first.groups["task"] == "figure question answering"
    assert first.groups["skills"] == ["algebraic reasoning", "arithmetic reasoning"]
    assert resolve_protocol("mathvista", None).prompt(first) == query("1")


def test_scores_overall_per_task_and_skill(tmp_path, snapshot):
    responses = {pid: problem[-1] for pid, problem in PROBLEMS.items()}
    out = tmp_path / "out"
    assert solo_main(["eval", "score", "--benchmark", "mathvista", "--data", str(snapshot), "--predictions",
                      str(answers_file(tmp_path / "a.jsonl", responses)), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    records = {json.loads(line)["id"]: json.loads(line)
               for line in (out / "predictions.jsonl").read_text().splitlines()}
    assert {pid: r["correct"] for pid, r in records.items()} == EXPECTED
    assert records["1"]["parsed"] == "8/11" and records["4"]["parsed"] == "1.45" and records["7"]["parsed"] is None
    metrics = results["metrics"]
    assert (metrics["accuracy"], metrics["correct"], metrics["n"], metrics["unparsed"]) == (77.7778, 7, 9, 1)
    assert metrics["by_task"]["math word problem"] == {"accuracy": 33.3333, "correct": 1, "n": 3}
    assert metrics["by_task"]["textbook question answering"]["accuracy"] == 100.0
    assert metrics["by_skills"]["arithmetic reasoning"] == {"accuracy": 60.0, "correct": 3, "n": 5}
    assert results["protocol"] == "official" and "lupantech/MathVista" in results["reference"]


def test_original_json_layout_and_missing_fields(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "2.jpg").write_bytes(png())
    problems = {pid: {k: v for k, v in row(pid).items() if k not in ("pid", "decoded_image")} for pid in ("2", "3")}
    problems["3"]["query"] = None
    (data / "testmini.json").write_text(json.dumps(problems))
    good, bad = load_samples("mathvista", data)
    assert good.error is None and good.image == str(data / "images" / "2.jpg")
    assert bad.error == "query is missing (MathVista's released files have it)"


def test_only_the_official_protocol_and_generate_mode():
    with pytest.raises(EvalDataError, match="GPT judge only"):
        resolve_protocol("mathvista", "lmms-eval")
    with pytest.raises(EvalDataError, match="no options to rank"):
        resolve_protocol("mathvista", None, "likelihood")


class _Extractor(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible server: answers "3" to every extraction request, and logs them."""

    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), body))
        reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": " 3\n"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_extractor_url_asks_an_openai_compatible_endpoint(tmp_path, snapshot, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Extractor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SOLO_EXTRACTOR_API_KEY", "secret")
    responses = {"3": "0.60", "7": "I am not sure", "9": "6 apples"}
    try:
        code = solo_main(["eval", "score", "--benchmark", "mathvista", "--data", str(snapshot), "--predictions",
                          str(answers_file(tmp_path / "a.jsonl", responses)), "--out", str(tmp_path / "out"),
                          "--extractor-url", f"http://127.0.0.1:{server.server_port}/v1"])
    finally:
        server.shutdown()
    assert code == 0
    # "0.60" is read directly (a float answer); the two others go to the extractor, which says "3".
    assert [(path, auth) for path, auth, _ in _Extractor.requests] == [("/v1/chat/completions", "Bearer secret")] * 2
    assert "Model response: I am not sure" in _Extractor.requests[0][2]["messages"][0]["content"]
    records = {json.loads(line)["id"]: json.loads(line)
               for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()}
    assert records["7"]["correct"] and not records["9"]["correct"]  # answers 3 and 5
    assert records["3"]["correct"]


def test_unreachable_extractor_is_a_clear_error(tmp_path, snapshot, capsys):
    code = solo_main(["eval", "score", "--benchmark", "mathvista", "--data", str(snapshot), "--predictions",
                      str(answers_file(tmp_path / "a.jsonl", {"7": "no idea"})), "--out", str(tmp_path / "out"),
                      "--extractor-url", "http://127.0.0.1:9/v1"])
    assert code == 2 and "gave no answer" in capsys.readouterr().err


def test_solo_eval_runs_mathvista_and_score_agrees(random_model, tmp_path, snapshot):  # noqa: F811
    """`solo eval` on the released files (a tiny random model, two problems), then `solo eval score`
    on its predictions.jsonl: one scoring path, the same metrics."""
    from solo.eval.runner import run_eval

    results = run_eval(random_model, "mathvista", snapshot, tmp_path / "run", limit=2, max_new_tokens=3,
                       progress=False)
    assert results["protocol"] == "official" and results["scored"] == 2 and results["max_new_tokens"] == 3
    assert solo_main(["eval", "score", "--benchmark", "mathvista", "--data", str(snapshot), "--predictions",
                      str(tmp_path / "run" / "predictions.jsonl"), "--out", str(tmp_path / "rescored")]) == 0
    rescored = json.loads((tmp_path / "rescored" / "results.json").read_text())
    assert rescored["scored"] == 2 and rescored["bad"] == 7  # the 7 problems beyond --limit have no answer
    assert rescored["metrics"]["correct"] == results["metrics"]["correct"]
    records = {name: {r["id"]: r
                      for r in map(json.loads, (tmp_path / name / "predictions.jsonl").read_text().splitlines())}
               for name in ("run", "rescored")}
    for key, record in records["run"].items():
        assert records["rescored"][key]["parsed"] == record["parsed"]
        assert records["rescored"][key]["correct"] == record["correct"]
