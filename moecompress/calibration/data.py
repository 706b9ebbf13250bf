"""Calibration data: local ``.jsonl``/``.txt`` files, a Hugging Face dataset by name, or the bundled set.

A calibration set is ``num_samples`` token sequences of exactly ``seq_len`` tokens. Each sequence starts with the
tokenizer's document separator (BOS, or ``<|endoftext|>`` when there is no BOS: the test-bed models were trained
with it between documents), followed by ``seq_len - 1`` consecutive tokens of one domain's text stream. Sampling is
seeded and round-robins over domains, so every domain is represented (its per-sample domain is kept, so the report
can show expert usage per domain). ``sha256`` is taken over the token ids (int64, little endian), so two runs on the
same tokens have the same hash whatever files they came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from moecompress.errors import CalibrationError

BUNDLED_CALIBRATION_DIR = Path(__file__).resolve().parents[1] / "data" / "calib"


def bundled_calibration_dir() -> Path:
    """The small calibration set shipped inside the package (``moecompress/data/calib``: in the wheel too;
    ``demo/calib`` links to it in a source checkout)."""
    if BUNDLED_CALIBRATION_DIR.is_dir():
        return BUNDLED_CALIBRATION_DIR
    raise CalibrationError(
        f"the bundled calibration set is missing ({BUNDLED_CALIBRATION_DIR}); reinstall moecompress, or pass "
        "calibration files explicitly (`calibration: {files: [...]}`)"
    )


@dataclass
class Document:
    text: str
    domain: str


@dataclass
class CalibrationSet:
    """Token ids ready for a calibration pass.

    input_ids: ``[num_samples, seq_len]`` int64, each row starting with the separator token.
    domains: domain name of each row (``len == num_samples``).
    sources: the files or dataset the text came from.
    """

    input_ids: torch.Tensor
    domains: list[str]
    sources: list[str]
    seed: int
    separator_token_id: int
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = token_ids_sha256(self.input_ids)

    @property
    def num_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def domain_names(self) -> list[str]:
        """Distinct domains in first-seen order."""
        return list(dict.fromkeys(self.domains))

    def domain_ids(self) -> torch.Tensor:
        """``[num_samples]`` index of each row's domain in :attr:`domain_names`."""
        names = self.domain_names
        return torch.tensor([names.index(domain) for domain in self.domains], dtype=torch.long)

    def describe(self) -> dict:
        """The ``calibration`` entry of ``report.json`` (without per-domain usage, which the pass adds)."""
        return {
            "sha256": self.sha256,
            "files": self.sources,
            "num_samples": self.num_samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "domains": {name: self.domains.count(name) for name in self.domain_names},
        }


def token_ids_sha256(input_ids: torch.Tensor) -> str:
    """sha256 of the token ids as little-endian int64 (shape ``[N, S]``) plus the shape."""
    array = input_ids.to(torch.int64).contiguous().numpy()
    digest = hashlib.sha256(str(tuple(array.shape)).encode())
    digest.update(array.astype("<i8").tobytes())
    return digest.hexdigest()


def separator_token_id(tokenizer) -> int:
    """BOS if the tokenizer has one, else EOS, else ``<|endoftext|>``."""
    for token_id in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise CalibrationError(
            "the tokenizer has no BOS, EOS or <|endoftext|> token to separate calibration documents; "
            "set tokenizer.bos_token before calibrating"
        )
    return int(token_id)


