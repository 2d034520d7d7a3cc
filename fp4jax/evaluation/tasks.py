"""Readers for lm-evaluation-harness zero-shot tasks, from local files.

Owns: the table of tasks (`TASKS`), one reader per task that turns the
task's files in a `data_dir` into scored `Item`s, and `load`. Nothing here
holds a fixed path or touches the network: the caller names the folder.

An `Item` is what lm-eval builds for a document of a `multiple_choice`
task: `context` = doc_to_text, `choices` = doc_to_choice each with the
target delimiter " " already prepended, `gold` = doc_to_target. The prompts
follow lm-eval's current task configs (lm_eval/tasks/*/*.yaml) exactly;
where our copy of a data set differs from the one lm-eval downloads, that
is said below.

Per task: file(s), prompt (context), choices, and how it matches lm-eval.

  piqa: piqa_valid.jsonl ({"goal", "sol1", "sol2"} per line) and
    piqa_valid-labels.lst (line i = gold of record i, 0 or 1).
      "Question: {goal}\\nAnswer:"; choices sol1, sol2.
    The same 1,838 validation items lm-eval scores.
  hellaswag: hellaswag_val_sample1000.jsonl (original rowanz format).
      preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize());
      choices preprocess(ending); gold label.
    `preprocess` is lm-eval's (see `hellaswag_preprocess`). Differs: a
    random 1,000 of the 10,042 validation items lm-eval scores.
  openbookqa: openbookqa_test.jsonl (OLMES {"query", "choices", "gold"}).
      "{question_stem}"; choices as in the file.
    lm-eval's prompt is the bare stem, so "Question: " and "\\nAnswer:" are
    cut off the file's query (assumes OLMES kept the stem verbatim).
  arc_easy, arc_challenge: *_test.jsonl (OLMES format).
      "Question: {question}\\nAnswer:" (the file's query as it is).
    As lm-eval, with ARC's own 3 to 5 choices per item.
  boolq: boolq_validation.jsonl (HF google/boolq {"question", "answer",
    "passage"}).
      "{passage}\\nQuestion: {question}?\\nAnswer:"; choices no, yes.
    Differs: lm-eval reads super_glue's copy of the same 3,270 items, whose
    passage starts "{title} -- "; this copy has no title, so ours lack it.
  logiqa: logiqa_Test.txt (upstream 8-line blocks: blank line, answer
    letter, context, question, four options).
      "Passage: {context}\\nQuestion: {question}\\nChoices:\\nA. {a}\\n
      B. {b}\\nC. {c}\\nD. {d}\\nAnswer:" (one string); choices the options.
    Context, question and options normalized as lm-eval's dataset does
    ("." -> ". ", strip); options are A-D by line position, as in lm-eval.
    Differs on 3 option lines only (see `logiqa_option`).
  sciq: sciq_validation.jsonl (HF format).
      "{support.lstrip()}\\nQuestion: {question}\\nAnswer:"; choices
      distractor1, distractor2, distractor3, correct_answer; gold 3.
    Differs: lm-eval scores the test split; this is validation.
  lambada_openai: lambada_openai_test.llmfoundry.jsonl ({"context",
    "continuation"}; context + " " + continuation = the passage).
      The passage up to its last " "; one choice, " " + the last word.
    As lm-eval's text.split(" "), on the same 5,153 passages.

Must not import: jax, or any other fp4jax module (pure Python).
"""

import dataclasses
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

DELIMITER = " "   # lm-eval's target_delimiter for every task here


@dataclasses.dataclass(frozen=True)
class Item:
  """One scored example.

  context: the prompt text (lm-eval doc_to_text).
  choices: the continuations, each with lm-eval's target delimiter already
    prepended (usually " " + choice text), so the scorer scores
    log p(choice | context) on context + choice.
  gold: index of the correct choice.
  """
  context: str
  choices: tuple[str, ...]
  gold: int

  def choice_texts(self) -> tuple[str, ...]:
    """The choices as lm-eval's doc_to_choice gives them (no delimiter):
    what its acc_norm divides by the length of."""
    return tuple(c[len(DELIMITER):] if c.startswith(DELIMITER) else c
                 for c in self.choices)


@dataclasses.dataclass(frozen=True)
class Task:
  """One lm-eval task and how to read it.

  name: lm-eval's task name.
  kind: "multiple_choice" (metrics acc, acc_norm) or "lambada" (one choice
    = the last word with its leading space; metrics acc = greedy match,
    perplexity).
  files: file names expected in data_dir.
  reader: data_dir -> items, in file order.
  """
  name: str
  kind: str
  files: tuple[str, ...]
  reader: Callable[[str], list[Item]]


