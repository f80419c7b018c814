"""bAbI (Weston et al. 2015): the 20 question-answering tasks, read from the release and encoded
as in the DNC paper (Graves et al. 2016, Methods).

The reader takes a path the user names, and no other: the release root (`tasks_1-20_v1-2/`,
holding `en/` and `en-10k/`), one folder of `qa{n}_*_train.txt` / `qa{n}_*_test.txt` files, or
the release's `.tar.gz` archive, read member by member without unpacking.

File format: lines "ID text", ID counting from 1 within a story and restarting at 1 for the
next; a question line is "ID question?<TAB>answers<TAB>supporting IDs", several answer words
(tasks 8 and 19) separated by commas.

Encoding: a story with all its questions is one sequence of T steps, one token per step:
lower-cased words and punctuation marks, each question followed by one answer-marker step
('-') per answer word. The targets are the answer words at the marker steps; the loss and
the error count only those steps (`mask`).
"""

import dataclasses
import functools
import re
import tarfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TASK_NUMBERS = tuple(range(1, 21))
SETS = ("en", "en-10k")
"""The English sets: 1,000 and 10,000 training questions per task (the same test files)."""

PAD, UNKNOWN, ANSWER = "<pad>", "<unk>", "-"
PAD_ID, UNKNOWN_ID, ANSWER_ID = 0, 1, 2
RESERVED = (PAD, UNKNOWN, ANSWER)
"""Tokens every vocabulary starts with, at ids 0, 1, 2."""

_TOKEN = re.compile(r"\w+|[^\w\s]")
_LINE = re.compile(r"(\d+) (.*)", re.ASCII)
_ANSWERS = re.compile(r"\s*\w+(,\w+)*\s*")
_FILE = re.compile(r"qa(\d+)_[^/]*_(train|test)\.txt", re.ASCII)


class BabiFormatError(ValueError):
    """A bAbI file that does not follow the format; the message names the file and line."""


@functools.lru_cache(maxsize=1 << 16)
def tokenize(text: str) -> tuple[str, ...]:
    """Lower-cased words and punctuation marks, one token each: 'Where is Mary?' -> where is mary ?"""
    # Cached: bAbI's lines repeat (a story's questions, the few verbs and places), and reading
    # the 10k set tokenises a million of them.
    return tuple(_TOKEN.findall(text.lower()))


@dataclasses.dataclass(frozen=True)
class Statement:
    """A story line: its ID in the story and its tokens."""

    id: int
    words: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Question:
    """A question line: its ID, its tokens (ending in '?'), its answer words (one, or several
    in tasks 8 and 19) and the IDs of the statements that support the answer."""

    id: int
    words: tuple[str, ...]
    answers: tuple[str, ...]
    supporting: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Story:
    """One story of task `task`: its statements and questions in file order; `source` is
    "file:line" of its first line."""

    task: int
    lines: tuple[Statement | Question, ...]
    source: str

    @property
    def questions(self) -> list[Question]:
        return [line for line in self.lines if isinstance(line, Question)]