# ----- reading documents ---------------------------------------------------------------------------------------
def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    """Documents from ``.jsonl`` (``text`` field, optional ``domain``), ``.txt`` files, or folders of them.

    A ``.txt`` file is one document whose domain is the file stem; blank-line-separated paragraphs stay together.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted([*path.glob("*.jsonl"), *path.glob("*.txt")])
            if not found:
                raise CalibrationError(f"calibration folder {path} has no .jsonl or .txt files; add some or point at files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CalibrationError(f"calibration file {path} does not exist; check the path in `calibration.files`")
    documents: list[Document] = []
    for path in files:
        documents.extend(_read_file(path))
    return documents


def _read_file(path: Path) -> list[Document]:
    if path.suffix == ".jsonl":
        documents = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise CalibrationError(f"{path}:{line_number} is not valid JSON ({error}); fix or remove the line") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise CalibrationError(
                        f"{path}:{line_number} has no string `text` field; each line must look like "
                        '{"text": "...", "domain": "optional"}'
                    )
                if row["text"].strip():
                    documents.append(Document(row["text"], str(row.get("domain") or path.stem)))
        if not documents:
            raise CalibrationError(f"calibration file {path} has no non-empty `text` rows; fill it or drop it from the recipe")
        return documents
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise CalibrationError(f"calibration file {path} is empty; fill it or drop it from the recipe")
        return [Document(text, path.stem)]
    raise CalibrationError(f"calibration file {path} has an unsupported type {path.suffix!r}; use .jsonl (with a `text` field) or .txt")


CHAT_FIELDS = ("messages", "conversations", "conversation")  # fields that hold [{"role", "content"}] lists


def read_dataset(name: str, tokenizer=None, *, config: str | None = None, split: str = "train",
                 text_field: str | None = None, chat_template: bool | None = None,
                 max_documents: int = 20000) -> list[Document]:
    """Documents of a dataset: a Hugging Face hub id (network, or the datasets cache) or a local folder in the
    datasets layout (data files ``load_dataset`` reads, or a ``save_to_disk`` folder).

    text_field: the field holding each document; default ``text``, else the first of :data:`CHAT_FIELDS`.
    A field holding chat messages (``[{"role", "content"}]``) is rendered with the tokenizer's chat template, as
    llm-compressor does; ``chat_template: false`` joins the messages as ``role: content`` lines instead.
    A row's ``domain`` field, when it has one, is kept (the report shows expert usage per domain).
    """
    local = Path(name).expanduser()
    if not local.exists() and (os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise CalibrationError(
            f"cannot download dataset {name!r}: offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE). "
            "Use local files (`calibration: {files: [...]}`), a local dataset folder, the bundled set, or unset "
            "offline mode."
        )
    rows = _dataset_rows(str(local) if local.exists() else name, config, split)
    documents = []
    field_name = text_field
    for row in rows:
        if field_name is None:
            field_name = _text_field_of(row, name)
        if field_name not in row:
            raise CalibrationError(f"dataset {name!r} has no field {field_name!r} (fields: {', '.join(row)}); set "
                                   "calibration.text_field to the field that holds the text")
        text = _document_text(row[field_name], tokenizer, chat_template, name, field_name)
        if text.strip():
            domain = row.get("domain") if isinstance(row.get("domain"), str) and row.get("domain") else name
            documents.append(Document(text, domain))
        if len(documents) >= max_documents:
            break
    if not documents:
        raise CalibrationError(f"dataset {name!r} split {split!r} has no non-empty {field_name or 'text'!r} rows")
    return documents


def _dataset_rows(name: str, config: str | None, split: str):
    """The rows of ``split`` (a ``save_to_disk`` folder is read with ``load_from_disk``, anything else streamed)."""
    try:
        import datasets  # heavy, and only for `calibration.dataset`
    except ImportError:  # pragma: no cover - depends on the environment
        raise CalibrationError("the `datasets` package is needed for `calibration.dataset`; pip install datasets") from None
    folder = Path(name)
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            loaded = datasets.load_from_disk(str(folder))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as error:  # the hub and the builders raise many types; one clear message instead
        raise CalibrationError(f"could not load dataset {name!r} ({type(error).__name__}: {error}); check the name, "
                               "config and split, or use local files") from None


def _text_field_of(row: dict, name: str) -> str:
    for candidate in ("text", *CHAT_FIELDS):
        if candidate in row:
            return candidate
    raise CalibrationError(f"dataset {name!r} has no `text` or chat messages field (fields: {', '.join(row)}); set "
                           "calibration.text_field to the field that holds the text")


def _document_text(value, tokenizer, chat_template: bool | None, name: str, field_name: str) -> str:
    """A row's text: the string itself, or chat messages rendered (see :func:`read_dataset`)."""
    if isinstance(value, str):
        return value
    is_chat = isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    if not is_chat:
        raise CalibrationError(f"dataset {name!r}: field {field_name!r} holds {type(value).__name__}, not text or "
                               'chat messages ([{"role", "content"}]); set calibration.text_field to a text field')
    if chat_template is False:
        return "\n".join(f"{message['role']}: {message['content']}" for message in value)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise CalibrationError(f"dataset {name!r}: field {field_name!r} holds chat messages but the tokenizer has no "
                               "chat template; set calibration.chat_template: false to use the messages as plain "
                               "`role: content` text")
    return tokenizer.apply_chat_template(value, tokenize=False)


