"""bAbI: reading the release (folder, root, archive), format errors, the DNC paper's encoding,
the vocabulary, the seeded split, length-bucketed batches and the per-task score. The tests
write their own bAbI files; one reads the real release when SPARSEMEM_BABI_DIR names it."""

import os
import re
import tarfile
from pathlib import Path

import pytest
import torch

from sparsemem.tasks.babi import (
    ANSWER_ID,
    PAD_ID,
    UNKNOWN_ID,
    BabiFormatError,
    BabiScore,
    MissingTrainingFile,
    Question,
    Statement,
    Story,
    Vocabulary,
    answer_loss,
    bucket_batches,
    collate,
    encode_story,
    load_babi,
    split_stories,
)

QA1 = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Daniel went back to the hallway.
5 Where is Daniel? \thallway\t4
1 Sandra travelled to the office.
2 Where is Sandra? \toffice\t1
"""
QA8 = """1 Mary got the football there.
2 Mary took the apple there.
3 What is Mary carrying? \tfootball,apple\t1 2
"""
QA1_TEST = """1 Bill moved to the kitchen.
2 Where is Bill? \tkitchen\t1
"""


def write_set(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def small_set(folder: Path, train_qa1: str = QA1) -> Path:
    return write_set(
        folder,
        {
            "qa1_single-supporting-fact_train.txt": train_qa1,
            "qa1_single-supporting-fact_test.txt": QA1_TEST,
            "qa8_lists-sets_train.txt": QA8,
            "qa8_lists-sets_test.txt": QA8,
        },
    )


def release(root: Path) -> Path:
    """A release root: en/ complete, en-10k/ without qa8's training file (as qa3 is missing)."""
    small_set(root / "en")
    small_set(root / "en-10k", train_qa1=QA1 + QA1)
    (root / "en-10k" / "qa8_lists-sets_train.txt").unlink()
    return root


def test_reads_a_folder_with_its_stories_answers_and_supporting_facts(tmp_path):
    data = load_babi(small_set(tmp_path / "en"), tasks=[1, 8])
    assert sorted(data.train) == [1, 8] and data.fallback == []
    first, second = data.train[1]
    assert len(data.train[1]) == 2 and len(data.test[1]) == 1
    assert first.lines[0] == Statement(1, ("mary", "moved", "to", "the", "bathroom", "."))
    assert first.questions == [
        Question(3, ("where", "is", "mary", "?"), ("bathroom",), (1,)),
        Question(5, ("where", "is", "daniel", "?"), ("hallway",), (4,)),
    ]
    assert first.source.endswith("qa1_single-supporting-fact_train.txt:1") and second.source.endswith(":6")
    # Task 8's several answer words, and several supporting facts.
    (story,) = data.train[8]
    assert story.questions[0].answers == ("football", "apple") and story.questions[0].supporting == (1, 2)


def test_reads_a_release_root_and_falls_back_to_1k_only_when_asked(tmp_path):
    root = release(tmp_path / "tasks_1-20_v1-2")
    assert len(load_babi(root, tasks=[1], babi_set="en").train[1]) == 2
    assert len(load_babi(root, tasks=[1]).train[1]) == 4  # en-10k by default
    missing_8 = r"task 8 \(qa8_\*_train\.txt\) in .*en-10k.*fallback_1k=True"
    with pytest.raises(MissingTrainingFile, match=missing_8) as missing:
        load_babi(root, tasks=[1, 8])
    assert isinstance(missing.value, FileNotFoundError) and missing.value.task == 8
    assert missing.value.spare.endswith(f"{root / 'en'}") and str(missing.value).endswith(f"reads {root / 'en'}'s")
    data = load_babi(root, tasks=[1, 8], fallback_1k=True)
    assert data.fallback == [8] and data.train[8][0].source.startswith(str(root / "en" / "qa8"))
    assert len(data.train[1]) == 4 and data.test[8][0].source.startswith(str(root / "en-10k"))
    # With en/'s file gone too, the fallback has nothing to read: the error names both folders.
    (root / "en" / "qa8_lists-sets_train.txt").unlink()
    with pytest.raises(MissingTrainingFile, match=r"task 8 .* in .*en-10k nor in .*en$") as missing:
        load_babi(root, tasks=[1, 8], fallback_1k=True)
    assert missing.value.spare is None