class _Bad(Exception):
  """A record that does not have the expected form (the reason, one line)."""


def _malformed(path: str, lineno: int, reason: str) -> ValueError:
  return ValueError(f"{path}:{lineno}: malformed record: {reason}")


def _path(task: str, data_dir: str, file: str) -> str:
  """data_dir/file, or a one-line ValueError saying which file is missing."""
  path = os.path.join(data_dir, file)
  if not os.path.isfile(path):
    raise ValueError(
        f"task {task!r}: missing file {path} (--data_dir should point at a "
        f"folder holding {file})")
  return path


def _get(record: dict[str, Any], key: str, kind: type) -> Any:
  """record[key], checked to be of type `kind` (raises _Bad)."""
  if key not in record:
    raise _Bad(f"no field {key!r}")
  value = record[key]
  # bool is an int subclass: a true/false gold must not pass as an index.
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise _Bad(f"field {key!r} is {type(value).__name__}, not {kind.__name__}")
  return value


def _item(context: str, choices: list[str], gold: int) -> Item:
  """An Item with the delimiter prepended; gold checked to be in range."""
  if not choices:
    raise _Bad("no choices")
  if not all(isinstance(c, str) for c in choices):
    raise _Bad("a choice is not a string")
  if not 0 <= gold < len(choices):
    raise _Bad(f"gold {gold} not in [0, {len(choices)})")
  return Item(context, tuple(DELIMITER + c for c in choices), gold)