# ----- sampling ------------------------------------------------------------------------------------------------
def sample_sequences(documents: list[Document], tokenizer, *, num_samples: int, seq_len: int, seed: int = 0,
                     sources: list[str] | None = None) -> CalibrationSet:
    """Seeded fixed-length samples, round-robin over domains (see module docstring)."""
    if num_samples < 1:
        raise CalibrationError(f"num_samples must be at least 1 (got {num_samples})")
    if seq_len < 2:
        raise CalibrationError(f"seq_len must be at least 2 (got {seq_len}): one separator token plus text")
    if not documents:
        raise CalibrationError("no calibration documents; give files with text or use the bundled set")
    separator = separator_token_id(tokenizer)
    rng = random.Random(seed)
    by_domain: dict[str, list[Document]] = {}
    for document in documents:
        by_domain.setdefault(document.domain, []).append(document)
    streams = {domain: _DomainStream(docs, tokenizer, separator, rng) for domain, docs in by_domain.items()}
    domain_order = sorted(streams)
    rng.shuffle(domain_order)

    rows: list[list[int]] = []
    row_domains: list[str] = []
    while len(rows) < num_samples and domain_order:
        for domain in list(domain_order):
            if len(rows) >= num_samples:
                break
            chunk = streams[domain].take(seq_len - 1)
            if chunk is None:
                domain_order.remove(domain)
                continue
            rows.append([separator, *chunk])
            row_domains.append(domain)
    if len(rows) < num_samples:
        raise CalibrationError(
            f"the calibration text holds only {len(rows)} sequences of {seq_len} tokens, but num_samples={num_samples}; "
            "add text, or lower num_samples or seq_len"
        )
    return CalibrationSet(
        input_ids=torch.tensor(rows, dtype=torch.long),
        domains=row_domains,
        sources=sources or [],
        seed=seed,
        separator_token_id=separator,
    )


class _DomainStream:
    """One domain's documents, shuffled, tokenized lazily and joined with the separator token."""

    def __init__(self, documents: list[Document], tokenizer, separator: int, rng: random.Random) -> None:
        self._documents = list(documents)
        rng.shuffle(self._documents)
        self._tokenizer = tokenizer
        self._separator = separator
        self._buffer: list[int] = []
        self._next_document = 0

    def take(self, count: int) -> list[int] | None:
        while len(self._buffer) < count and self._next_document < len(self._documents):
            text = self._documents[self._next_document].text
            self._next_document += 1
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
            # documents after the first are separated as in training; the row itself gets its own separator
            self._buffer.extend(([self._separator] if self._buffer else []) + list(ids))
        if len(self._buffer) < count:
            return None
        chunk, self._buffer = self._buffer[:count], self._buffer[count:]
        return chunk


def load_calibration(tokenizer, *, files: list[str | Path] | str | None = None, dataset: str | None = None,
                     dataset_config: str | None = None, dataset_split: str = "train", num_samples: int = 64,
                     seq_len: int = 512, seed: int = 0, text_field: str | None = None,
                     chat_template: bool | None = None) -> CalibrationSet:
    """Build a :class:`CalibrationSet` from files, a dataset (hub id or local folder, :func:`read_dataset`), or
    (neither given, or ``files: bundled``) the bundled set."""
    if files and dataset:
        raise CalibrationError("give either calibration `files` or a `dataset`, not both")
    if isinstance(files, (str, Path)):
        files = [files]
    if dataset:
        documents = read_dataset(dataset, tokenizer, config=dataset_config, split=dataset_split,
                                 text_field=text_field, chat_template=chat_template)
        prefix = "" if Path(dataset).expanduser().exists() else "hf:"
        sources = [f"{prefix}{dataset}" + (f"/{dataset_config}" if dataset_config else "") + f":{dataset_split}"
                   + (f"[{text_field}]" if text_field else "")]
    else:
        if not files or list(map(str, files)) == ["bundled"]:
            files = [bundled_calibration_dir()]
        documents = read_documents(files)
        sources = [str(Path(path)) for path in files]
    return sample_sequences(documents, tokenizer, num_samples=num_samples, seq_len=seq_len, seed=seed, sources=sources)
