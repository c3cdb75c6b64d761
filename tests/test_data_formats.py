"""Label and list formats: SSv2 JSON, Jester CSV, TSM lists, category.txt."""

import json

import pytest

from glitr_cli.data.formats import (
    DatasetInfo,
    VideoRecord,
    format_list,
    parse_jester_labels,
    parse_jester_split,
    parse_ssv2_labels,
    parse_ssv2_split,
    read_categories,
    read_dataset_info,
    read_list,
    template_to_class,
    write_categories,
    write_dataset_info,
    write_list,
)
from glitr_cli.errors import GlitrError


def test_ssv2_labels_follow_the_indices_not_the_file_order(tmp_path):
    p = tmp_path / "labels.json"
    p.write_text(json.dumps({"Moving something up": "2", "Holding something": "0", "Pushing something": 1}, indent=1))
    assert parse_ssv2_labels(p) == ["Holding something", "Pushing something", "Moving something up"]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{\n "a": "0",\n "b": "x"\n}', ":3: class 'b' has index 'x', expected an integer"),
        ('{\n "a": "0",\n "b": "0"\n}', ":3: classes 'a' and 'b' share the index 0"),
        ('{\n "a": "0",\n "b": "2"\n}', "must be 0..1 without gaps"),
        ('{\n "a": "0",\n "b" "1"\n}', ":3: malformed JSON"),
        ('["a", "b"]', ":1: expected a JSON object"),
    ],
)
def test_ssv2_labels_errors_name_file_and_line(tmp_path, content, needle):
    p = tmp_path / "something-something-v2-labels.json"
    p.write_text(content)
    with pytest.raises(GlitrError) as e:
        parse_ssv2_labels(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_ssv2_split_maps_templates_without_brackets(tmp_path):
    assert template_to_class("Putting [something] into [something]") == "Putting something into something"
    p = tmp_path / "train.json"
    p.write_text(
        json.dumps(
            [
                {"id": "12", "template": "Moving [something] up", "label": "moving a cup up"},
                {"id": 7, "template": "Holding [something]"},
            ],
            indent=1,
        )
    )
    entries = parse_ssv2_split(p, {"Holding something": 0, "Moving something up": 1})
    assert [(e.id, e.label) for e in entries] == [("12", 1), ("7", 0)]
    assert [e.line for e in entries] == [2, 7]  # the line where each entry starts
    test = tmp_path / "test.json"
    test.write_text('[{"id": "3"}, {"id": "4"}]')
    assert [(e.id, e.label) for e in parse_ssv2_split(test, None)] == [("3", None), ("4", None)]


@pytest.mark.parametrize(
    "entries, needle",
    [
        (
            '[\n{"id": "1", "template": "Holding [something]"},\n{"id": "2", "template": "Flying [something]"}\n]',
            ":3: template 'Flying [something]' (class 'Flying something') is not in the labels file",
        ),
        (
            '[\n{"id": "1", "template": "Holding [something]"},\n{"id": "1", "template": "Holding [something]"}\n]',
            ":3: video id '1' already listed on line 2",
        ),
        ('[\n{"id": "1"}\n]', ":2: video '1' has no \"template\""),
        ('[\n{"template": "Holding [something]"}\n]', ':2: expected "id"'),
        (
            '[\n{"id": "1", "template": "Holding [something]"}\n{"id": "2"}]',
            ":3: malformed JSON in SSv2 split file (expected ',' or ']')",
        ),
        ('{"id": "1"}', ":1: expected a JSON list"),
    ],
)
def test_ssv2_split_errors_name_file_and_line(tmp_path, entries, needle):
    p = tmp_path / "something-something-v2-train.json"
    p.write_text(entries)
    with pytest.raises(GlitrError) as e:
        parse_ssv2_split(p, {"Holding something": 0})
    assert str(e.value).startswith(str(p)) and needle in str(e.value)


def test_missing_label_file_is_named(tmp_path):
    with pytest.raises(GlitrError, match="not found"):
        parse_ssv2_labels(tmp_path / "nope.json")


def test_jester_classes_are_alphabetical_not_csv_order(tmp_path):
    labels = tmp_path / "jester-v1-labels.csv"
    labels.write_text("Swiping Left\nDoing other things\n\nZooming In With Two Fingers\nNo gesture\n")
    names = parse_jester_labels(labels)
    assert names == ["Doing other things", "No gesture", "Swiping Left", "Zooming In With Two Fingers"]
    idx = {n: i for i, n in enumerate(names)}
    train = tmp_path / "jester-v1-train.csv"
    train.write_text("34870;Swiping Left\n56557;No gesture\n")
    assert [(e.id, e.label) for e in parse_jester_split(train, idx)] == [("34870", 2), ("56557", 1)]
    test = tmp_path / "jester-v1-test.csv"
    test.write_text("1\n2\n")
    assert [(e.id, e.label) for e in parse_jester_split(test, None)] == [("1", None), ("2", None)]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("1;Swiping Left\n2;Swiping Up\n", ":2: class 'Swiping Up' is not in the labels file"),
        ("1;Swiping Left\n2\n", ":2: expected <id>;<class>, got '2'"),
        ("1;Swiping Left\n\n1;Swiping Left\n", ":3: video id '1' already listed on line 1"),
    ],
)
def test_jester_split_errors_name_file_and_line(tmp_path, content, needle):
    p = tmp_path / "jester-v1-validation.csv"
    p.write_text(content)
    with pytest.raises(GlitrError) as e:
        parse_jester_split(p, {"Swiping Left": 0})
    assert str(p) in str(e.value) and needle in str(e.value)


def test_tsm_list_round_trip_and_errors(tmp_path):
    recs = [VideoRecord("1", 40, 3), VideoRecord("22", 7, 0)]
    p = tmp_path / "train_videofolder.txt"
    write_list(p, recs)
    assert p.read_text() == "1 40 3\n22 7 0\n"
    assert read_list(p, num_classes=4) == recs
    assert format_list([VideoRecord("5", 9, None)]) == "5 9\n"
    p.write_text("1 40 3\n22 seven 0\n")
    with pytest.raises(GlitrError, match=r"train_videofolder.txt:2: expected integer"):
        read_list(p)
    p.write_text("1 40 3\n22 7 4\n")
    with pytest.raises(GlitrError, match=r":2: label 4 of video '22' is outside 0..3"):
        read_list(p, num_classes=4)
    p.write_text("1 0 3\n")
    with pytest.raises(GlitrError, match=r":1: video '1' has 0 frames"):
        read_list(p)


def test_categories_and_dataset_info(tmp_path):
    write_categories(tmp_path / "category.txt", ["b", "a"])
    assert (tmp_path / "category.txt").read_text() == "b\na\n"
    assert read_categories(tmp_path / "category.txt") == ["b", "a"]
    (tmp_path / "category.txt").write_text("b\n\na\n")
    with pytest.raises(GlitrError, match=r"category.txt:2: empty class name"):
        read_categories(tmp_path / "category.txt")
    assert read_dataset_info(tmp_path) is None
    write_dataset_info(tmp_path, DatasetInfo("jester", "/x/20bn-jester-v1", "%05d.jpg"))
    assert read_dataset_info(tmp_path) == DatasetInfo("jester", "/x/20bn-jester-v1", "%05d.jpg")
    (tmp_path / "glitr_dataset.json").write_text('{"name": "x", "template": "frame.jpg"}')
    with pytest.raises(GlitrError, match="one %d field"):
        read_dataset_info(tmp_path)