def read_text(path: str) -> str:
  """The UTF-8 text of `path`, newlines as text-mode `open` gives them.

  Raises:
    ValueError: one line naming the file when it is not UTF-8.
  """
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise ValueError(f"{path}:{line}: not UTF-8 text (byte "
                     f"0x{raw[e.start]:02x} at offset {e.start}: {e.reason})"
                     ) from None
  return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) of each non-blank line of a JSONL file."""
  # One decode of the whole file, so a bad byte is named with its file.
  for lineno, line in enumerate(io.StringIO(read_text(path)), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise _malformed(path, lineno,
                       f"not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
      raise _malformed(path, lineno, "not a JSON object")
    yield lineno, record


def _jsonl_reader(task: str, file: str,
                  convert: Callable[[dict[str, Any]], Item]
                  ) -> Callable[[str], list[Item]]:
  """A reader applying `convert` to each record of data_dir/file."""

  def read(data_dir: str) -> list[Item]:
    path = _path(task, data_dir, file)
    items = []
    for lineno, record in _jsonl(path):
      try:
        items.append(convert(record))
      except _Bad as e:
        raise _malformed(path, lineno, str(e)) from None
    return items

  read.__doc__ = f"Items of {task} from data_dir/{file}."
  return read


# --- piqa --------------------------------------------------------------------

PIQA_FILES = ("piqa_valid.jsonl", "piqa_valid-labels.lst")


def _read_piqa(data_dir: str) -> list[Item]:
  """PIQA validation: records and their line-aligned labels (0/1)."""
  path, labels_path = (_path("piqa", data_dir, f) for f in PIQA_FILES)
  records = list(_jsonl(path))
  labels = [(n, l.strip()) for n, l in
            enumerate(io.StringIO(read_text(labels_path)), 1) if l.strip()]
  if len(labels) != len(records):
    # Name the first line that has no partner in the other file.
    if len(labels) < len(records):
      raise _malformed(path, records[len(labels)][0],
                       f"no label for it in {labels_path}")
    raise _malformed(labels_path, labels[len(records)][0],
                     f"label without a record in {path}")
  items = []
  for (lineno, record), (label_line, label) in zip(records, labels):
    if label not in ("0", "1"):
      raise _malformed(labels_path, label_line,
                       f"label {label!r} is not 0 or 1")
    try:
      goal = _get(record, "goal", str)
      sols = [_get(record, "sol1", str), _get(record, "sol2", str)]
      items.append(_item(f"Question: {goal}\nAnswer:", sols, int(label)))
    except _Bad as e:
      raise _malformed(path, lineno, str(e)) from None
  return items


# --- hellaswag ---------------------------------------------------------------

def hellaswag_preprocess(text: str) -> str:
  """lm-eval's hellaswag `preprocess`: drops WikiHow's bracket markers.

  The steps and their order are lm-eval's, including that the strip comes
  first, so a removed leading marker ("[substeps] ...") leaves a space.

  Args:
    text: a context or an ending.

  Returns:
    The text as lm-eval scores it.
  """
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _hellaswag(record: dict[str, Any]) -> Item:
  # str.capitalize also lowercases the rest of ctx_b; lm-eval does the same.
  ctx_b = _get(record, "ctx_b", str).capitalize()
  ctx = _get(record, "ctx_a", str) + " " + ctx_b
  label_text = _get(record, "activity_label", str)
  query = hellaswag_preprocess(label_text + ": " + ctx)
  endings = _get(record, "endings", list)
  if not all(isinstance(e, str) for e in endings):
    raise _Bad("an ending is not a string")
  label = record.get("label")
  # rowanz files store the label as an int, HF's copy as a digit string.
  if isinstance(label, str) and label.isdigit():
    label = int(label)
  if not isinstance(label, int) or isinstance(label, bool):
    raise _Bad(f"label {label!r} is not an index")
  return _item(query, [hellaswag_preprocess(e) for e in endings], label)


# --- OLMES-format files: arc_easy, arc_challenge, openbookqa -----------------

_Q_PREFIX, _Q_SUFFIX = "Question: ", "\nAnswer:"


def _olmes_query(record: dict[str, Any]) -> str:
  query = _get(record, "query", str)
  if not (query.startswith(_Q_PREFIX) and query.endswith(_Q_SUFFIX)):
    raise _Bad('query is not "Question: ...\\nAnswer:"')
  return query


def _arc(record: dict[str, Any]) -> Item:
  # The OLMES query is lm-eval's doc_to_text already.
  return _item(_olmes_query(record), _get(record, "choices", list),
               _get(record, "gold", int))


def _openbookqa(record: dict[str, Any]) -> Item:
  # lm-eval's doc_to_text is the bare question_stem.
  stem = _olmes_query(record)[len(_Q_PREFIX):-len(_Q_SUFFIX)]
  return _item(stem, _get(record, "choices", list),
               _get(record, "gold", int))


# --- boolq -------------------------------------------------------------------

def _boolq(record: dict[str, Any]) -> Item:
  passage = _get(record, "passage", str)
  question = _get(record, "question", str)
  answer = _get(record, "answer", bool)
  return _item(f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"],
               int(answer))


# --- logiqa ------------------------------------------------------------------

LOGIQA_FILE = "logiqa_Test.txt"
_LETTERS = "abcd"
# A leading option label: a letter with a dot or other mark ("A.", "A?",
# "d."), or an upper-case letter and a space ("A first"). Lower case needs
# the mark, so that an unlabelled option beginning "a ..." keeps its word.
_OPTION_PREFIX = re.compile(r"(?:[A-Da-d][.．?？:：)]|[A-D] )\s*")


def logiqa_normalize(text: str) -> str:
  """The normalization of lm-eval's logiqa dataset: "." -> ". ", strip."""
  return text.replace(".", ". ").strip()


def logiqa_option(line: str) -> str:
  """The text of an option line, its leading letter label removed.

  lm-eval drops the first two characters of every option line. That equals
  removing the label for every labelled line ("A.", "A ", "A?", "d."), but
  for the three test lines whose letter drifted into the sentence ("When
  the land in City A.B ...", "Storehouse B.3") it cuts real text
  ("en the land ..."); those are kept whole here.

  Args:
    line: an option line of a LogiQA block.

  Returns:
    The option as lm-eval's dataset stores it (normalized).
  """
  match = _OPTION_PREFIX.match(line)
  return logiqa_normalize(line[match.end():] if match else line)


def _logiqa_blocks(path: str) -> Iterator[tuple[int, list[str]]]:
  """(first line number, lines) of each run of non-blank lines."""
  lines = read_text(path).split("\n")
  start, block = 0, []
  for lineno, line in enumerate(lines + [""], 1):
    line = line.rstrip("\r")
    if line.strip():
      if not block:
        start = lineno
      block.append(line)
    elif block:
      yield start, block
      block = []