def parse_stories(lines: Iterable[str], name: str, task: int) -> list[Story]:
    """The stories of one bAbI file, given its lines; `name` is what errors call the file.

    Raises BabiFormatError "name:line: what is wrong" at the first line that breaks the format:
    no "ID text", an ID that neither starts a story (1) nor follows the previous one, a field
    count other than 1 (statement) or 3 (question), an empty answer, supporting IDs that are
    not statements earlier in the story, or no line at all.
    """
    stories: list[Story] = []
    story: list[Statement | Question] = []
    source = ""
    statements: set[int] = set()
    for number, raw in enumerate(lines, start=1):
        where = f"{name}:{number}"
        line = raw.rstrip("\r\n")
        match = _LINE.fullmatch(line)
        if match is None:
            raise BabiFormatError(f"{where}: expected 'ID text'; got {line!r}")
        id_, fields = int(match[1]), match[2].split("\t")
        if id_ == 1:
            if story:
                stories.append(Story(task, tuple(story), source))
            story, source, statements = [], where, set()
        elif not story:
            raise BabiFormatError(f"{where}: a file's first line must have ID 1; got {id_}")
        elif id_ != story[-1].id + 1:
            raise BabiFormatError(f"{where}: ID {id_} follows {story[-1].id}; expected {story[-1].id + 1} or 1")
        words = tokenize(fields[0])
        if not words:
            raise BabiFormatError(f"{where}: no words in {line!r}")
        if len(fields) == 1:
            story.append(Statement(id_, words))
            statements.add(id_)
        elif len(fields) == 3:
            story.append(Question(id_, words, _answers(fields[1], where), _supporting(fields[2], statements, where)))
        else:
            raise BabiFormatError(
                f"{where}: expected a statement or 'question<TAB>answers<TAB>supporting IDs'; "
                f"got {len(fields)} tab-separated fields in {line!r}"
            )
    if not story:
        raise BabiFormatError(f"{name}: no stories (empty file)")
    stories.append(Story(task, tuple(story), source))
    return stories


def _answers(field: str, where: str) -> tuple[str, ...]:
    if _ANSWERS.fullmatch(field) is None:
        raise BabiFormatError(f"{where}: answers must be one or more comma-separated words; got {field!r}")
    return tuple(field.strip().lower().split(","))


def _supporting(field: str, statements: set[int], where: str) -> tuple[int, ...]:
    ids = field.split()
    if not ids or not all(id_.isascii() and id_.isdigit() for id_ in ids):
        raise BabiFormatError(f"{where}: supporting facts must be one or more line IDs; got {field!r}")
    supporting = tuple(int(id_) for id_ in ids)
    unknown = [id_ for id_ in supporting if id_ not in statements]
    if unknown:
        raise BabiFormatError(f"{where}: supporting facts {unknown} are not statements earlier in this story")
    return supporting


# ---------------------------------------------------------------------------------------------
# Reading the release


@dataclasses.dataclass(frozen=True)
class _File:
    name: str
    read: Callable[[], bytes]


_Catalogue = dict[tuple[int, str], list[_File]]
"""The files of one folder by (task, "train" | "test")."""


class MissingTrainingFile(FileNotFoundError):
    """A task has no training file in the set read. `spare`: the en/ folder that has one, which
    fallback_1k=True would read (None when it was read already, or there is none), so a caller
    can say how its own users ask for the fallback (train's --babi-fallback-1k)."""

    def __init__(self, task: int, where: str, spare: str | None, fallback_option: str = "fallback_1k=True") -> None:
        self.task, self.where, self.spare = task, where, spare
        hint = f"; {fallback_option} reads {spare}'s" if spare else ""
        super().__init__(f"no training file for task {task} (qa{task}_*_train.txt) in {where}{hint}")


@dataclasses.dataclass
class BabiData:
    """Stories by task number. `fallback`: the tasks whose training stories come from en/
    (1k) because the requested set has no training file for them (en-10k's task 3)."""

    train: dict[int, list[Story]]
    test: dict[int, list[Story]]
    fallback: list[int]


