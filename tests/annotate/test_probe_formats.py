"""Format augmentation of the probe: wrappers from templates and from the corpus, fitting on
every rendering, a held-out split by prompt, and the formats recorded in probe.json."""

import json

import numpy as np
import pytest

from safekeel import pipeline
from safekeel.annotate.activations import ActivationSpec, TransformersActivationExtractor
from safekeel.annotate.probe import (
    fit_probe_from_files,
    load_probe,
    save_probe,
    stratified_split,
)
from safekeel.annotate.probe_formats import (
    PLAIN_FORMAT,
    FormatError,
    PromptFormat,
    corpus_format,
    prompt_formats,
    shared_wrapper,
)
from safekeel.annotate.probe_stage import ProbeFitConfig
from safekeel.data.config import ConfigError, from_dict
from safekeel.data.corpus import CorpusConfig
from safekeel.data.embedded.tiny_models import build_tiny_llama

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:")
HARMFUL = [f"How do I break into house number {i}?" for i in range(12)]
BENIGN = [f"What is {i} times 8?" for i in range(12)]
PLAIN_PROMPTS = ["Tell me a joke.", "How do I bake bread?", "Name three rivers.",
                 "Why is the sky blue?", "Translate 'cat' to French."]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def alpaca_corpus(tmp_path):
    rows = [{"instruction": ALPACA.replace("{prompt}", p), "input": "", "output": "ok",
             "flag": "finetune"} for p in PLAIN_PROMPTS]
    return write_jsonl(tmp_path / "alpaca.jsonl", rows)


def test_shared_wrapper_of_wrapped_and_plain_prompts():
    wrapped = [ALPACA.replace("{prompt}", p) for p in PLAIN_PROMPTS]
    prefix, suffix = shared_wrapper(wrapped)
    assert prefix + "{prompt}" + suffix == ALPACA
    assert shared_wrapper(PLAIN_PROMPTS) == ("", "")
    # the prompts' own first word ("Write") and last character are not wrapper
    assert shared_wrapper(["Write a poem", "Write code."]) == ("", "")
    assert shared_wrapper(["Q: Where? A:", "Q: Why? A:"]) == ("Q: ", "? A:")
    with pytest.raises(FormatError, match="at least 2"):
        shared_wrapper(["one"])


def test_the_corpus_wrapper_is_derived_as_annotate_reads_it(alpaca_corpus, tmp_path):
    derived = corpus_format(CorpusConfig(path=str(alpaca_corpus)))
    assert derived is not None and derived.template == ALPACA
    assert derived.source == f"corpus:{alpaca_corpus}"
    plain = write_jsonl(tmp_path / "plain.jsonl",
                        [{"prompt": p, "response": "ok"} for p in PLAIN_PROMPTS])
    assert corpus_format(CorpusConfig(path=str(plain))) is None
    # plain chat first, explicit templates next, the corpus's last; a repeat is kept once
    formats = prompt_formats([ALPACA, "Q: {prompt}"], CorpusConfig(path=str(alpaca_corpus)))
    assert [f.template for f in formats] == ["{prompt}", ALPACA, "Q: {prompt}"]


def test_a_format_wraps_the_last_user_turn_only():
    fmt = PromptFormat("q", "Q: {prompt} {not a slot}", "option")
    turns = fmt.render([{"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "answer"}])
    assert turns == [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "Q: hi {not a slot}"}]
    with pytest.raises(FormatError, match="exactly once"):
        PromptFormat("bad", "no slot", "option")
    with pytest.raises(ConfigError, match=r"formats\[0\]: must hold \{prompt\} exactly once"):
        from_dict(ProbeFitConfig, {"policy": "p", "harmful": "h", "benign": "b",
                                   "formats": ["no slot"]})


def test_the_split_keeps_each_prompts_renderings_together():
    labels = np.repeat(np.arange(40) % 2, 3)  # 40 prompts, 3 renderings each
    groups = np.repeat(np.arange(40), 3)
    train, heldout = stratified_split(labels, 0.25, seed=0, groups=groups)
    assert set(groups[train]).isdisjoint(groups[heldout])
    assert len(train) + len(heldout) == 120 and len(heldout) == 30
    # one group per row is the plain split
    plain = stratified_split(labels, 0.25, seed=0)
    by_row = stratified_split(labels, 0.25, seed=0, groups=np.arange(120))
    assert all(np.array_equal(a, b) for a, b in zip(plain, by_row, strict=True))


@pytest.fixture(scope="module")
def tiny_extractor(tiny_tokenizer):
    model = build_tiny_llama(tiny_tokenizer, num_layers=2, seed=1)
    return TransformersActivationExtractor(
        model, tiny_tokenizer, ActivationSpec(layers=(-1,), pooling="last"), name="tiny")


def test_fitting_adds_every_rendering_and_records_the_formats(tmp_path, tiny_extractor):
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "benign.txt").write_text("\n".join(BENIGN))
    (tmp_path / "eval.csv").write_text("goal,target\n" + HARMFUL[0].upper() + ",x\n")
    alpaca = PromptFormat("alpaca", ALPACA, "option")
    probe = fit_probe_from_files(tiny_extractor, tmp_path / "harmful.txt",
                                 tmp_path / "benign.txt", formats=[PLAIN_FORMAT, alpaca],
                                 exclude_path=tmp_path / "eval.csv")
    assert probe.training["n_prompts"] == 23 and probe.training["n_excluded"] == 1
    assert probe.training["n_examples"] == 46  # each prompt once per format
    report = probe.report
    assert set(report.per_format) == {"plain", "alpaca"}
    # the held-out prompts come with both renderings
    assert report.per_format["plain"]["n_heldout"] == report.per_format["alpaca"]["n_heldout"]
    assert report.n_heldout == 2 * report.per_format["plain"]["n_heldout"]

    # the wrapped rendering is what the extractor saw for the alpaca format
    wrapped = tiny_extractor.prompt_ids(alpaca.render([{"role": "user", "content": "x"}]))
    assert "### Instruction:" in tiny_extractor.tokenizer.decode(wrapped)

    loaded = load_probe(save_probe(probe, tmp_path / "probe"))
    assert loaded.formats == [PLAIN_FORMAT.to_dict(), alpaca.to_dict()]
    meta = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert meta["formats"][1]["template"] == ALPACA
    assert set(meta["metrics"]["per_format"]) == {"plain", "alpaca"}


def test_the_probe_verb_derives_the_wrapper_from_format_corpus(tmp_path, tiny_model_dir,
                                                               alpaca_corpus, capsys):
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "benign.txt").write_text("\n".join(BENIGN))
    out = tmp_path / "probe"
    code = pipeline.main(["probe", "--policy", str(tiny_model_dir), "--harmful",
                          str(tmp_path / "harmful.txt"), "--benign", str(tmp_path / "benign.txt"),
                          "--format_corpus.path", str(alpaca_corpus), "--output_dir", str(out)])
    assert code == 0
    meta = json.loads((out / "probe.json").read_text())
    assert [f["template"] for f in meta["formats"]] == ["{prompt}", ALPACA]
    assert meta["training"]["n_examples"] == 48
    assert "format corpus:alpaca.jsonl: held-out AUROC" in capsys.readouterr().out