def _read_logiqa(data_dir: str) -> list[Item]:
  """LogiQA test, in lm-eval's prompt format.

  The blocks are split on blank lines, as lm-eval's dataset does. Options
  are A-D by position, not by the letter printed on the line: 19 test items
  print them out of order (A., C., B., D.), and lm-eval, whose numbers ours
  should match, takes the answer letter as a position too.

  Args:
    data_dir: folder holding logiqa_Test.txt.

  Returns:
    651 items for the upstream file, 4 choices each.
  """
  path = _path("logiqa", data_dir, LOGIQA_FILE)
  items = []
  for lineno, block in _logiqa_blocks(path):
    if len(block) != 7:
      raise _malformed(path, lineno,
                       f"{len(block)} non-blank lines, not 7 (answer letter,"
                       " context, question, 4 options)")
    label = block[0].strip()
    if label not in _LETTERS:
      raise _malformed(path, lineno, f"answer {label!r} is not one of a-d")
    context = logiqa_normalize(block[1])
    question = logiqa_normalize(block[2])
    options = [logiqa_option(line) for line in block[3:]]
    prompt = f"Passage: {context}\nQuestion: {question}\nChoices:\n"
    for letter, option in zip(_LETTERS.upper(), options):
      prompt += f"{letter}. {option}\n"
    prompt += "Answer:"
    items.append(_item(prompt, options, _LETTERS.index(label)))
  return items


# --- sciq --------------------------------------------------------------------

def _sciq(record: dict[str, Any]) -> Item:
  support = _get(record, "support", str)
  question = _get(record, "question", str)
  choices = [_get(record, k, str) for k in
             ("distractor1", "distractor2", "distractor3", "correct_answer")]
  # An empty support leaves the prompt starting with "\n", as in lm-eval.
  return _item(f"{support.lstrip()}\nQuestion: {question}\nAnswer:", choices,
               3)


# --- lambada_openai ----------------------------------------------------------

def _lambada(record: dict[str, Any]) -> Item:
  # Rebuild the passage and split it as lm-eval does (on the last " "), so
  # a file that split elsewhere still yields lm-eval's context and target.
  passage = (_get(record, "context", str) + " "
             + _get(record, "continuation", str))
  context, last = passage.rsplit(" ", 1)
  if not last:
    raise _Bad("empty continuation")
  return Item(context, (DELIMITER + last,), 0)


def _task(name: str, kind: str, files: tuple[str, ...],
          reader: Callable[[str], list[Item]]) -> tuple[str, Task]:
  return name, Task(name, kind, files, reader)


def _jsonl_task(name: str, kind: str, file: str,
                convert: Callable[[dict[str, Any]], Item]
                ) -> tuple[str, Task]:
  return _task(name, kind, (file,), _jsonl_reader(name, file, convert))


_MC = "multiple_choice"

TASKS: dict[str, Task] = dict([
    _task("piqa", _MC, PIQA_FILES, _read_piqa),
    _jsonl_task("hellaswag", _MC, "hellaswag_val_sample1000.jsonl",
                _hellaswag),
    _jsonl_task("openbookqa", _MC, "openbookqa_test.jsonl", _openbookqa),
    _jsonl_task("arc_easy", _MC, "arc_easy_test.jsonl", _arc),
    _jsonl_task("arc_challenge", _MC, "arc_challenge_test.jsonl", _arc),
    _jsonl_task("boolq", _MC, "boolq_validation.jsonl", _boolq),
    _task("logiqa", _MC, (LOGIQA_FILE,), _read_logiqa),
    _jsonl_task("sciq", _MC, "sciq_validation.jsonl", _sciq),
    _jsonl_task("lambada_openai", "lambada",
                "lambada_openai_test.llmfoundry.jsonl", _lambada),
])


def load(name: str, data_dir: str, limit: int | None = None) -> list[Item]:
  """Items of one task (the first `limit`).

  Args:
    name: a key of TASKS.
    data_dir: folder holding the task's files (Task.files).
    limit: keep only the first `limit` items; None keeps all.

  Returns:
    The task's items, in file order.

  Raises:
    ValueError: (one line each) unknown task name, listing the known ones;
      a missing file, naming the task and the path (and that --data_dir
      should point at a folder holding it); a malformed record, naming the
      file and line number; a file that is not UTF-8; a task without
      items; a negative limit.
  """
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: "
                     + ", ".join(TASKS))
  if limit is not None and limit < 0:
    raise ValueError(f"limit must be >= 0 or None, got {limit}")
  task = TASKS[name]
  # Every file first, so a folder missing the second file of a task fails
  # before the first one is read.
  for file in task.files:
    _path(name, data_dir, file)
  items = task.reader(data_dir)
  if not items:   # scored, an empty task would be a NaN, not an error
    raise ValueError(f"task {name!r}: no items in " + ", ".join(
        os.path.join(data_dir, f) for f in task.files))
  return items if limit is None else items[:limit]
