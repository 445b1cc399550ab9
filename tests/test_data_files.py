"""Reading the real CS224N files: row counts, defects per reason, strict mode, checksums.

The expected counts are the data README's table; the independent reference for
what each row holds is Python's csv module over the whole file (`read_tsv`).
"""

import logging
import math

import pytest

from flaxpals.data import cs224n, paths, reader, tasks
from tests.conftest import read_tsv

# (task, split) -> data rows in the file (README table); all of them are kept but Quora train's.
ROWS = {("sst", "train"): 8544, ("sst", "dev"): 1101, ("sst", "test"): 2210,
        ("cfimdb", "train"): 1707, ("cfimdb", "dev"): 245, ("cfimdb", "test"): 488,
        ("quora", "train"): 16219, ("quora", "dev"): 1996,
        ("sts", "train"): 6040, ("sts", "dev"): 863, ("sts", "test"): 1725}


def _read(name, split, **kw):
    task = tasks.get_task(name)
    return reader.read_file(paths.data_dir() / task.split_source(split), task, split, **kw)


@pytest.mark.parametrize("name, split", sorted(ROWS))
def test_rows_match_the_file_and_csv_module(name, split):
    task = tasks.get_task(name)
    parsed = _read(name, split)
    raw = read_tsv(task.split_source(split))  # independent: csv over the whole file
    assert parsed.num_rows == len(raw) == ROWS[name, split]
    kept = [(i + 2, r) for i, r in enumerate(raw) if i + 2 not in {s[0] for s in parsed.skipped}]
    assert parsed.lines == [line for line, _ in kept]
    assert parsed.ids == [r["id"].strip() for _, r in kept]
    assert parsed.texts == [r[task.text_field].strip() for _, r in kept]
    if task.is_pair:
        assert parsed.text_pairs == [r[task.text_pair_field].strip() for _, r in kept]
    if split == "test":
        assert parsed.labels is None
    else:
        want = [float(r[task.label_field]) for _, r in kept]
        if task.is_regression:
            assert parsed.labels == want
        else:
            assert parsed.labels == [int(x) for x in want]
            assert all(type(x) is int for x in parsed.labels)


def test_quora_train_skips_exactly_its_two_unlabelled_rows():
    parsed = _read("quora", "train")
    raw = read_tsv("quora-train.csv")
    no_label = [i + 2 for i, r in enumerate(raw) if not r["is_duplicate"].strip()]
    no_sentence = [i + 2 for i, r in enumerate(raw)
                   if not r["sentence1"].strip() or not r["sentence2"].strip()]
    assert no_label == [2065, 11420] and no_sentence == [11420]
    assert parsed.skip_counts == {"empty_sentence": 1, "empty_label": 2}
    assert [(line, reasons) for line, reasons, _ in parsed.skipped] == [
        (2065, ("empty_label",)), (11420, ("empty_sentence", "empty_label"))]
    assert len(parsed) == 16217 and parsed.num_skipped == 2


@pytest.mark.parametrize("name, split", sorted(k for k in ROWS if k != ("quora", "train")))
def test_other_files_have_no_defective_row(name, split):
    parsed = _read(name, split, strict=True)
    assert parsed.skip_counts == {} and len(parsed) == ROWS[name, split]


def test_stray_quotes_are_decoded_the_csv_way_and_counted():
    parsed = _read("quora", "train")
    # Raw field: """Which is correct grammar: ... Do I need """"the"""" here?"""
    assert parsed.texts[0].startswith('"Which is correct grammar')
    assert parsed.texts[0].endswith('Do I need ""the"" here?"')
    sts = _read("sts", "train")
    raw = read_tsv("sts-train.csv")
    odd = sum(1 for r in raw if r["sentence1"].count('"') % 2 or r["sentence2"].count('"') % 2)
    assert sts.notes == {"stray_quote": odd} and odd > 0


def test_test_student_files_parse_with_their_ids_despite_the_header():
    for name, first in (("sst", "b7573736a6ddf7be102b7fee0"),
                        ("cfimdb", "c916d7750936543cf3a109be1")):
        task = tasks.get_task(name)
        header = (paths.data_dir() / task.split_source("test")).read_text().split("\n")[0]
        assert header.split("\t") == ["0", "", "id", "sentence"]
        parsed = _read(name, "test")
        assert parsed.ids[0] == first and parsed.notes == {"odd_header": 1}
        assert all(len(i) == 25 for i in parsed.ids)