def test_reads_the_archive_without_unpacking(tmp_path):
    root = release(tmp_path / "tasks_1-20_v1-2")
    archive = tmp_path / "tasks_1-20_v1-2.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    for path in root.rglob("*.txt"):
        path.unlink()
    from_archive = load_babi(archive, tasks=[1, 8], fallback_1k=True)
    assert from_archive.fallback == [8] and len(from_archive.train[1]) == 4
    assert from_archive.train[8][0].source == f"{archive}:tasks_1-20_v1-2/en/qa8_lists-sets_train.txt:1"
    with pytest.raises(FileNotFoundError, match="task 8"):
        load_babi(archive, tasks=[8])


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("1 Mary went home.\nMary went home.\n", 2, "expected 'ID text'"),
        ("2 Mary went home.\n", 1, "first line must have ID 1"),
        ("1 Mary went home.\n3 Where is Mary?\thome\t1\n", 2, "ID 3 follows 1"),
        ("1 Mary went home.\n2 Where is Mary?\thome\n", 2, "2 tab-separated fields"),
        ("1 Mary went home.\n2 Where is Mary?\t\t1\n", 2, "answers must be"),
        ("1 Mary went home.\n2 Where is Mary?\thome,\t1\n", 2, "answers must be"),
        ("1 Mary went home.\n2 Where is Mary?\thome\tone\n", 2, "supporting facts must be"),
        ("1 Mary went home.\n2 Where is Mary?\thome\t2\n", 2, r"supporting facts \[2\] are not statements"),
        ("1 Mary went home.\n2 \n", 2, "no words"),
        ("", 0, "no stories"),
    ],
)
def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path, text, line, what):
    folder = small_set(tmp_path / "en", train_qa1=text)
    where = f"qa1_single-supporting-fact_train.txt:{line}: " if line else "qa1_single-supporting-fact_train.txt: "
    with pytest.raises(BabiFormatError, match=re.escape(where) + ".*" + what):
        load_babi(folder, tasks=[1])


