"""Tests of the eval-set readers (fp4jax.evaluation.tasks).

Fixtures: tiny hand-made files under tests/testdata/eval/, named and laid
out as the real ones. The oracle is each Item written out by hand from
lm-eval's task configs (doc_to_text, doc_to_choice with the " " target
delimiter, doc_to_target). The real files in shared/data/eval, when this
checkout has them, are checked for counts and well-formedness only.
"""

import pathlib
import shutil

import pytest

from fp4jax.evaluation import tasks
from fp4jax.evaluation.tasks import Item

FIXTURES = pathlib.Path(__file__).resolve().parent / "testdata" / "eval"
REAL = (pathlib.Path(__file__).resolve().parents[1].parent / "shared"
        / "data" / "eval")

EXPECTED = {
    "piqa": [
        Item("Question: How do I open a jar?\nAnswer:",
             (" Twist the lid.", " Eat the lid."), 0),
        # Trailing and doubled spaces of the solutions are kept, as lm-eval.
        Item("Question: dresser\nAnswer:",
             (" replace drawer with bobby pin ",
              " finish, woodgrain with  bobby pin "), 1),
    ],
    "hellaswag": [
        # ctx_b capitalized.
        Item("Pole vault: A man runs with a pole. A few women",
             (" go down a rock.", " watch.", " swim.",
              " practice the vault."), 3),
        # [header] / [step] dropped, " [title]" -> ". ", double spaces
        # collapsed, capitalize() lowercases "BRUSH"; the ending that began
        # with "[substeps]" keeps the space after it (lm-eval strips first).
        Item("Home and Garden: How to clean a Sink. Rinse the sink. Use warm"
             " water. Then scrub with a brush",
             ("  Dry it off.", " Paint it. red.", " Sell the house.",
              " Call a plumber."), 0),
    ],
    "openbookqa": [
        Item("The sun is responsible for",
             (" puppies learning new tricks",
              " children growing up and getting old",
              " flowers wilting in a vase",
              " plants sprouting, blooming and wilting"), 3),
        Item("There is most likely going to be fog around:",
             (" a marsh", " a tundra", " the plains", " a desert"), 0),
    ],
    "arc_easy": [
        Item("Question: Which piece of safety equipment keeps mold spores out"
             " of the lungs?\nAnswer:",
             (" safety goggles", " breathing mask", " rubber gloves",
              " lead apron"), 1),
        Item("Question: Which is a liquid?\nAnswer:",
             (" ice", " water", " steam"), 1),
    ],
    "arc_challenge": [
        Item("Question: A planet rotates faster. What is the effect?\n"
             "Answer:",
             (" Density decreases.", " Years get longer.",
              " Days get shorter.", " Gravity gets stronger."), 2),
        Item("Question: Which is a mammal?\nAnswer:",
             (" trout", " frog", " eagle", " whale", " snake"), 3),
    ],
    "boolq": [
        Item("The sky is blue on a clear day.\nQuestion: is the sky blue?\n"
             "Answer:", (" no", " yes"), 1),
        Item("Cats meow.\nQuestion: do cats bark?\nAnswer:",
             (" no", " yes"), 0),
    ],
    "logiqa": [
        # "." -> ". " everywhere (lm-eval's dataset normalization).
        Item("Passage: It rained. The ground is wet.\n"
             "Question: Which follows?\n"
             "Choices:\nA. The ground is dry\nB. The sky is green\n"
             "C. Nothing\nD. Dr. Who\nAnswer:",
             (" The ground is dry", " The sky is green", " Nothing",
              " Dr. Who"), 0),
        # Garbled labels: "A " without a dot, "B?", lower-case "d.".
        Item("Passage: Tom is taller than Ann.\n"
             "Question: Who is shorter?\n"
             "Choices:\nA. Tom\nB. Both\nC. Neither\nD. Ann\nAnswer:",
             (" Tom", " Both", " Neither", " Ann"), 3),
        # Letters printed out of order count by position (answer b = the
        # second line, printed "C."); an unlabelled line is kept whole.
        Item("Passage: Valves 1 to 3 are shut.\n"
             "Question: Which valve opens?\n"
             "Choices:\nA. No. 1 valve.\nB. No. 3 valve.\nC. No. 2 valve.\n"
             "D. Storehouse D. 3\nAnswer:",
             (" No. 1 valve.", " No. 3 valve.", " No. 2 valve.",
              " Storehouse D. 3"), 1),
    ],
    "sciq": [
        # support.lstrip() keeps its trailing space.
        Item("Plants absorb carbon dioxide. \n"
             "Question: What gas do plants absorb?\nAnswer:",
             (" oxygen", " nitrogen", " helium", " carbon dioxide"), 3),
        # Empty support: the prompt starts with the newline.
        Item("\nQuestion: Who proposed natural selection?\nAnswer:",
             (" Linnaeus", " shaw", " Scopes", " darwin"), 3),
    ],
    "lambada_openai": [
        Item("\"Wait,\" he said.\n\nShe turned to face", (" Shane",), 0),
        # Split on the last " " only, as lm-eval's text.split(" ") does.
        Item("He set the tape on the table between their",
             (" \n\nrecorder",), 0),
    ],
}

REAL_COUNTS = {
    "piqa": 1838, "hellaswag": 1000, "openbookqa": 500, "arc_easy": 2376,
    "arc_challenge": 1172, "boolq": 3270, "logiqa": 651, "sciq": 1000,
    "lambada_openai": 5153,
}


