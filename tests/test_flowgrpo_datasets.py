"""Flow-GRPO prompt datasets (``flowgrpo:DIR[:SPLIT][:FORMAT]``): counts, metadata, errors, a run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from calibri.core.errors import ConfigError
from calibri.plugins.dit.prompts import load_prompts
from calibri.plugins.flow_grpo.datasets import parse_spec
from conftest import TOY_PROMPTS

FIELD = "objective.options.prompts"

TEXT_TRAIN = "  a photo of a cat \n\na sign that says \"OPEN\"\r\n\ttabs and spaces\t\nno final newline"
GENEVAL_ROWS = [
    {"tag": "counting", "include": [{"class": "wine glass", "count": 2}],
     "exclude": [{"class": "wine glass", "count": 3}], "prompt": "a photo of two wine glasses"},
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]


def flowgrpo_text_loader(path: Path) -> list[str]:
    """Flow-GRPO's text loader, reimplemented from its documented behaviour: every line, stripped."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle.readlines()]


def flowgrpo_geneval_loader(path: Path) -> tuple[list[str], list[dict]]:
    """Flow-GRPO's GenEval loader: one JSON row per line; the row is the metadata."""
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [row["prompt"] for row in rows], rows


@pytest.fixture
def dataset(tmp_path) -> Path:
    folder = tmp_path / "dataset" / "mixed"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_bytes(TEXT_TRAIN.encode("utf-8"))
    (folder / "test.txt").write_text("one\ntwo\n", encoding="utf-8")
    (folder / "train_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL_ROWS), encoding="utf-8")
    (folder / "test_metadata.jsonl").write_text(json.dumps(GENEVAL_ROWS[0]) + "\n", encoding="utf-8")
    return folder


def test_text_sets_match_flowgrpo_line_for_line(tmp_path):
    folder = tmp_path / "ocr"
    folder.mkdir()
    (folder / "train.txt").write_bytes(TEXT_TRAIN.encode("utf-8"))
    (folder / "test.txt").write_text("a \"HELLO\" banner\n", encoding="utf-8")
    prompts = load_prompts(f"flowgrpo:{folder}", FIELD)
    expected = flowgrpo_text_loader(folder / "train.txt")
    assert list(prompts.prompts) == expected and len(prompts) == 5
    assert "" in prompts.prompts  # a blank line is a prompt in Flow-GRPO too: the counts agree
    assert all(m == {} for m in prompts.metadata)
    test = load_prompts(f"flowgrpo:{folder}:test", "objective.options.validation_prompts")
    assert list(test.prompts) == flowgrpo_text_loader(folder / "test.txt") == ['a "HELLO" banner']
    assert test.source == str(folder / "test.txt")


def test_geneval_sets_keep_the_whole_row_as_metadata(dataset):
    prompts = load_prompts(f"flowgrpo:{dataset}", FIELD)  # both files exist: the jsonl is chosen
    expected_prompts, expected_rows = flowgrpo_geneval_loader(dataset / "train_metadata.jsonl")
    assert list(prompts.prompts) == expected_prompts
    assert [dict(m) for m in prompts.metadata] == expected_rows
    assert prompts.metadata[0]["prompt"] == "a photo of two wine glasses" and prompts.metadata[0]["tag"] == "counting"
    test = load_prompts(f"flowgrpo:{dataset}:test", FIELD)
    assert [dict(m) for m in test.metadata] == [GENEVAL_ROWS[0]]


def test_a_format_suffix_picks_the_file(dataset):
    assert list(load_prompts(f"flowgrpo:{dataset}:text", FIELD).prompts) == flowgrpo_text_loader(dataset / "train.txt")
    assert list(load_prompts(f"flowgrpo:{dataset}:test:text", FIELD).prompts) == ["one", "two"]
    assert len(load_prompts(f"flowgrpo:{dataset}:general_ocr", FIELD)) == 5
    assert len(load_prompts(f"flowgrpo:{dataset}:geneval", FIELD)) == len(GENEVAL_ROWS)
    assert len(load_prompts(f"flowgrpo:{dataset}:test:geneval", FIELD)) == 1


def test_whitespace_only_jsonl_lines_are_skipped(tmp_path):
    folder = tmp_path / "geneval"
    folder.mkdir()
    (folder / "train_metadata.jsonl").write_text(json.dumps(GENEVAL_ROWS[1]) + "\n  \n" + json.dumps(GENEVAL_ROWS[2]),
                                                 encoding="utf-8")
    assert load_prompts(f"flowgrpo:{folder}", FIELD).prompts == ("a photo of a bench", "a photo of a red car")


def test_folders_and_files_with_colons(tmp_path, monkeypatch):
    folder = tmp_path / "odd:name"
    folder.mkdir()
    (folder / "test.txt").write_text("colon folder\n", encoding="utf-8")
    assert parse_spec(f"{folder}:test") == (folder, "test", None)
    assert load_prompts(f"flowgrpo:{folder}:test", FIELD).prompts == ("colon folder",)
    # A plain prompt file whose name looks like a spec is still a prompt file.
    monkeypatch.chdir(tmp_path)
    Path("flowgrpo:weird.txt").write_text("from the file\n", encoding="utf-8")
    assert load_prompts("flowgrpo:weird.txt", FIELD).prompts == ("from the file",)


@pytest.mark.parametrize(("spec", "message"), [
    ("flowgrpo:{root}/missing", "no such dataset folder"),
    ("flowgrpo:{root}/missing:test", "no such dataset folder"),
    ("flowgrpo:{root}/dataset/mixed:val", "no split 'val'"),
    ("flowgrpo:{root}/empty", "no split 'train'"),
    ("flowgrpo:{root}/empty:geneval", "train_metadata.jsonl does not exist"),
    ("flowgrpo:", "give the dataset folder"),
])
def test_missing_folders_and_files_are_one_line_config_errors(dataset, tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as caught:
        load_prompts(spec.format(root=tmp_path), "objective.options.validation_prompts")
    assert caught.value.field == "objective.options.validation_prompts"
    assert message in caught.value.message and "\n" not in str(caught.value)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("train_metadata.jsonl", json.dumps(GENEVAL_ROWS[0]) + "\n{not json}\n", "train_metadata.jsonl:2: not valid JSON"),
    ("train_metadata.jsonl", '{"tag": "counting"}\n', "train_metadata.jsonl:1: expected an object with a string"),
    ("train_metadata.jsonl", '["a list"]\n', ":1: expected an object"),
    ("train.txt", "", "holds no prompts"),
    ("train.txt", "\n \n", "holds no prompts"),
])
def test_bad_lines_and_empty_sets_name_the_field_and_file(tmp_path, name, content, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / name).write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_prompts(f"flowgrpo:{folder}", FIELD)
    assert caught.value.field == FIELD and message in caught.value.message
    assert str(folder) in caught.value.message and "\n" not in str(caught.value)


