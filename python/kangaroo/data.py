"""Corpora and tokenizers for adapter training and the embedded demo model.

- `stdlib_source_files` / `split_stdlib`: the Python standard library's source, the text every machine has, split
  deterministically (by a hash of each file's relative path) into training files and held-out files.
- `train_bpe_tokenizer`: a byte-level BPE (`tokenizers`) with the special tokens and chat template the demo uses.
- `load_examples` / `PackedDataset`: plain text files, JSONL of text, or ShareGPT-style conversations rendered with
  the tokenizer's chat template, with a per-token mask that keeps user (and system) turns out of the loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

BOS = "<|bos|>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
END_TURN = "<|end|>"
SPECIAL_TOKENS = [EOS, BOS, PAD, SYSTEM, USER, ASSISTANT, END_TURN]

# A small chat template (Jinja, as HF tokenizers take it). Assistant turns end with END_TURN, the loss covers them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------------
# The Python standard library as a corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None, max_bytes: int = 1_000_000) -> list[Path]:
    """All `.py` files of the standard library (no site-packages), sorted, at most `max_bytes` each."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                p = Path(dirpath) / name
                try:
                    if 0 < p.stat().st_size <= max_bytes:
                        out.append(p)
                except OSError:
                    continue
    return out


def _path_hash(rel: str) -> float:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_stdlib(files: Sequence[Path], root: Path | None = None, heldout_frac: float = 0.03):
    """Deterministic split into (train, heldout) by a hash of the relative path (stable across machines)."""
    root = Path(root) if root is not None else stdlib_root()
    train, held = [], []
    for p in files:
        try:
            rel = str(Path(p).relative_to(root))
        except ValueError:
            rel = str(p)
        (held if _path_hash(rel) < heldout_frac else train).append(Path(p))
    return train, held