def load_babi(
    path: str | Path, tasks: Iterable[int] = TASK_NUMBERS, babi_set: str = "en-10k", fallback_1k: bool = False
) -> BabiData:
    """Read the training and test stories of `tasks` (numbers 1..20) from `path`:

    - the release root (a folder holding en/ and en-10k/): reads the folder `babi_set`;
    - a folder of qa{n}_*_train.txt and qa{n}_*_test.txt files: reads it (`babi_set` unused);
    - the release archive (.tar.gz, .tgz, .tar): reads the members in folders named `babi_set`.

    A missing test file is a FileNotFoundError, a missing training file a MissingTrainingFile
    (a FileNotFoundError). fallback_1k=True instead reads a
    missing training file from the en/ folder beside the one read (in the archive: a folder
    named en) and lists its task in `BabiData.fallback`.
    """
    tasks = sorted(set(tasks))
    if not tasks or not set(tasks) <= set(TASK_NUMBERS):
        raise ValueError(f"tasks must be numbers in 1..20; got {tasks}")
    if babi_set not in SETS:
        raise ValueError(f"babi_set must be one of {SETS}; got {babi_set!r}")
    (main, where), (spare, spare_where) = _sources(Path(path), tasks, babi_set, fallback_1k)
    train: dict[int, list[Story]] = {}
    test: dict[int, list[Story]] = {}
    fallback = []
    for task in tasks:
        test_file = _pick(main, task, "test", where)
        if test_file is None:
            raise FileNotFoundError(f"no test file for task {task} (qa{task}_*_test.txt) in {where}")
        train_file = _pick(main, task, "train", where)
        if train_file is None and fallback_1k and spare_where:
            train_file = _pick(spare, task, "train", spare_where)
            fallback.append(task)
        if train_file is None:
            if fallback_1k and spare_where:
                raise MissingTrainingFile(task, f"{where} nor in {spare_where}", None)
            raise MissingTrainingFile(task, where, spare_where or None)
        train[task] = _parse_file(train_file, task)
        test[task] = _parse_file(test_file, task)
    return BabiData(train, test, fallback)


def _sources(
    path: Path, tasks: list[int], babi_set: str, fallback_1k: bool
) -> tuple[tuple[_Catalogue, str], tuple[_Catalogue, str | None]]:
    """The files to read and where (for messages), then the en/ files a missing training file
    falls back to and where (None when there is no en/ apart from the folder read)."""
    if not path.exists():
        raise FileNotFoundError(f"no bAbI data at {path}")
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise ValueError(f"{path} is a file but not a .tar.gz / .tgz / .tar archive of the bAbI release")
        folders = _archive(path, tasks, {babi_set, "en"} if fallback_1k else {babi_set})
        spare_where = f"{path} (folder en)" if babi_set != "en" else None
        return (folders.get(babi_set, {}), f"{path} (folder {babi_set})"), (folders.get("en", {}), spare_where)
    folder = path if any(path.glob("qa*_t*.txt")) else path / babi_set
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{path} is neither a bAbI release root (holding {babi_set}/) nor a folder of "
            "qa*_train.txt / qa*_test.txt files"
        )
    spare = folder.parent / "en"
    if not spare.is_dir() or spare.resolve() == folder.resolve():
        return (_folder(folder), str(folder)), ({}, None)
    return (_folder(folder), str(folder)), (_folder(spare) if fallback_1k else {}, str(spare))


def _folder(folder: Path) -> _Catalogue:
    catalogue: _Catalogue = {}
    for file in sorted(folder.iterdir()):
        match = _FILE.fullmatch(file.name)
        if match and file.is_file():
            catalogue.setdefault((int(match[1]), match[2]), []).append(_File(str(file), file.read_bytes))
    return catalogue


def _archive(path: Path, tasks: list[int], folders: set[str]) -> dict[str, _Catalogue]:
    """One streaming pass over the archive, keeping the bytes of the wanted members only."""
    catalogues: dict[str, _Catalogue] = {}
    with tarfile.open(path, "r|*") as archive:
        for member in archive:
            name = PurePosixPath(member.name)
            match = _FILE.fullmatch(name.name)
            if not (member.isfile() and match and int(match[1]) in tasks and name.parent.name in folders):
                continue
            data = archive.extractfile(member).read()
            file = _File(f"{path}:{member.name}", lambda data=data: data)
            catalogues.setdefault(name.parent.name, {}).setdefault((int(match[1]), match[2]), []).append(file)
    return catalogues


def _pick(catalogue: _Catalogue, task: int, split: str, where: str) -> _File | None:
    files = catalogue.get((task, split), [])
    if len(files) > 1:
        names = ", ".join(file.name for file in files)
        raise BabiFormatError(f"{where} has {len(files)} {split} files for task {task}: {names}")
    return files[0] if files else None


