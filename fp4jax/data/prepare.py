r"""Pretokenized shards: `python -m fp4jax.data.prepare`, and reading them.

  python -m fp4jax.data.prepare --config=configs/demo.py --out=DIR \
      --config.data.train_files='/data/web/*.jsonl.zst' \
      --config.data.tokenizer_model=/models/tok.model   # or --tokenizer=
  python -m fp4jax.main --config=... --config.data.source=files \
      --config.data.train_files=DIR    # reads DIR's token ids, no tokenizer

Owns: the prepare command, the layout and manifest of a prepared
directory, and reading one back for training (`prepared_source`,
`run_tokenizer`, called by files.py for a data.* pattern that names a
directory).

What is prepared: every shard of data.train_files (`--out` is then one
prepared directory), or of each data.mixture entry NAME (`--out`/NAME is
one per entry; name them in the training mixture as "NAME:W:DIR/NAME").
data.val_files are not: prepare them as train_files into a directory of
their own and name it in data.val_files. Shard k (its index in
`shards.expand_shards`' list, the order training reads) is read in file
order (`ShardReader`, data.text_key, data.doc_separator,
data.max_bad_records) and written as one .array_record file with one
record per document: [BOS] + ids + [EOS] as `Tokenizer.encode_documents`
gives them (`shards.encode_tokens`), tokenized by --workers processes.

A prepared directory:
  prepared.json   the manifest, written last (atomically): format, version,
                  tokenizer (file, fingerprint, vocab_size), text_key,
                  separator, inputs, and per shard its file, input,
                  documents, tokens, records, bad_records, skipped_empty,
                  bytes. Training accepts a directory only when it exists.
  tokenizer.model the tokenizer the shards were made with.
  shards/NNNNNN-<input file name>.array_record   shard k = NNNNNN.
  plan.json       what the directory is for (the manifest's identity and
                  the first command): a command for other inputs,
                  tokenizer, text_key or separator is refused.
  done/NNNNNN.json  shard k's counts and size, written after its output is
                  published; the manifest is assembled from them.
  claims/         shard k being prepared: claims/NNNNNN (host, pid);
                  empty when nothing runs.

Several processes, on one host or many sharing the file system, may run
the same command on one --out at once (or again after a kill): each
claims the shards it works on (an O_CREAT|O_EXCL file), writes each output
under a temporary name (`<file>.tmp.<host>.<pid>`) and publishes it with
os.replace, so a reader never sees a partial shard, then writes the
shard's done record and drops its claim. A shard with a done record (and
its output, of the recorded size) is skipped, so a rerun does only what is
missing and a finished directory is left untouched (a rerun may change
data.max_bad_records; each shard records its bad_records). A claim of a
dead process of this host is taken over (its temporary file removed);
claims of other hosts are waited for (their pids cannot be checked here), or,
with --steal_claims, the ones present when the command starts are taken
over: use it only when those runs are dead. When no shard is left to
claim a process waits (up to --wait_s) for the ones others hold, and every
process that sees every shard done writes the manifest, whose content is
the same whoever writes it. Claims only keep work from being done twice:
a shard is tokenized deterministically, so two writers of one shard (a
takeover race) publish identical bytes. Inputs are identified by path,
not content. The first document of each source is read before anything
is written (a wrong text_key or format fails at once). Each process
starts --workers tokenizer processes: several on one host share its
cores.

With as many shards as training processes or more, training from a
prepared directory gives the batches that training from its raw shards
with the same tokenizer gives. Differences: the data's identity (a state
saved on raw shards does not resume on prepared ones), data.val_fraction
holds out other documents (by a hash of the ids, not the text), and with
fewer shards than processes the shards' pieces are dealt by document, not
by raw record.

Exit codes (one line on stderr for every code but 0: `error: ...`, or
what stopped it):
  0   the directories are finished (or were already)
  1   bad input: config, tokenizer, --out, or a bad shard (named; no
      output of it is left and its claim is dropped)
  75  gave up waiting (--wait_s) for shards other processes hold: rerun
  130 / 143  Ctrl-C / SIGTERM (the shard being written is dropped)

Must not import: jax, flax, tensorflow, tensorflow_datasets, grain, or
fp4jax modules outside fp4jax.data but diskspace and errtext; absl flags
and ml_collections only in the command (`main`), since files.py imports
this module (and this module imports files.py only inside functions).
"""

import collections
import dataclasses
import json
import os
import re
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from absl import logging

from fp4jax import diskspace
from fp4jax.data import shards as shards_lib
from fp4jax.data import tokenizer as tokenizer_lib

