"""Byte-level text from the standard library's own source: the ``.py`` files of the running Python.

Every Python installation ships them, so the language-model benchmark needs no download. The files are
those under ``sysconfig.get_paths()["stdlib"]`` except ``site-packages`` (what the user installed) and the
test suites (directories named ``test``, ``tests``, ``idle_test``: generated fixtures and long data tables
that are not the code people write); symbolic links are not followed.

Split by file, never by byte, so no file's text is in two splits: each file's path relative to the stdlib
root is hashed (SHA-256), and the hash's first 8 bytes as a fraction ``h ∈ [0, 1)`` place it in
validation (``h < val_fraction``), test (``h < val_fraction + test_fraction``) or train. The hash also
orders the files of each split (by ``h``), so a split read up to a byte budget takes files in an order
that mixes packages instead of the alphabetical order (which would fill a small budget with ``asyncio``).
The same Python version gives the same splits on every machine; ``digest`` names the file list.

A split is the files' bytes concatenated in that order, each file followed by a newline, cut at the
budget; tokens are bytes (vocabulary 256).
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "validation", "test")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[str]:
    """Paths (relative to ``root``, POSIX form, sorted) of the ``.py`` files under ``root`` outside
    ``EXCLUDED_DIRS``."""
    root = stdlib_root() if root is None else root
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if path.is_file() and not path.is_symlink() and not EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            out.append(rel.as_posix())
    return sorted(out)


def file_hash(rel_path: str) -> float:
    """The path's SHA-256 as a fraction in [0, 1): its split and its place in the split's order."""
    return int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") / 2.0 ** 64


def split_of(rel_path: str, val_fraction: float, test_fraction: float) -> str:
    h = file_hash(rel_path)
    if h < val_fraction:
        return "validation"
    if h < val_fraction + test_fraction:
        return "test"
    return "train"


def split_files(files: list[str], val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """``{split: [path, ...]}``, each split's files in hash order."""
    if not (0.0 < val_fraction and 0.0 < test_fraction and val_fraction + test_fraction < 1.0):
        raise ValueError(f"data.val_fraction and data.test_fraction must be > 0 with a sum < 1 "
                         f"(got {val_fraction!r}, {test_fraction!r})")
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in files:
        out[split_of(rel, val_fraction, test_fraction)].append(rel)
    for names in out.values():
        names.sort(key=file_hash)
    return out


@dataclass
class TextSplit:
    """One split's bytes as a ``(n,)`` uint8 tensor, and the files they came from (the last one may be cut)."""

    name: str
    data: torch.Tensor
    files: list[str]

    def __len__(self) -> int:
        return self.data.numel()


def read_split(name: str, files: list[str], budget: int, root: Path | None = None) -> TextSplit:
    """The first ``budget`` bytes of ``files`` (in the order given), each file followed by ``\\n``; fewer if
    the files hold fewer. Reads no file past the budget."""
    if budget < 1:
        raise ValueError(f"the byte budget of split {name!r} must be positive (got {budget!r})")
    root = stdlib_root() if root is None else root
    chunks, used, total = [], [], 0
    for rel in files:
        if total >= budget:
            break
        text = (root / rel).read_bytes() + b"\n"
        chunks.append(text[:budget - total])
        used.append(rel)
        total += len(chunks[-1])
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    return TextSplit(name, data, used)


def digest(files: list[str]) -> str:
    """A short name for a file list (SHA-256 of the paths), to tell whether two runs read the same corpus."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()[:12]


def load_splits(cfg, root: Path | None = None) -> dict[str, TextSplit]:
    """The three splits with budgets ``cfg.train_bytes``, ``cfg.val_bytes``, ``cfg.test_bytes`` and fractions
    ``cfg.val_fraction``, ``cfg.test_fraction``."""
    files = split_files(source_files(root), float(cfg.val_fraction), float(cfg.test_fraction))
    budgets = {"train": int(cfg.train_bytes), "validation": int(cfg.val_bytes), "test": int(cfg.test_bytes)}
    return {s: read_split(s, files[s], budgets[s], root) for s in SPLITS}


def random_windows(split: TextSplit, batch_size: int, context: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows of ``context + 1`` bytes at uniform random offsets: inputs ``(B, T)`` and next-byte
    targets ``(B, T)``, both int64."""
    if len(split) <= context + 1:
        raise ValueError(f"split {split.name!r} holds {len(split)} bytes, fewer than context + 1 = {context + 1}")
    starts = torch.randint(len(split) - context - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)
    window = split.data[idx].long()
    return window[:, :-1], window[:, 1:]


def tiled_windows(split: TextSplit, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split cut into consecutive non-overlapping windows (the evaluation set: every byte after the
    first is predicted once, the remainder shorter than a window dropped): ``(W, T)`` inputs and targets."""
    n = (len(split) - 1) // context
    if n < 1:
        raise ValueError(f"split {split.name!r} holds {len(split)} bytes, fewer than context + 1 = {context + 1}")
    data = split.data[:n * context + 1].long()
    return data[:-1].view(n, context), data[1:].view(n, context)