def test_missing_files_and_paths_are_errors_naming_them(tmp_path):
    folder = small_set(tmp_path / "en")
    (folder / "qa1_single-supporting-fact_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=rf"test file for task 1 \(qa1_\*_test\.txt\) in {folder}"):
        load_babi(folder, tasks=[1])
    with pytest.raises(FileNotFoundError, match="no bAbI data at"):
        load_babi(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither a bAbI release root"):
        load_babi(tmp_path, babi_set="en-10k")
    (folder / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"not a \.tar\.gz"):
        load_babi(folder / "notes.txt")
    with pytest.raises(ValueError, match=r"numbers in 1\.\.20"):
        load_babi(folder, tasks=[21])


def story(*lines: Statement | Question, task: int = 1) -> Story:
    return Story(task, lines, "test:1")


def test_a_story_is_encoded_token_by_token():
    tiny = story(
        Statement(1, ("mary", "went", "home", ".")),
        Question(2, ("where", "is", "mary", "?"), ("home",), (1,)),
        Question(3, ("what", "?"), ("home", "mary"), (1,)),
    )
    vocabulary = Vocabulary.build([tiny])
    assert vocabulary.words == ["<pad>", "<unk>", "-", ".", "?", "home", "is", "mary", "went", "what", "where"]
    encoded = encode_story(tiny, vocabulary)
    words = [vocabulary.words[i] for i in encoded.tokens.tolist()]
    assert words == ["mary", "went", "home", ".", "where", "is", "mary", "?", "-", "what", "?", "-", "-"]
    assert [vocabulary.words[i] for i in encoded.targets.tolist()] == ["<pad>"] * 8 + ["home"] + ["<pad>"] * 2 + [
        "home",
        "mary",
    ]
    assert encoded.question.tolist() == [-1] * 8 + [0, -1, -1, 1, 1]
    assert encoded.tokens.dtype == encoded.targets.dtype == torch.int64 and len(encoded) == 13


def test_the_vocabulary_round_trips_and_maps_unseen_words_to_unknown(tmp_path):
    data = load_babi(small_set(tmp_path / "en"), tasks=[1, 8])
    vocabulary = Vocabulary.build(s for stories in data.train.values() for s in stories)
    saved = tmp_path / "vocabulary.pt"
    torch.save({"vocabulary": vocabulary.to_dict()}, saved)
    again = Vocabulary.from_dict(torch.load(saved, weights_only=True)["vocabulary"])
    assert again == vocabulary and again.words[:3] == ["<pad>", "<unk>", "-"]
    assert again.words[3:] == sorted(again.words[3:])
    # "bill" and "kitchen" appear only in the test file.
    encoded = encode_story(data.test[1][0], again)
    assert encoded.tokens[0] == UNKNOWN_ID and encoded.targets[-1] == UNKNOWN_ID
    assert encoded.tokens[-1] == ANSWER_ID and again.id("mary") != UNKNOWN_ID
    with pytest.raises(ValueError, match="followed by distinct words"):
        Vocabulary(["<pad>", "-", "<unk>", "mary"])


def numbered_stories(n: int, task: int) -> list[Story]:
    return [Story(task, (Statement(1, ("a",) * (i + 1)),), f"test:{i}") for i in range(n)]


def test_the_split_is_seeded_disjoint_and_complete():
    stories = {1: numbered_stories(200, 1), 2: numbered_stories(50, 2)}
    train, validation = split_stories(stories, seed=3)
    again, _ = split_stories({1: stories[1]}, seed=3)
    other, _ = split_stories(stories, seed=4)
    assert len(validation[1]) == 20 and len(validation[2]) == 5
    for task in stories:
        names = [s.source for s in train[task]]
        held_out = [s.source for s in validation[task]]
        assert not set(names) & set(held_out) and sorted(names + held_out) == sorted(s.source for s in stories[task])
    assert train[1] == again[1] and train[1] != other[1]


def test_buckets_keep_padding_small_and_lose_no_sequence():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (3000,), generator=generator).tolist()
    for batches in (bucket_batches(lengths, 32, generator), bucket_batches(lengths, 32)):
        assert sorted(i for batch in batches for i in batch) == list(range(3000))
        assert sorted(map(len, batches)) == [3000 % 32] + [32] * (3000 // 32)
        padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
        # A random batching pads about 45% of the steps here; the pools keep it under 3%.
        assert padded / sum(lengths) < 1.03
    assert bucket_batches(lengths, 32, torch.Generator().manual_seed(1)) == bucket_batches(
        lengths, 32, torch.Generator().manual_seed(1)
    )


def scored_batch() -> tuple:
    first = story(
        Statement(1, ("mary", "went", "home", ".")),
        Question(2, ("where", "?"), ("home",), (1,)),
        Question(3, ("what", "?"), ("home", "mary"), (1,)),
    )
    second = story(Question(1, ("where", "?"), ("mary",), (1,)), task=8)
    vocabulary = Vocabulary.build([first, second])
    batch = collate([encode_story(first, vocabulary), encode_story(second, vocabulary)])
    return batch, vocabulary


def test_collate_pads_with_zero():
    batch, _ = scored_batch()
    assert batch.tokens.shape == batch.targets.shape == batch.mask.shape == (2, 11)
    assert batch.lengths.tolist() == [11, 3] and batch.tasks.tolist() == [1, 8]
    assert (batch.tokens[1, 3:] == PAD_ID).all() and not batch.mask[1, 3:].any()
    assert batch.mask.sum() == 4 and batch.mask.dtype == torch.bool


def test_the_score_needs_every_answer_word_right():
    batch, vocabulary = scored_batch()
    logits = torch.nn.functional.one_hot(batch.targets, len(vocabulary)).float()
    score = BabiScore()
    score.update(logits, batch)
    assert score.errors() == {1: 0.0, 8: 0.0}
    assert answer_loss(logits * 100, batch) < 1e-6
    # One of the two answer words of the story's second question wrong: that question is wrong.
    logits[0, 10] = torch.nn.functional.one_hot(torch.tensor(vocabulary.id("where")), len(vocabulary))
    score = BabiScore()
    score.update(logits, batch)
    score.update(logits, batch)
    assert score.questions == {1: 4, 8: 2} and score.wrong == {1: 2, 8: 0}
    assert score.errors() == {1: 0.5, 8: 0.0} and score.mean_error() == 0.25


def test_an_unknown_target_is_never_right():
    batch, vocabulary = scored_batch()
    batch.targets[1, 2] = UNKNOWN_ID
    score = BabiScore()
    score.update(torch.nn.functional.one_hot(batch.targets, len(vocabulary)).float(), batch)
    assert score.errors() == {1: 0.0, 8: 1.0}


@pytest.mark.skipif(not os.environ.get("SPARSEMEM_BABI_DIR"), reason="SPARSEMEM_BABI_DIR names no bAbI release")
def test_the_real_release_has_its_question_counts():
    root = Path(os.environ["SPARSEMEM_BABI_DIR"])
    with pytest.raises(FileNotFoundError, match=r"task 3 \(qa3_\*_train\.txt\)"):
        load_babi(root, tasks=[3], babi_set="en-10k")
    for babi_set, train_questions in (("en", 1000), ("en-10k", 10000)):
        data = load_babi(root, babi_set=babi_set, fallback_1k=True)
        assert data.fallback == ([3] if babi_set == "en-10k" else [])
        for task in range(1, 21):
            assert sum(len(s.questions) for s in data.test[task]) == 1000, (babi_set, task)
            expected = 1000 if task in data.fallback else train_questions
            assert sum(len(s.questions) for s in data.train[task]) == expected, (babi_set, task)