FORMAT = "fp4jax.prepared"
VERSION = 1
MANIFEST = "prepared.json"
PLAN = "plan.json"
TOKENIZER = "tokenizer.model"
SHARDS, DONE, CLAIMS = "shards", "done", "claims"
# Groups of records compressed together: sequential reads compress well,
# a piece read (records i % m) still decompresses only 1024-record groups.
WRITER_OPTIONS = "group_size:1024"
# The manifest's identity: a directory is "the same preparation" when all
# of these are equal.
IDENTITY = ("format", "version", "inputs", "text_key", "separator",
            "tokenizer")
CHUNK_CHARS = 65536     # characters per batch handed to the tokenizer pool
POLL_S = 0.5            # seconds between looks at others' claims
# A claim file without readable content this old is one whose claimant was
# killed between creating and writing it (microseconds apart).
UNREADABLE_CLAIM_S = 30.0
EXIT_ERROR = 1
EXIT_WAITED = 75


class Waited(Exception):
  """Gave up waiting for shards other processes hold (exit 75)."""


# --- reading a prepared directory (training) -------------------------


@dataclasses.dataclass(frozen=True)
class Prepared:
  """One source's prepared directories, as training reads them.

  Attributes:
    directories: the prepared directories (absolute), in the given order.
    shards: their token shards (absolute paths), in manifest order.
    tokenizer_path: the first directory's tokenizer.model.
    fingerprint: the tokenizer's fingerprint (`Tokenizer.fingerprint`).
    vocab_size: the tokenizer's vocabulary size.
  """
  directories: tuple[str, ...]
  shards: tuple[str, ...]
  tokenizer_path: str
  fingerprint: str
  vocab_size: int


def _unfinished(directory: str) -> str:
  head = (f"{directory} is not a finished prepared directory (no "
          f"{MANIFEST})")
  try:
    with open(os.path.join(directory, PLAN)) as f:
      command = json.load(f).get("command")
  except (OSError, ValueError, AttributeError):
    command = None
  if command:
    return f"{head}: run {command} to finish it"
  return (f"{head}: run python -m fp4jax.data.prepare --config=... "
          f"--out={directory} to make it, or name its shard files (a glob) "
          f"or a saved Hugging Face dataset")