def test_strict_mode_names_file_line_and_reason():
    with pytest.raises(reader.DataFormatError) as e:
        _read("quora", "train", strict=True)
    assert (e.value.line, e.value.reason) == (2065, "empty_label")
    assert e.value.path.endswith("quora-train.csv")
    assert "quora-train.csv:2065: empty_label" in str(e.value)


DEFECTS = (
    "\tid\tsentence\tsentiment\n"          # line 1
    "0\ta1\tfine\t3\n"                     # 2 kept
    "1\ta2\t\"unterminated\t2\n"           # 3 bad_quoting
    "2\ta3\ttoo\tmany\t1\n"                # 4 wrong_column_count
    "\tid\tsentence\tsentiment\n"          # 5 header_row
    "4\t\tno id\t1\n"                      # 6 empty_id
    "5\ta1\tdup id\t1\n"                   # 7 duplicate_id
    "6\ta7\t   \t1\n"                      # 8 empty_sentence
    "7\ta8\tno label\t\n"                  # 9 empty_label
    "8\ta9\tword label\tgood\n"            # 10 bad_label
    "9\ta10\thalf label\t1.5\n"            # 11 bad_label
    "10\ta11\ttoo high\t5\n"               # 12 label_out_of_range
    "11\ta12\tnegative\t-1\n"              # 13 label_out_of_range
    "\n"                                   # 14 blank_line
    "13\ta14\t\"quoted \"\"ok\"\"\"\t4.0\n"  # 15 kept, label 4
    "14\ta15\t\xff\t1\n"                   # 16 bad_encoding (written as a raw byte)
)


def _defects_file(tmp_path):
    path = tmp_path / "defects.tsv"
    path.write_bytes(DEFECTS.encode("utf-8").replace("\xff".encode(), b"\xff"))
    return path


def test_every_defect_is_skipped_and_counted_never_clipped(tmp_path, caplog):
    path = _defects_file(tmp_path)
    task = tasks.get_task("sst")
    with caplog.at_level(logging.INFO, logger="flaxpals.data.reader"):
        parsed = reader.read_file(path, task, "train")
    assert parsed.ids == ["a1", "a14"] and parsed.labels == [3, 4]
    assert parsed.texts[1] == 'quoted "ok"'
    assert parsed.skip_counts == {
        "bad_encoding": 1, "bad_quoting": 1, "blank_line": 1, "wrong_column_count": 1,
        "header_row": 1, "empty_id": 1, "duplicate_id": 1, "empty_sentence": 1,
        "empty_label": 1, "bad_label": 2, "label_out_of_range": 2}
    assert parsed.num_rows == 15 and parsed.num_skipped == 13
    assert [line for line, _, _ in parsed.skipped] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                       14, 16]
    loud = [r for r in caplog.records if "out of range" in r.getMessage()]
    assert loud and loud[0].levelno == logging.WARNING and "[12, 13]" in loud[0].getMessage()
    with pytest.raises(reader.DataFormatError, match=r"defects.tsv:3: bad_quoting"):
        reader.read_file(path, task, "train", strict=True)


