"""Calibration and evaluation text: the shipped public-domain defaults, reading a user's file,
and cutting token ids into calibration samples."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CALIBRATION_TEXT = DATA_DIR / "calibration_alice_ch1-4.txt"
DEFAULT_HELDOUT_TEXT = DATA_DIR / "heldout_sherlock_scandal_in_bohemia.txt"


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