def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest of a finished prepared directory, its shards checked.

  Raises:
    FileNotFoundError: no manifest (an unfinished or foreign directory),
      or a shard file missing; one line naming the directory.
    ValueError: an unreadable manifest, another format or version, or a
      shard of another size than recorded.
  """
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(_unfinished(directory))
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable manifest ({type(e).__name__})"
                     ) from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: not an fp4jax prepared-directory manifest")
  if manifest.get("version") != VERSION:
    raise ValueError(f"{path}: manifest version {manifest.get('version')}, "
                     f"this fp4jax reads version {VERSION}")
  for shard in manifest["shards"]:
    file = os.path.join(directory, shard["file"])
    try:
      size = os.path.getsize(file)
    except OSError:
      raise FileNotFoundError(f"{directory}: shard {shard['file']} of its "
                              f"{MANIFEST} is missing") from None
    if size != shard["bytes"]:
      raise ValueError(f"{file}: {size} bytes, the manifest says "
                       f"{shard['bytes']}: the directory was modified")
  return manifest


def _patterns(patterns: str | Sequence[str]) -> list[str]:
  """The patterns as `documents.expand_files` splits them."""
  if isinstance(patterns, str):
    patterns = patterns.split(",")
  out = [os.path.expanduser(str(p).strip()) for p in patterns]
  return [p for p in out if p]


def _combine(directories: Sequence[str], key: str) -> Prepared:
  shards, first = [], None
  for directory in directories:
    manifest = read_manifest(directory)
    tok = manifest["tokenizer"]
    if first is None:
      first = (directory, tok)
    elif tok["fingerprint"] != first[1]["fingerprint"]:
      raise ValueError(f"{key}: prepared directories {first[0]} and "
                       f"{directory} were made with different tokenizers "
                       f"({first[1]['fingerprint']} vs "
                       f"{tok['fingerprint']})")
    shards.extend(os.path.join(directory, s["file"])
                  for s in manifest["shards"])
  directory, tok = first
  return Prepared(directories=tuple(directories), shards=tuple(shards),
                  tokenizer_path=os.path.join(directory, tok["file"]),
                  fingerprint=tok["fingerprint"],
                  vocab_size=tok["vocab_size"])


def prepared_source(patterns: str | Sequence[str], key: str
                    ) -> Prepared | None:
  """The prepared directories `patterns` names, or None if it names none.

  Args:
    patterns: a data.* value (`shards.expand_shards`' forms); a pattern
      that is a local directory is a prepared directory unless it is a
      saved Hugging Face dataset (state.json / dataset_dict.json).
    key: the config key (for messages).

  Raises:
    FileNotFoundError / ValueError: one line: a directory that is not a
      finished prepared directory, directories and shard files mixed in
      one source, directories of different tokenizers.
  """
  found = _patterns(patterns)
  dirs = []
  for p in found:
    if not os.path.isdir(p):
      continue
    has = lambda name, p=p: os.path.isfile(os.path.join(p, name))
    if has(MANIFEST) or has(PLAN):
      dirs.append(os.path.abspath(p))
    elif not (has(shards_lib.HF_STATE) or has(shards_lib.HF_DICT)):
      raise FileNotFoundError(_unfinished(os.path.abspath(p)))
    # else a saved Hugging Face dataset: raw shards (`expand_shards`)
  if not dirs:
    return None
  if len(dirs) != len(found):
    raise ValueError(f"{key} mixes prepared directories and shard files; "
                     f"give them separate data.mixture entries")
  for directory in dirs:
    if not os.path.isfile(os.path.join(directory, MANIFEST)):
      raise FileNotFoundError(_unfinished(directory))
  return _combine(list(dict.fromkeys(dirs)), key)


def _of_shards(shards: Sequence[str], key: str) -> Prepared:
  """The Prepared of a token source's shards (DIR/shards/<file>)."""
  dirs = dict.fromkeys(os.path.dirname(os.path.dirname(s)) for s in shards)
  return _combine(list(dirs), key)


def run_tokenizer(token_shards: Sequence[Sequence[str]], model_path: str,
                  vocab_size: int) -> tokenizer_lib.Tokenizer:
  """The tokenizer of a run with prepared sources.

  Args:
    token_shards: the shards of every prepared source of the run.
    model_path: data.tokenizer_model; "" = the prepared directories' own.
    vocab_size: data.vocab_size.

  Returns:
    The tokenizer every prepared source was made with (raw sources of the
    run are tokenized with it too).

  Raises:
    ValueError: one line: prepared sources of different tokenizers,
      data.tokenizer_model not theirs, data.vocab_size not its size, a
      tokenizer.model that is not the manifest's.
  """
  preps = [_of_shards(s, "data") for s in token_shards]
  first = preps[0]
  where = first.directories[0]
  for p in preps[1:]:
    if p.fingerprint != first.fingerprint:
      raise ValueError(f"prepared directories {where} and "
                       f"{p.directories[0]} were made with different "
                       f"tokenizers ({first.fingerprint} vs "
                       f"{p.fingerprint}); prepare them with one")
  if model_path:
    tok = tokenizer_lib.Tokenizer.load(model_path)
    if tok.fingerprint != first.fingerprint:
      raise ValueError(f"data.tokenizer_model={model_path!r} (fingerprint "
                       f"{tok.fingerprint}) is not the tokenizer {where} "
                       f"was prepared with ({first.fingerprint}); set "
                       f"data.tokenizer_model='' to use {where}/{TOKENIZER}")
  else:
    tok = tokenizer_lib.Tokenizer.load(first.tokenizer_path,
                                       key=f"prepared directory {where}")
    if tok.fingerprint != first.fingerprint:
      raise ValueError(f"{first.tokenizer_path}: fingerprint "
                       f"{tok.fingerprint}, the manifest says "
                       f"{first.fingerprint}: the directory was modified")
  if tok.vocab_size != vocab_size:
    raise ValueError(f"data.vocab_size={vocab_size} but {where} was "
                     f"prepared with a {tok.vocab_size}-piece tokenizer; set "
                     f"data.vocab_size={tok.vocab_size}")
  return tok


# --- writing one ---------------------------------------------------------


def _host() -> str:
  # Dots are kept (temp names are parsed from the right); path separators
  # and spaces would break the names.
  return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
  """Whether process `pid` of this host exists."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # another user's: alive
    return True
  return True


def _write_atomic(path: str, data: bytes, host: str) -> None:
  """`data` at `path` whole or not at all. The temporary name carries host
  and pid: processes of two hosts may share a pid and the directory."""
  tmp = f"{path}.tmp.{host}.{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.lexists(tmp):
      os.remove(tmp)
    diskspace.raise_if_full(e, path, len(data), os.path.basename(path))
    raise


def _temp_owner(name: str) -> tuple[str, int] | None:
  """(host, pid) of a `<file>.tmp.<host>.<pid>` name, else None."""
  head, sep, rest = name.rpartition(".tmp.")
  if not (head and sep):
    return None
  host, _, pid = rest.rpartition(".")
  return (host, int(pid)) if host and pid.isdigit() else None


def _safe_name(path: str) -> str:
  base = path.rstrip("/").rsplit("/", 1)[-1]
  return re.sub(r"[^A-Za-z0-9._-]", "_", base)[-100:] or "shard"


def plan_for(inputs: Sequence[str], tok: tokenizer_lib.Tokenizer,
             text_key: str, separator: str) -> dict[str, Any]:
  """The identity (`IDENTITY` keys) of preparing `inputs` with `tok`."""
  return {"format": FORMAT, "version": VERSION, "inputs": list(inputs),
          "text_key": text_key, "separator": separator,
          "tokenizer": {"file": TOKENIZER, "fingerprint": tok.fingerprint,
                        "vocab_size": tok.vocab_size}}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
  return all(a.get(k) == b.get(k) for k in IDENTITY)


def check_out(directory: str, plan: dict[str, Any]) -> bool:
  """Whether `directory` may be prepared for `plan`; True if it is done.

  Raises:
    ValueError: one line: not a directory, prepared (or being prepared)
      for other inputs, tokenizer or settings, or a non-empty directory
      that is not a prepared one.
  """
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise ValueError(f"--out {directory} is not a directory")
  other = ValueError(f"--out {directory} was prepared from other data/"
                     f"tokenizer; use a new directory")
  for name in (MANIFEST, PLAN):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      try:
        with open(path) as f:
          found = json.load(f)
      except (OSError, ValueError):
        raise ValueError(f"{path}: unreadable ({name}); use a new --out"
                         ) from None
      if not isinstance(found, dict) or not _same(found, plan):
        raise other
      if name == MANIFEST:
        try:
          read_manifest(directory)
          return True
        except (OSError, ValueError) as e:   # a shard lost: redo it
          logging.warning("prepare: %s: %s; redoing what is missing",
                          directory, e)
      return False
  # A start killed before its plan was published leaves only temp files.
  if os.path.isdir(directory) and any(
      _temp_owner(n) is None for n in os.listdir(directory)):
    raise ValueError(f"--out {directory} is not empty and not a prepared "
                     f"directory; use a new directory")
  return False


class _Job:
  """Preparing one source into one directory, alongside other processes."""

  def __init__(self, directory: str, plan: dict[str, Any],
               tok: tokenizer_lib.Tokenizer, pool: Any, *,
               max_bad_records: int, wait_s: float, steal_claims: bool,
               command: str):
    self.dir = directory
    self.plan = plan
    self.inputs = plan["inputs"]
    self.tok = tok
    self.pool = pool
    self.max_bad = max_bad_records
    self.wait_s = wait_s
    self.steal = steal_claims
    self.command = command
    self.host, self.pid = _host(), os.getpid()
    self.mine: dict[int, str] = {}         # shard -> nonce of our claim
    self.finished: set[int] = set()        # shards seen done
    self.stealable: dict[int, str] = {}    # other hosts' claims at start

  # paths
  def file(self, k: int) -> str:
    return f"{SHARDS}/{k:06d}-{_safe_name(self.inputs[k])}.array_record"

  def _claim_path(self, k: int) -> str:
    return os.path.join(self.dir, CLAIMS, f"{k:06d}")

  def _done_path(self, k: int) -> str:
    return os.path.join(self.dir, DONE, f"{k:06d}.json")

  # setup
  def start(self) -> None:
    """Creates the directory, its plan and tokenizer (idempotent)."""
    os.makedirs(self.dir, exist_ok=True)
    data = json.dumps({**self.plan, "command": self.command}, indent=1,
                      sort_keys=True).encode()
    self._create(os.path.join(self.dir, PLAN), data)
    # Another process may have published its plan first: it must agree.
    check_out(self.dir, self.plan)
    for sub in (SHARDS, DONE, CLAIMS):
      os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
    tok_path = os.path.join(self.dir, TOKENIZER)
    if not os.path.isfile(tok_path):
      _write_atomic(tok_path, self.tok.model_proto, self.host)
    elif tokenizer_lib.Tokenizer.load(tok_path).fingerprint != (
        self.tok.fingerprint):
      raise ValueError(f"{tok_path} is another tokenizer than the plan's; "
                       f"use a new --out")
    if self.steal:
      for k in range(len(self.inputs)):
        owner = self._read_claim(self._claim_path(k))
        if isinstance(owner, dict) and owner.get("host") != self.host:
          self.stealable[k] = owner.get("nonce")

  def _create(self, path: str, data: bytes) -> None:
    """Writes `path` whole unless it exists (atomic create: link)."""
    tmp = f"{path}.tmp.{self.host}.{self.pid}"
    with open(tmp, "wb") as f:
      f.write(data)
    try:
      os.link(tmp, path)
    except FileExistsError:
      pass
    except OSError:   # no hard links here: an exclusive create instead
      try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        pass
      else:
        with os.fdopen(fd, "wb") as f:
          f.write(data)
    finally:
      os.remove(tmp)

  # claims
  def _read_claim(self, path: str) -> dict[str, Any] | None | str:
    """The claim's owner dict; None if unreadable; "gone" if absent."""
    try:
      with open(path) as f:
        owner = json.load(f)
    except FileNotFoundError:
      return "gone"
    except (OSError, ValueError):
      return None
    return owner if isinstance(owner, dict) else None

  def _stale(self, k: int, path: str, owner: dict[str, Any] | None
             ) -> bool:
    if owner is None:
      try:
        return time.time() - os.path.getmtime(path) > UNREADABLE_CLAIM_S
      except OSError:
        return False
    if owner.get("host") == self.host:
      pid = owner.get("pid")
      if not isinstance(pid, int) or pid <= 0:
        return True     # not a claim this module writes
      if pid == self.pid:   # a dead process's pid, reused
        return owner.get("nonce") not in self.mine.values()
      return not _alive(pid)
    return self.steal and self.stealable.get(k) == owner.get("nonce")

  def _claim(self, k: int) -> bool:
    """Whether this process now holds shard k (module docstring)."""
    path = self._claim_path(k)
    nonce = uuid.uuid4().hex
    data = json.dumps({"host": self.host, "pid": self.pid, "nonce": nonce,
                       "time": time.time()}).encode()
    for _ in range(2):   # once more if the claim vanished meanwhile
      try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        owner = self._read_claim(path)
        if owner == "gone":
          continue
        if not self._stale(k, path, owner):
          return False
        # Replace exactly the stale claim: re-read just before; a process
        # replacing it at the same moment may win instead (then both
        # write the shard, the same bytes).
        tmp = f"{path}.tmp.{self.host}.{self.pid}"
        with open(tmp, "wb") as f:
          f.write(data)
        if self._read_claim(path) != owner:
          os.remove(tmp)
          return False
        os.replace(tmp, path)
        got = self._read_claim(path)
        if not (isinstance(got, dict) and got.get("nonce") == nonce):
          return False
        self.mine[k] = nonce
        logging.warning("prepare: took over shard %d of %s from %s", k,
                        self.dir, f"{owner.get('host')} pid "
                        f"{owner.get('pid')}" if owner else "a dead claim")
        if owner:
          self._remove_temps(k, (owner.get("host"), owner.get("pid")))
        return True
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      self.mine[k] = nonce
      return True
    return False

  def _release(self, k: int) -> None:
    nonce = self.mine.pop(k, None)
    owner = self._read_claim(self._claim_path(k))
    if isinstance(owner, dict) and owner.get("nonce") == nonce:
      try:
        os.remove(self._claim_path(k))
      except FileNotFoundError:
        pass

  def _remove_temps(self, k: int | None, owner: tuple[str, int] | None
                    ) -> None:
    """Removes the temporary files of `owner` (host, pid), or of dead
    processes of this host when owner is None: shard k's, or (k None)
    every one in the directory."""
    if k is not None:
      folders = [os.path.join(self.dir, SHARDS)]
      prefix = os.path.basename(self.file(k)) + ".tmp."
    else:
      folders = [os.path.join(self.dir, sub) for sub in ("", SHARDS, DONE,
                                                        CLAIMS)]
      prefix = ""
    for folder in folders:
      for name in os.listdir(folder):
        who = _temp_owner(name)
        if who is None or not name.startswith(prefix):
          continue
        if owner is not None:
          stale = who == owner
        else:
          stale = who[0] == self.host and who[1] != self.pid and not (
              _alive(who[1]))
        if stale:
          try:
            os.remove(os.path.join(folder, name))
          except FileNotFoundError:
            pass

  # shards
  def _is_done(self, k: int) -> bool:
    if k in self.finished:
      return True
    try:
      with open(self._done_path(k)) as f:
        record = json.load(f)
      done = os.path.getsize(os.path.join(self.dir, record["file"])) == (
          record["bytes"])
    except (OSError, ValueError, KeyError, TypeError):
      done = False
    if done:
      self.finished.add(k)
    return done

  def _prepare_shard(self, k: int) -> None:
    # pylint: disable-next=g-import-not-at-top
    from array_record.python import array_record_module
    start = time.perf_counter()
    src = self.inputs[k]
    out = os.path.join(self.dir, self.file(k))
    tmp = f"{out}.tmp.{self.host}.{self.pid}"
    self._remove_temps(k, None)
    reader = shards_lib.ShardReader(
        [src], shuffle=False, num_epochs=1, text_key=self.plan["text_key"],
        separator=self.plan["separator"], max_bad_records=self.max_bad)
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    docs = tokens = 0
    inflight: collections.deque = collections.deque()
    depth = 2 * self.pool.workers + 2

    def drain(keep: int) -> None:
      nonlocal docs, tokens
      while len(inflight) > keep:
        ids, lengths, _ = inflight.popleft().result()
        at = 0
        for n in lengths.tolist():
          writer.write(shards_lib.encode_tokens(ids[at:at + n]))
          at += n
        docs += lengths.size
        tokens += ids.size

    try:
      texts, chars = [], 0
      for text in reader:
        texts.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
          inflight.append(self.pool.submit(texts))
          texts, chars = [], 0
          drain(depth)
      if texts:
        inflight.append(self.pool.submit(texts))
      drain(0)
      if not writer.ok():   # (False once closed: asked before)
        raise OSError(f"{tmp}: array_record writer failed")
      writer.close()
      os.replace(tmp, out)
    except BaseException as e:
      try:
        writer.close()
      except Exception:  # pylint: disable=broad-except  # already failing
        pass
      if os.path.lexists(tmp):
        os.remove(tmp)
      if isinstance(e, (OSError, RuntimeError)):
        diskspace.raise_if_full(e, tmp, 0, f"shard {k} of {self.dir}")
      if isinstance(e, RuntimeError):
        raise OSError(f"{tmp}: {e}") from None
      raise
    stats = reader.stats
    record = {"index": k, "input": src, "file": self.file(k),
              "documents": docs, "tokens": tokens,
              "records": stats.records, "bad_records": stats.bad_records,
              "skipped_empty": stats.skipped_empty,
              "bytes": os.path.getsize(out)}
    _write_atomic(self._done_path(k), json.dumps(record, sort_keys=True)
                  .encode(), self.host)
    self.finished.add(k)
    logging.info("prepare: shard %d/%d %s: %d documents, %d tokens "
                 "(%.1fs)", k + 1, len(self.inputs), src, docs, tokens,
                 time.perf_counter() - start)

  def _holders(self, pending: Sequence[int]) -> str:
    out = []
    for k in pending[:5]:
      owner = self._read_claim(self._claim_path(k))
      who = (f"{owner.get('host')} pid {owner.get('pid')}"
             if isinstance(owner, dict) else "?")
      out.append(f"shard {k} ({who})")
    more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
    return ", ".join(out) + more

  def run(self) -> dict[str, Any]:
    """Prepares what is left, waits for others, writes the manifest.

    Returns:
      The manifest.

    Raises:
      ValueError: a bad shard (one line naming it).
      Waited: --wait_s passed with shards still held by others.
    """
    deadline = None
    while True:
      pending = [k for k in range(len(self.inputs)) if not self._is_done(k)]
      if not pending:
        break
      worked = False
      for k in pending:
        if self._is_done(k) or not self._claim(k):
          continue
        try:
          if not self._is_done(k):   # finished between the look and claim
            self._prepare_shard(k)
            worked = True
        finally:
          self._release(k)
      if worked:
        deadline = None
        continue
      still = [k for k in pending if not self._is_done(k)]
      if not still:
        continue
      now = time.monotonic()
      if deadline is None:
        deadline = now + self.wait_s
        logging.info("prepare: waiting for %d shard(s) of %s that others "
                     "prepare: %s", len(still), self.dir,
                     self._holders(still))
      if now >= deadline:
        raise Waited(f"stopped waiting after {self.wait_s:g}s (--wait_s): "
                     f"{len(still)} shard(s) of {self.dir} still claimed by "
                     f"others: {self._holders(still)}; rerun later, or with "
                     f"--steal_claims if those processes are dead")
      time.sleep(POLL_S)
    return self._finish()

  def _finish(self) -> dict[str, Any]:
    records = []
    for k in range(len(self.inputs)):
      with open(self._done_path(k)) as f:
        record = json.load(f)
      records.append({key: record[key] for key in (
          "file", "input", "documents", "tokens", "records", "bad_records",
          "skipped_empty", "bytes")})
    manifest = {**self.plan, "shards": records,
                "documents": sum(r["documents"] for r in records),
                "tokens": sum(r["tokens"] for r in records)}
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    path = os.path.join(self.dir, MANIFEST)
    try:
      with open(path, "rb") as f:
        same = f.read() == data
    except FileNotFoundError:
      same = False
    if not same:
      _write_atomic(path, data, self.host)
    self._remove_temps(None, None)
    return manifest


def output_dirs(out: str, names: Sequence[str], mixture: bool
                ) -> list[str]:
  """The prepared directory of each source: --out, or --out/NAME."""
  if not mixture:
    return [out]
  for name in names:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
      raise ValueError(f"data.mixture name {name!r} cannot name a "
                       f"directory under --out (letters, digits, ._- only)")
  return [os.path.join(out, name) for name in names]


def prepare(data_cfg: Any, out: str, *, tokenizer_path: str = "",
          workers: int = -1, wait_s: float = 86400.0,
          steal_claims: bool = False, command: str = ""
          ) -> list[dict[str, Any]]:
  """Prepares the training sources of `data_cfg` under `out`.

  Args:
    data_cfg: the `data` config section (train_files or mixture,
      text_key, doc_separator, max_bad_records, tokenizer_model,
      vocab_size).
    out: --out.
    tokenizer_path: --tokenizer; "" = data.tokenizer_model.
    workers: tokenizer processes; -1 = `files.auto_workers(-1)`.
    wait_s: how long to wait for shards other processes hold.
    steal_claims: take over other hosts' claims present at the start.
    command: the command line, recorded in plan.json.

  Returns:
    The manifest of each source's directory.

  Raises:
    ValueError / FileNotFoundError: one line, before anything is
      written for config, tokenizer and --out; naming the shard for a
      bad shard.
    Waited: see `_Job.run`.
  """
  # pylint: disable-next=g-import-not-at-top
  from fp4jax.data import files, tokenize_pool   # files imports us
  if not out:
    raise ValueError("--out is required: the directory to prepare")
  out = os.path.abspath(os.path.expanduser(out))
  key = "--tokenizer" if tokenizer_path else "data.tokenizer_model"
  tokenizer_path = tokenizer_path or data_cfg.tokenizer_model
  if not tokenizer_path:
    raise ValueError("prepare needs data.tokenizer_model (or "
                     "--tokenizer=PATH): the model the shards are "
                     "tokenized with")
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path, key=key)
  if tok.vocab_size != data_cfg.vocab_size:
    raise ValueError(f"data.vocab_size={data_cfg.vocab_size} but {key}="
                     f"{tokenizer_path!r} has {tok.vocab_size} pieces; set "
                     f"--config.data.vocab_size={tok.vocab_size}")
  max_bad = data_cfg.get("max_bad_records", 0)
  if max_bad < 0:
    raise ValueError(f"data.max_bad_records must be >= 0, got {max_bad}")
  workers = files.auto_workers(workers)
  srcs = files.sources(data_cfg, "train")
  for src in srcs:
    if src.tokens:
      raise ValueError(f"data source {src.name!r} is already a prepared "
                       f"directory; prepare reads raw shards")
  mixture = bool(tuple(data_cfg.get("mixture", ()) or ()))
  dirs = output_dirs(out, [s.name for s in srcs], mixture)
  plans = [plan_for(s.shards, tok, data_cfg.text_key,
                    data_cfg.doc_separator) for s in srcs]
  done = [check_out(d, p) for d, p in zip(dirs, plans)]
  for src, finished in zip(srcs, done):
    if not finished:   # a wrong text_key or format fails before writing
      reader = shards_lib.ShardReader(
          src.shards[:1], shuffle=False, num_epochs=1,
          text_key=data_cfg.text_key, separator=data_cfg.doc_separator,
          max_bad_records=max_bad)
      next(iter(reader), None)
  manifests = []
  pool = None
  try:
    for directory, plan, finished in zip(dirs, plans, done):
      if finished:
        logging.info("prepare: %s is already prepared", directory)
        manifests.append(read_manifest(directory))
        continue
      if pool is None:
        pool = tokenize_pool.TokenizePool(tok, workers)
      job = _Job(directory, plan, tok, pool, max_bad_records=max_bad,
                 wait_s=wait_s, steal_claims=steal_claims,
                 command=command)
      job.start()
      manifests.append(job.run())
  finally:
    if pool is not None:
      pool.close()
  return manifests


