"""Calibration and evaluation texts: the shipped defaults, reading a user's file, rendering chat
turns through the model's chat template, and cutting token ids into calibration samples.

The default calibration set mixes four domains in equal shares (prose, technical documentation,
source code, chat), so that no single kind of text decides what GPTQ fits; the default held-out
texts are four other texts of those domains (launch/data/README.md says where each comes from).
A text file is used as it is; a `.json` file holds chat conversations ({"conversations": [[{"role",
"content"}, ...], ...]}) and is rendered through the tokenizer's own chat template.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CALIBRATION_TEXT = DATA_DIR / "calibration_alice_ch1-4.txt"  # the prose part of the default set
DEFAULT_HELDOUT_TEXT = DATA_DIR / "heldout_sherlock_scandal_in_bohemia.txt"  # the prose held-out text

# domain -> shipped file; the default calibration set draws the same number of samples from each
DEFAULT_CALIBRATION_SET = {
    "prose": DEFAULT_CALIBRATION_TEXT,
    "docs": DATA_DIR / "calibration_python_docs.txt",
    "code": DATA_DIR / "calibration_python_code.txt",
    "chat": DATA_DIR / "calibration_chat.json",
}
DEFAULT_HELDOUT_TEXTS = {
    "manual": DATA_DIR / "heldout_idle_manual.txt",
    "code": DATA_DIR / "heldout_python_calendar_py.txt",
    "chat": DATA_DIR / "heldout_chat.json",
    "prose": DEFAULT_HELDOUT_TEXT,
}
DEFAULT_SET_NAME = "default"


def read_text(path: str | Path, what: str = "text") -> str:
    """The file's text; a missing, unreadable or blank file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text: {e}") from None
    if not text.strip():
        raise ValueError(f"{what} file {path} is empty: give a file with some text in it")
    return text


def is_chat_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".json"


def read_conversations(path: str | Path, what: str = "text") -> list[list[dict]]:
    """The conversations of a chat file, each checked to be a list of {role, content} strings."""
    try:
        data = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None
    conversations = data.get("conversations") if isinstance(data, dict) else data
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{what} file {path}: expected {{\"conversations\": [[{{\"role\": ..., \"content\": ...}}, ...], "
                         f"...]}} with at least one conversation")
    for i, conversation in enumerate(conversations):
        if not isinstance(conversation, list) or not conversation or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in conversation):
            raise ValueError(f"{what} file {path}: conversation {i} is not a non-empty list of "
                             f"{{\"role\": str, \"content\": str}} messages")
    return conversations


def render_chat(conversations: list[list[dict]], tokenizer) -> str:
    """Every conversation through the tokenizer's chat template, one after another (a model
    without a template gets plain `role: content` lines, with a warning)."""
    if getattr(tokenizer, "chat_template", None):
        return "".join(tokenizer.apply_chat_template(c, tokenize=False) for c in conversations)
    logger.warning("the tokenizer has no chat template: chat turns rendered as plain 'role: content' lines")
    return "\n\n".join("\n".join(f"{m['role']}: {m['content']}" for m in c) for c in conversations) + "\n"


def text_token_ids(path: str | Path, tokenizer, what: str = "text") -> list[int]:
    """The token ids of a text file, or of a chat file rendered through the model's template."""
    if is_chat_file(path):
        text = render_chat(read_conversations(path, what), tokenizer)
    else:
        text = read_text(path, what)
    return tokenizer(text)["input_ids"]


@dataclass(frozen=True)
class CalibrationSource:
    """One file of a calibration mix and its share (weight relative to the others)."""

    path: Path
    weight: float = 1.0
    name: str = ""  # domain label, for the log

    @property
    def label(self) -> str:
        return self.name or self.path.name