def test_table():
  assert list(tasks.TASKS) == list(EXPECTED)
  for name, task in tasks.TASKS.items():
    assert task.name == name
    assert task.kind == ("lambada" if name == "lambada_openai"
                         else "multiple_choice")
    for file in task.files:
      assert (FIXTURES / file).is_file(), file


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reader_matches_hand_oracle(name):
  assert tasks.load(name, str(FIXTURES)) == EXPECTED[name]
  assert tasks.TASKS[name].reader(str(FIXTURES)) == EXPECTED[name]


def test_limit():
  assert tasks.load("arc_easy", str(FIXTURES), limit=1) == (
      EXPECTED["arc_easy"][:1])
  assert tasks.load("arc_easy", str(FIXTURES), limit=0) == []
  assert tasks.load("arc_easy", str(FIXTURES), limit=9) == (
      EXPECTED["arc_easy"])
  with pytest.raises(ValueError, match="limit"):
    tasks.load("arc_easy", str(FIXTURES), limit=-1)


def _one_line(excinfo) -> str:
  message = str(excinfo.value)
  assert "\n" not in message
  return message


def test_unknown_task_lists_known_names():
  with pytest.raises(ValueError) as excinfo:
    tasks.load("winogrande", str(FIXTURES))
  message = _one_line(excinfo)
  assert "winogrande" in message
  for name in EXPECTED:
    assert name in message


def test_missing_file(tmp_path):
  with pytest.raises(ValueError) as excinfo:
    tasks.load("sciq", str(tmp_path))
  message = _one_line(excinfo)
  assert "sciq" in message
  assert str(tmp_path / "sciq_validation.jsonl") in message
  assert "--data_dir" in message


def test_missing_second_file(tmp_path):
  # piqa needs its labels too; the message names that file.
  shutil.copy(FIXTURES / "piqa_valid.jsonl", tmp_path)
  with pytest.raises(ValueError) as excinfo:
    tasks.load("piqa", str(tmp_path))
  message = _one_line(excinfo)
  assert str(tmp_path / "piqa_valid-labels.lst") in message
  assert "--data_dir" in message


def _expect_malformed(tmp_path, name, file, text, lineno, what="",
                      named=None):
  """Writes `text` as `file`; the error names `named` (default: file)."""
  (tmp_path / file).write_text(text, encoding="utf-8")
  for other in tasks.TASKS[name].files:
    if not (tmp_path / other).exists():
      shutil.copy(FIXTURES / other, tmp_path)
  with pytest.raises(ValueError) as excinfo:
    tasks.load(name, str(tmp_path))
  message = _one_line(excinfo)
  assert f"{tmp_path / (named or file)}:{lineno}:" in message
  assert what in message


def test_malformed_json_line(tmp_path):
  good = (FIXTURES / "arc_easy_test.jsonl").read_text().splitlines()[0]
  _expect_malformed(tmp_path, "arc_easy", "arc_easy_test.jsonl",
                    good + "\n{\"id\": \"x\", \"query\": \n", 2, "not JSON")


def test_malformed_missing_field(tmp_path):
  _expect_malformed(tmp_path, "boolq", "boolq_validation.jsonl",
                    '\n{"question": "q", "passage": "p"}\n', 2, "'answer'")


def test_malformed_gold_out_of_range(tmp_path):
  _expect_malformed(
      tmp_path, "openbookqa", "openbookqa_test.jsonl",
      '{"query": "Question: q\\nAnswer:", "choices": ["a", "b"], '
      '"gold": 2}\n', 1, "gold 2")


def test_malformed_query_form(tmp_path):
  _expect_malformed(
      tmp_path, "arc_challenge", "arc_challenge_test.jsonl",
      '{"query": "q?", "choices": ["a", "b"], "gold": 0}\n', 1, "query")


def test_malformed_piqa_labels(tmp_path):
  _expect_malformed(tmp_path, "piqa", "piqa_valid-labels.lst", "0\n2\n", 2,
                    "'2'")
  # One label short: the record without one is named.
  _expect_malformed(tmp_path, "piqa", "piqa_valid-labels.lst", "0\n", 2,
                    "no label", named="piqa_valid.jsonl")


def test_malformed_logiqa(tmp_path):
  block = "\n{}\nctx\nq?\nA.w\nB.x\nC.y\nD.z"
  _expect_malformed(tmp_path, "logiqa", "logiqa_Test.txt",
                    block.format("a") + "\n" + block.format("e"), 10,
                    "'e'")
  # A block short of an option (the first block starts at line 2).
  _expect_malformed(tmp_path, "logiqa", "logiqa_Test.txt",
                    "\na\nctx\nq?\nA.w\nB.x\nC.y\n", 2, "not 7")


@pytest.mark.skipif(not REAL.is_dir(), reason=f"no {REAL}")
@pytest.mark.parametrize("name", list(REAL_COUNTS))
def test_real_files(name):
  items = tasks.load(name, str(REAL))
  assert len(items) == REAL_COUNTS[name]
  for item in items:
    assert isinstance(item.context, str) and item.context
    assert 0 <= item.gold < len(item.choices)
    assert all(c.startswith(tasks.DELIMITER) and len(c) > 1
               for c in item.choices)
    if name == "lambada_openai":
      assert len(item.choices) == 1
    else:
      assert len(item.choices) >= 2