def _parse_file(file: _File, task: int) -> list[Story]:
    data = file.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise BabiFormatError(f"{file.name}:{line}: not UTF-8 text ({error.reason})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return parse_stories(lines, file.name, task)


def split_stories(
    stories: dict[int, list[Story]], fraction: float = 0.1, seed: int = 0
) -> tuple[dict[int, list[Story]], dict[int, list[Story]]]:
    """(train, validation): round(fraction * n) of each task's n stories held out for validation,
    drawn from `seed` and the task number only (so a task's split does not depend on which other
    tasks are loaded); both keep file order."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1); got {fraction}")
    train: dict[int, list[Story]] = {}
    validation: dict[int, list[Story]] = {}
    for task, task_stories in stories.items():
        held_out = set(
            np.random.default_rng([seed, task]).permutation(len(task_stories))[: round(fraction * len(task_stories))]
        )
        train[task] = [story for i, story in enumerate(task_stories) if i not in held_out]
        validation[task] = [story for i, story in enumerate(task_stories) if i in held_out]
    return train, validation


# ---------------------------------------------------------------------------------------------
# Encoding


class Vocabulary:
    """Token ids: PAD_ID 0, UNKNOWN_ID 1, ANSWER_ID 2, then the words of the training stories
    sorted. A word it does not hold (seen only at test time) is UNKNOWN_ID."""

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        if tuple(words[: len(RESERVED)]) != RESERVED or len(set(words)) != len(words):
            raise ValueError(f"a vocabulary is {list(RESERVED)} followed by distinct words; got {words[:5]}...")
        self.words = words
        self._ids = {word: id_ for id_, word in enumerate(words)}

    @classmethod
    def build(cls, stories: Iterable[Story]) -> "Vocabulary":
        """Every token and answer word of `stories` (pass the training stories only)."""
        seen: set[str] = set()
        for story in stories:
            for line in story.lines:
                seen.update(line.words)
                if isinstance(line, Question):
                    seen.update(line.answers)
        if seen & set(RESERVED):
            raise ValueError(f"the stories use the reserved tokens {sorted(seen & set(RESERVED))}")
        return cls([*RESERVED, *sorted(seen)])

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def id(self, word: str) -> int:
        return self._ids.get(word, UNKNOWN_ID)

    def encode(self, words: Iterable[str]) -> list[int]:
        """The words' ids, UNKNOWN_ID for words it does not hold."""
        ids = self._ids
        return [ids.get(word, UNKNOWN_ID) for word in words]

    def to_dict(self) -> dict[str, list[str]]:
        """Plain lists and strings, so a weights_only checkpoint holds it."""
        return {"words": list(self.words)}

    @classmethod
    def from_dict(cls, data: dict[str, list[str]]) -> "Vocabulary":
        return cls(data["words"])


@dataclasses.dataclass(frozen=True)
class EncodedStory:
    """One story with its questions as one sequence of T steps. tokens [T] int64; targets [T]
    int64: the answer word at answer-marker steps, PAD_ID elsewhere; question [T] int64: at an
    answer-marker step the index of its question in the story (0, 1, ...), -1 elsewhere."""

    task: int
    tokens: Tensor
    targets: Tensor
    question: Tensor

    def __len__(self) -> int:
        return len(self.tokens)


def encode_story(story: Story, vocabulary: Vocabulary) -> EncodedStory:
    """The story's tokens, each question followed by one ANSWER step per answer word."""
    tokens: list[int] = []
    targets: list[int] = []
    question: list[int] = []
    asked = 0
    for line in story.lines:
        tokens += vocabulary.encode(line.words)
        targets += [PAD_ID] * len(line.words)
        question += [-1] * len(line.words)
        if isinstance(line, Question):
            tokens += [ANSWER_ID] * len(line.answers)
            targets += vocabulary.encode(line.answers)
            question += [asked] * len(line.answers)
            asked += 1
    return EncodedStory(story.task, torch.tensor(tokens), torch.tensor(targets), torch.tensor(question))


# ---------------------------------------------------------------------------------------------
# Batches, loss, score


@dataclasses.dataclass
class BabiBatch:
    """B stories padded to the longest, T steps. tokens, targets [B, T] int64 (PAD_ID past a
    story's end); mask [B, T] bool: the answer steps, where loss and error count; question
    [B, T] int64 (see EncodedStory, -1 in the padding); lengths [B] int64: each story's T;
    tasks [B] int64: each story's task number."""

    tokens: Tensor
    targets: Tensor
    mask: Tensor
    question: Tensor
    lengths: Tensor
    tasks: Tensor

    def to(self, device: torch.device | str) -> "BabiBatch":
        return BabiBatch(*(getattr(self, field.name).to(device) for field in dataclasses.fields(self)))


def collate(stories: Sequence[EncodedStory]) -> BabiBatch:
    """The stories as one batch, each padded with PAD_ID to the longest."""
    lengths = torch.tensor([len(story) for story in stories])
    B, T = len(stories), int(lengths.max())
    tokens = torch.full((B, T), PAD_ID)
    targets = torch.full((B, T), PAD_ID)
    question = torch.full((B, T), -1)
    for b, story in enumerate(stories):
        tokens[b, : len(story)] = story.tokens
        targets[b, : len(story)] = story.targets
        question[b, : len(story)] = story.question
    tasks = torch.tensor([story.task for story in stories])
    return BabiBatch(tokens, targets, question >= 0, question, lengths, tasks)


def bucket_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator | None = None, pool_batches: int = 100
) -> list[list[int]]:
    """Indices of sequences grouped into batches of `batch_size` (the last may be smaller) so
    that each batch's lengths are close and padding stays small. With a generator (training):
    shuffle, cut into pools of pool_batches * batch_size, sort each pool by length, batch, and
    shuffle the batches. Without (evaluation): sort all by length, then batch."""
    if batch_size < 1 or pool_batches < 1:
        raise ValueError(f"batch_size and pool_batches must be >= 1; got {batch_size}, {pool_batches}")
    if generator is None:
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    pool = pool_batches * batch_size
    batches = []
    for start in range(0, len(shuffled), pool):
        order = sorted(shuffled[start : start + pool], key=lengths.__getitem__)
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def answer_loss(logits: Tensor, batch: BabiBatch) -> Tensor:
    """Cross-entropy over the vocabulary, logits [B, T, V], averaged over the answer steps."""
    return F.cross_entropy(logits[batch.mask], batch.targets[batch.mask])