# --- the command ---------------------------------------------------------


def _usage_line(out: str, mixture: Sequence[tuple[str, float, Any]],
                manifests: Sequence[dict[str, Any]]) -> str:
  docs = sum(m["documents"] for m in manifests)
  tokens = sum(m["tokens"] for m in manifests)
  shards = sum(len(m["shards"]) for m in manifests)
  if mixture:
    use = ("--config.data.mixture=\"(" + ", ".join(
        f"'{n}:{w:g}:{os.path.join(out, n)}'" for n, w, _ in mixture) +
           ",)\"")
  else:
    use = f"--config.data.train_files={out}"
  return (f"prepared {out}: {shards} shard(s), {docs} documents, {tokens} "
          f"tokens; train with --config.data.source=files {use}")


def main(argv: Sequence[str] | None = None) -> None:
  """The command (module docstring); exits with its code."""
  # pylint: disable=g-import-not-at-top
  import signal
  from absl import app, flags
  from ml_collections import config_flags
  from fp4jax import errtext
  # pylint: enable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
    sys.stdout.write(__doc__.strip() + "\n")
    sys.exit(0)
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith(
      "--config=")), None)
  if not spec:
    sys.exit("error: --config is required, e.g. --config=configs/demo.py")
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    sys.exit(f"error: --config: no such file {path!r}")
  # configs import `configs.*`: the config file's grandparent goes first.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  config = config_flags.DEFINE_config_file("config", lock_config=True)
  out = flags.DEFINE_string("out", None, "The prepared directory.")
  tok = flags.DEFINE_string("tokenizer", "", "SentencePiece model; "
                            "overrides data.tokenizer_model.")
  workers = flags.DEFINE_integer("workers", -1, "Tokenizer processes; -1 = "
                                 "one per core but one (at most 8).")
  wait_s = flags.DEFINE_float("wait_s", 86400.0, "Seconds to wait for "
                              "shards other processes are preparing.")
  steal = flags.DEFINE_bool("steal_claims", False, "Take over the claims "
                            "of other hosts present at the start (their "
                            "runs are dead).")
  trace = flags.DEFINE_bool("traceback", False, "Full stack on errors.")

  def parse(args: list[str]) -> list[str]:
    try:
      return flags.FLAGS(args)
    except (KeyError, AttributeError) as e:   # an unknown --config.a.b
      sys.exit(f"error: {_unknown_key(spec, args) or errtext.one_line(e)}")
    except (ValueError, TypeError, flags.Error) as e:
      sys.exit(f"error: {errtext.one_line(e)}")

  class Stopped(Exception):   # SIGTERM: unwinds, dropping the open shard
    pass

  def stop(signum, _):
    raise Stopped(signum)

  def run(_) -> None:
    signal.signal(signal.SIGTERM, stop)
    command = " ".join(shlex.quote(a) for a in [
        "python", "-m", "fp4jax.data.prepare", *argv[1:]])
    cfg = config.value.data
    try:
      manifests = prepare(cfg, out.value or "", tokenizer_path=tok.value,
                          workers=workers.value, wait_s=wait_s.value,
                          steal_claims=steal.value, command=command)
    except KeyboardInterrupt:
      if trace.value:
        raise
      print("aborted: interrupted (Ctrl-C); rerun to go on", file=sys.stderr)
      sys.exit(128 + signal.SIGINT)
    except Stopped:
      print("stopped by SIGTERM; rerun to go on", file=sys.stderr)
      sys.exit(128 + signal.SIGTERM)
    except Waited as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_WAITED)
    except (ValueError, OSError) as e:
      if trace.value:
        raise
      print(f"error: {errtext.one_line(e)}", file=sys.stderr)
      sys.exit(EXIT_ERROR)
    from fp4jax.data import files  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=protected-access
    mixture = files._mixture_entries(tuple(cfg.get("mixture", ()) or ()))
    print(_usage_line(os.path.abspath(out.value), mixture, manifests))

  app.run(run, argv=argv, flags_parser=parse)


def _unknown_key(spec: str, argv: Sequence[str]) -> str | None:
  """One line naming the first --config.a.b the config file lacks."""
  # pylint: disable-next=g-import-not-at-top
  import importlib.util
  path, _, arg = spec.partition(":")
  loader = importlib.util.spec_from_file_location("fp4jax_prepare_cfg", path)
  module = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(module)
  cfg = module.get_config(*([arg] if arg else []))
  for key in (a[9:].split("=")[0] for a in argv
              if a.startswith("--config.")):
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        where = ".".join(parts[:i]) or "config"
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"unknown config key {key!r}; valid keys in {where}: {valid}"
      node = node[part]
  return None


if __name__ == "__main__":
  main()