def test_a_non_utf8_file_is_a_config_error(tmp_path):
    folder = tmp_path / "latin"
    folder.mkdir()
    (folder / "train.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_prompts(f"flowgrpo:{folder}", FIELD)


def test_a_calibration_run_reads_its_prompts_from_flowgrpo_folders(toy_dir, tmp_path, cli):
    """``calibri run`` on the toy model, prompts from a Flow-GRPO GenEval-style folder and a text test split."""
    folder = tmp_path / "dataset" / "toy"
    folder.mkdir(parents=True)
    rows = [json.loads(line) for line in
            Path(load_prompts("toy/calibration", FIELD).source).read_text(encoding="utf-8").splitlines()[:4]]
    (folder / "train_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "test.txt").write_text("\n".join(TOY_PROMPTS[:2]) + "\n", encoding="utf-8")
    config = {"name": "flowgrpo-prompts", "seed": 0, "callbacks": [],
              "objective": {"name": "calibri", "options": {
                  "model": str(toy_dir), "granularity": "block", "steps": 2, "bucket_size": 2, "batch_size": 4,
                  "reward": "toy_oracle", "prompts": f"flowgrpo:{folder}",
                  "validation_prompts": f"flowgrpo:{folder}:test"}},
              "optimizer": {"name": "random", "popsize": 2}, "budget": {"rounds": 1}, "validation": {"every": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = cli("run", "run.yaml", "-o", "out", "--quiet")
    assert result.returncode == 0, result.stderr
    trials = [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)
    resolved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert resolved["objective"]["options"]["prompts"] == f"flowgrpo:{folder}"
    validation = [json.loads(line) for line in (tmp_path / "out" / "validation.jsonl").read_text().splitlines()]
    assert validation and all(line["value"] is not None for line in validation)

    config["objective"]["options"]["validation_prompts"] = f"flowgrpo:{folder}:val"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = cli("run", "bad.yaml", "-o", "out2", "--quiet")
    assert result.returncode == 2
    assert "objective.options.validation_prompts" in result.stderr and "no split 'val'" in result.stderr
    assert "Traceback" not in result.stderr