def read_text(path: Path) -> str | None:
    """UTF-8 text of a file, or None when it is not valid UTF-8 (a few stdlib test files are deliberately not)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def sample_texts(files: Sequence[Path], max_bytes: int, seed: int = 0) -> list[str]:
    """Texts of a seeded random subset of `files`, about `max_bytes` in total."""
    order = list(files)
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for p in order:
        if total >= max_bytes:
            break
        t = read_text(p)
        if t:
            out.append(t)
            total += len(t.encode("utf-8"))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Byte-level BPE over `texts`; returns a `transformers.PreTrainedTokenizerFast` with the special tokens and
    the chat template set (save it with `save_pretrained`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------------------------------------------------
# Training examples: token ids plus a per-token loss mask (1 = the token is something the model should predict)


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # per token: 1 if the token is trained on (predicted from the previous position)


def _normalise_messages(record) -> list[dict] | None:
    """ShareGPT ({"conversations": [{"from", "value"}]}) or OpenAI-style ({"messages": [{"role", "content"}]})."""
    msgs = record.get("conversations") if isinstance(record, dict) else None
    if msgs is None and isinstance(record, dict):
        msgs = record.get("messages")
    if msgs is None and isinstance(record, list):
        msgs = record
    if not isinstance(msgs, list):
        return None
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
             "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
    out = []
    for m in msgs:
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None or content is None:
            return None
        out.append({"role": roles.get(str(role).lower(), str(role).lower()), "content": str(content)})
    return out


def chat_example(tokenizer, messages: list[dict]) -> Example:
    """Render `messages` with the tokenizer's chat template; mask in only the assistant turns' content and their
    end-of-turn text (the template's assistant header is context, not a target).

    The character span of assistant turn i is [len(render(msgs[:i], add_generation_prompt=True)),
    len(render(msgs[:i+1]))); tokens are assigned to spans by their character offsets."""
    def render(msgs, gen=False):
        if not msgs:
            return ""
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(messages[:i], gen=True))
        end = len(render(messages[: i + 1]))
        if not full.startswith(render(messages[: i + 1])):
            raise ValueError("the chat template does not render conversations prefix-consistently; cannot mask turns")
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = []
    for a, b in enc["offset_mapping"]:
        mask.append(int(any(s <= a and b <= e and b > a for s, e in spans)))
    return Example(ids, mask)


def text_example(tokenizer, text: str, add_eos: bool = True) -> Example:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Example(ids, [1] * len(ids))


def _iter_records(path: Path) -> Iterator[object]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield json.loads(line)
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        yield from (data if isinstance(data, list) else [data])


def iter_corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus every file under a named folder (sorted)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"corpus path {p} does not exist")
    return out


def load_examples(paths: Sequence[str | Path], tokenizer, fmt: str = "auto") -> list[Example]:
    """Examples from plain text files, JSONL/JSON of {"text": ...}, or ShareGPT-style conversations.

    fmt: "auto" (by suffix and record shape), "text", "jsonl" (text records), "sharegpt"."""
    examples = []
    for path in iter_corpus_files(paths):
        is_json = path.suffix in (".jsonl", ".json")
        if fmt == "text" or (fmt == "auto" and not is_json):
            t = read_text(path)
            if t:
                examples.append(text_example(tokenizer, t))
            continue
        for rec in _iter_records(path):
            if isinstance(rec, dict) and "text" in rec and fmt != "sharegpt":
                examples.append(text_example(tokenizer, str(rec["text"])))
                continue
            msgs = _normalise_messages(rec)
            if msgs is None:
                raise ValueError(f"{path}: record is neither {{'text': ...}} nor a ShareGPT conversation: {rec!r:.200}")
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(f"{path}: conversations need a tokenizer with a chat template")
            examples.append(chat_example(tokenizer, msgs))
    return examples


class PackedDataset:
    """Examples concatenated into one stream and cut into [seq_len] rows of ids and per-position loss masks.

    `loss_mask[t] = 1` when token t+1 is a target (the position predicts it); the last position of each row has no
    next token in the row and is masked out."""

    def __init__(self, examples: Sequence[Example], seq_len: int):
        import torch

        ids, mask = [], []
        for ex in examples:
            ids.extend(ex.ids)
            mask.extend(ex.mask)
        n = len(ids) // seq_len
        if n == 0:
            raise ValueError(f"corpus has {len(ids)} tokens, fewer than one row of seq_len={seq_len}")
        self.ids = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
        tok_mask = torch.tensor(mask[: n * seq_len], dtype=torch.bool).view(n, seq_len)
        self.loss_mask = torch.zeros_like(tok_mask)
        self.loss_mask[:, :-1] = tok_mask[:, 1:]
        self.seq_len = seq_len

    def __len__(self):
        return self.ids.shape[0]

    def batches(self, batch_size: int, seed: int = 0, start_batch: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple]:
        """Endless shuffled batches (epoch after epoch, a fresh seeded permutation each), skipping the first
        `start_batch` (for resuming at the same place).

        Sharded by rank without overlap: the stream is one sequence of *global* batches of batch_size * world_size
        rows (the order depends on seed, start_batch and the global batch size only), and rank r takes rows
        [r * batch_size, (r + 1) * batch_size) of each. So world_size processes with batch_size b see, together, the
        rows one process sees with batch_size world_size * b, in the same order; and `start_batch` counts global
        batches, the same on every rank and for any world size with the same global batch."""
        import torch

        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        n = len(self)
        gbs = batch_size * world_size
        per_epoch = max(1, n // gbs)
        epoch, k = divmod(start_batch, per_epoch)
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        while True:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=g)
            while k < per_epoch:
                idx = perm[k * gbs: (k + 1) * gbs]
                if idx.numel() < gbs:  # fewer rows than a global batch: repeat
                    idx = perm.repeat((gbs + n - 1) // n)[:gbs]
                idx = idx[lo:hi]
                yield self.ids[idx], self.loss_mask[idx]
                k += 1
            epoch, k = epoch + 1, 0


def convert_batch_position(start_batch: int, n_rows: int, old_global_batch: int, new_global_batch: int) -> int:
    """A data position (global batches consumed) re-expressed for another global batch size: the same epoch, at the
    first batch boundary not after the first row not yet seen (so at most new_global_batch - 1 rows of that epoch
    are seen twice, none skipped). The identity when the global batch is unchanged."""
    if old_global_batch == new_global_batch:
        return start_batch
    old_per_epoch = max(1, n_rows // old_global_batch)
    new_per_epoch = max(1, n_rows // new_global_batch)
    epoch, k = divmod(start_batch, old_per_epoch)
    return epoch * new_per_epoch + min(new_per_epoch, (k * old_global_batch) // new_global_batch)