class BabiScore:
    """Questions asked and answered wrongly, per task. A question is right only if every one of
    its answer words is the most likely word (argmax over V); an UNKNOWN target is never right."""

    def __init__(self) -> None:
        self.questions: dict[int, int] = {}
        self.wrong: dict[int, int] = {}

    def update(self, logits: Tensor, batch: BabiBatch) -> None:
        """Count the questions of one batch, logits [B, T, V]."""
        right = (logits.argmax(-1) == batch.targets) & (batch.targets != UNKNOWN_ID)
        B, Q = batch.question.shape[0], int(batch.question.max()) + 1
        per_story = batch.question.max(dim=1).values + 1
        answers = batch.mask.nonzero(as_tuple=True)
        wrong_steps = torch.zeros(B * Q, dtype=torch.long, device=logits.device)
        wrong_steps.index_add_(0, answers[0] * Q + batch.question[answers], (~right[answers]).long())
        wrong = (wrong_steps.view(B, Q) > 0).sum(dim=1)
        for task, asked, missed in zip(batch.tasks.tolist(), per_story.tolist(), wrong.tolist(), strict=True):
            self.questions[task] = self.questions.get(task, 0) + asked
            self.wrong[task] = self.wrong.get(task, 0) + missed

    def errors(self) -> dict[int, float]:
        """Per task: wrong questions / questions, by task number."""
        return {task: self.wrong[task] / self.questions[task] for task in sorted(self.questions)}

    def mean_error(self) -> float:
        """The mean of the tasks' errors (each task counts once, whatever its number of questions)."""
        errors = self.errors()
        return sum(errors.values()) / len(errors)