def parse_calibration_spec(spec: str) -> tuple[str, float]:
    """`FILE` or `FILE:WEIGHT` (a positive number) -> (FILE, WEIGHT); an existing file whose
    name itself ends in `:N` is taken as a file. `default` names the shipped set."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).exists():
        return spec, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return spec, 1.0  # a ':' that is part of the path
    if not weight > 0 or weight == float("inf"):
        raise ValueError(f"--calib {spec}: the weight after ':' must be a positive number, got {tail!r}")
    return head, weight


def calibration_sources(specs: list[str] | None) -> list[CalibrationSource]:
    """The sources of `--calib` specs (None or []: the default set). `default[:W]` expands to the
    shipped domains, which share its weight W equally."""
    sources = []
    for spec in specs or [DEFAULT_SET_NAME]:
        name, weight = parse_calibration_spec(spec)
        if name == DEFAULT_SET_NAME and not Path(name).exists():
            share = weight / len(DEFAULT_CALIBRATION_SET)
            sources += [CalibrationSource(p, share, domain) for domain, p in DEFAULT_CALIBRATION_SET.items()]
        else:
            sources.append(CalibrationSource(Path(name), weight))
    return sources


def split_samples(num_samples: int, weights: list[float]) -> list[int]:
    """`num_samples` split in proportion to `weights` (largest remainder; ties to the earlier)."""
    total = sum(weights)
    exact = [num_samples * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: num_samples - sum(counts)]:
        counts[i] += 1
    return counts


def calibration_samples(token_ids: list[int], num_samples: int, seqlen: int) -> list[list[int]]:
    """`num_samples` windows of `seqlen` tokens, evenly spaced over the text (disjoint when the
    text has at least num_samples * seqlen tokens, overlapping otherwise). Deterministic."""
    if num_samples < 1 or seqlen < 2:
        raise ValueError(f"need samples >= 1 and seqlen >= 2, got samples={num_samples}, seqlen={seqlen}")
    if len(token_ids) < seqlen:
        raise ValueError(f"the calibration text has {len(token_ids)} tokens, fewer than one sample of seqlen={seqlen}; "
                         f"give a longer text or a smaller --seqlen")
    last_start = len(token_ids) - seqlen
    starts = [round(i * last_start / (num_samples - 1)) if num_samples > 1 else 0 for i in range(num_samples)]
    return [token_ids[s:s + seqlen] for s in starts]


def calibration_windows(token_ids: list[int], num_samples: int, seqlen: int,
                        seed: int | random.Random | None) -> list[list[int]]:
    """`num_samples` windows of `seqlen` tokens: evenly spaced (seed None), or at start positions
    drawn uniformly with Python's `random.Random(seed)` (portable: the same windows on any machine
    and in any venv; or with a given generator), sorted."""
    if seed is None or num_samples < 1 or len(token_ids) < seqlen:
        return calibration_samples(token_ids, num_samples, seqlen)  # also the input errors
    draw = seed if isinstance(seed, random.Random) else random.Random(seed)
    starts = sorted(draw.randrange(len(token_ids) - seqlen + 1) for _ in range(num_samples))
    return [token_ids[s:s + seqlen] for s in starts]


@dataclass
class MixPart:
    source: CalibrationSource
    tokens: int  # of the whole text
    samples: int  # windows taken from it


def calibration_mix(sources: list[CalibrationSource], tokenizer, num_samples: int, seqlen: int,
                    seed: int | None = None) -> tuple[list[list[int]], list[MixPart]]:
    """Samples from every source in proportion to its weight: evenly spaced windows of each text
    (seed None) or windows at random positions (Python's random.Random(seed), portable). Errors
    (ValueError / FileNotFoundError) name the file."""
    if num_samples < 1 or seqlen < 2:
        raise ValueError(f"need samples >= 1 and seqlen >= 2, got samples={num_samples}, seqlen={seqlen}")
    counts = split_samples(num_samples, [s.weight for s in sources])
    draw = None if seed is None else random.Random(seed)
    samples, parts = [], []
    for source, count in zip(sources, counts):
        ids = text_token_ids(source.path, tokenizer, "calibration text")
        if count and len(ids) < seqlen:
            raise ValueError(f"calibration text {source.path} has {len(ids)} tokens, fewer than one sample of "
                             f"seqlen={seqlen}; give a longer text or a smaller --seqlen")
        if count:
            samples += calibration_windows(ids, count, seqlen, draw)
        parts.append(MixPart(source, len(ids), count))
    return samples, parts