def test_regression_range_is_checked_not_clipped(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text("id\tsentence1\tsentence2\tsimilarity\n"
                    "a\tx\ty\t5.0\nb\tx\ty\t5.2\nc\tx\ty\tnan\nd\tx\ty\t0\n")
    parsed = reader.read_file(path, tasks.get_task("sts"), "dev")
    assert parsed.ids == ["a", "d"] and parsed.labels == [5.0, 0.0]
    assert parsed.skip_counts == {"bad_label": 1, "label_out_of_range": 1}
    assert not any(math.isnan(x) for x in parsed.labels)


def test_a_missing_column_always_raises(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("id\ttext\tsentiment\na\tb\t1\n")
    with pytest.raises(reader.DataFormatError, match=r"bad.tsv:1: bad_header: no column "
                                                     r"'sentence'"):
        reader.read_file(path, tasks.get_task("sst"), "train")
    path.write_text("id\tsentence\na\tb\n")  # train needs its label column, test does not
    with pytest.raises(reader.DataFormatError, match="no column 'sentiment'"):
        reader.read_file(path, tasks.get_task("sst"), "train")
    assert reader.read_file(path, tasks.get_task("sst"), "test").labels is None


def test_config_csv_task_with_commas_and_label_names(tmp_path):
    (tmp_path / "r.csv").write_text('body,stars\n"great, really",good\nmeh,ok\nawful,bad\n'
                                    "odd,excellent\n")
    task = tasks.task_from_config({
        "name": "reviews", "kind": "classification", "num_labels": 3,
        "files": {"train": str(tmp_path / "r.csv")}, "label_names": ["bad", "ok", "good"],
        "fields": {"id": None, "text": "body", "label": "stars"}})
    parsed = reader.read_file(cs224n.locate(task, "train"), task, "train")
    assert parsed.texts == ["great, really", "meh", "awful"]
    assert parsed.labels == [2, 1, 0] and parsed.ids == ["train-2", "train-3", "train-4"]
    assert parsed.skip_counts == {"bad_label": 1}


def test_checksums(tmp_path, caplog):
    d = paths.data_dir()
    assert cs224n.verify(d / "ids-sst-train.csv") == "official"
    assert "stand-in" in cs224n.verify(d / "quora-train.csv")
    for name in ("ids-sst-dev.csv", "sts-dev.csv"):  # SHA256SUMS declares them too
        assert cs224n.verify(d / name) == "official"
    bad = tmp_path / "ids-sst-dev.csv"
    bad.write_bytes((d / "ids-sst-dev.csv").read_bytes().replace(b"lovely", b"lousy", 1))
    with caplog.at_level(logging.WARNING):
        assert cs224n.verify(bad) == "unknown"
    assert "not a known version of ids-sst-dev.csv" in caplog.text
    (tmp_path / "SHA256SUMS").write_text(
        (d / "SHA256SUMS").read_text())  # declares the original checksum
    with pytest.raises(cs224n.ChecksumError, match="modified or damaged"):
        cs224n.verify(bad)


def test_download_from_a_url_verifies_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(cs224n.URL_ENV_VAR, paths.data_dir().as_uri())
    got = cs224n.download("sts-dev.csv", tmp_path)
    assert got.read_bytes() == (paths.data_dir() / "sts-dev.csv").read_bytes()
    monkeypatch.setenv(cs224n.URL_ENV_VAR, (tmp_path / "nowhere").as_uri())
    with pytest.raises(FileNotFoundError, match="could not download"):
        cs224n.download("sts-train.csv", tmp_path)
    assert not list(tmp_path.glob("tmp*"))  # no partial file left behind


def test_offline_without_a_data_dir_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ENV_VAR, raising=False)
    monkeypatch.setattr(paths, "_candidates", lambda: [])
    monkeypatch.setenv(paths.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(cs224n.URL_ENV_VAR, (tmp_path / "nowhere").as_uri() + "/")
    with pytest.raises(FileNotFoundError) as e:
        cs224n.locate(tasks.get_task("sst"), "dev")
    assert str(e.value).startswith("no CS224N data directory found: set FLAXPALS_DATA_DIR or "
                                   "--config.data.data_dir; looked for")
    assert "; and could not download" in str(e.value) and "\n" not in str(e.value)


def test_locate_without_a_data_dir_downloads_into_the_cache(tmp_path, monkeypatch):
    real = paths.data_dir()
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "absent"))
    monkeypatch.setenv(paths.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(cs224n.URL_ENV_VAR, real.as_uri())
    got = cs224n.locate(tasks.get_task("sts"), "dev")
    assert got == tmp_path / "cache" / "cs224n" / "sts-dev.csv"
    assert got.read_bytes() == (real / "sts-dev.csv").read_bytes()
    with pytest.raises(FileNotFoundError, match="absent"):  # an explicit directory must exist
        cs224n.locate(tasks.get_task("sts"), "dev", data_dir=tmp_path / "absent")


def test_missing_quora_test_file_says_why():
    with pytest.raises(FileNotFoundError, match="stand-in without a test file"):
        cs224n.locate(tasks.get_task("quora"), "test")


def test_a_split_with_every_row_skipped_is_a_data_error(tok):
    """Once a bare ValueError (a traceback from the CLI); now the error users are shown
    in one line, naming the file and what was skipped."""
    from flaxpals.data import input_pipeline

    records = [(2, "a", "", None, "1"), (3, "b", "fine", None, "")]  # empty text, no label
    parsed = reader.read_records(records, tasks.get_task("sst"), "dev", "my.csv",
                                 labelled=True)
    with pytest.raises(reader.DataFormatError,
                       match=r"^my\.csv: no usable example: every row skipped \(.*empty"):
        input_pipeline.split_from_parsed(tasks.get_task("sst"), "dev", parsed, tok)
