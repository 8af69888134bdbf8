"""Every corpus defect reaches the user as one line `safekeel: error: ...` and exit code 2.

Runs `safekeel annotate` as a data pass (no scorers) on malformed corpora. The one-line
form is the CLI's error contract (`--debug` shows the traceback instead).
"""

import json

import pytest

from safekeel import pipeline
from safekeel.data.embedded.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("policy")))


def run_cli(args, capsys):
    try:
        code = pipeline.main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def chat(content):
    return {"messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": content}]}


def write(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


CASES = {
    # name: (file name, content, what the one line must say)
    "empty_jsonl": ("empty.jsonl", "", ["no rows"]),
    "typed_mix": ("mix.jsonl", "".join(json.dumps(r) + "\n" for r in [chat("4"), chat(5)]),
                  ["row 1", "messages[1].content", "not a string"]),
    "broken_json": ("broken.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": \n',
                    ["row 1", "invalid JSON"]),
    "bad_utf8": ("enc.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "\xe9"}\n',
                 ["row 1", "not valid UTF-8"]),
    "csv_extra_field": ("t.csv", "prompt,response\na,b\nc,d,e\n", ["row 1", "invalid CSV"]),
    "missing_response": ("m.jsonl", '{"prompt": "a"}\n', ["row 0", "'response'", "missing"]),
    "empty_json_array": ("e.json", "[]", ["no rows"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_corpus_defect_is_one_line_and_exit_code_2(case, tmp_path, policy_dir, capsys):
    name, content, expected = CASES[case]
    path = write(tmp_path / name, content)
    code, err = run_cli(["annotate", "--corpus.path", str(path), "--policy", policy_dir,
                         "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert "Traceback" not in err
    line = [text for text in err.splitlines() if text.strip()][-1]
    assert line.startswith("safekeel: error: ") and str(path) in line
    for part in expected:
        assert part in line
    assert not list((tmp_path / "out").glob("shard-*.parquet"))


def test_a_missing_corpus_file_is_one_line(tmp_path, policy_dir, capsys):
    code, err = run_cli(["annotate", "--corpus.path", str(tmp_path / "nope.jsonl"),
                         "--policy", policy_dir, "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "Traceback" not in err
    line = [text for text in err.splitlines() if text.strip()][-1]
    assert line.startswith("safekeel: error: ") and "nope.jsonl: file not found" in line
