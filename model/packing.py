"""SFT without padding: conversations packed into full windows, kept apart by `document_ids`.

SFTDataset pads every conversation to max_seq_len, so on real dialogues most positions of a batch are padding
(about three quarters at 512). PackedSFTDataset places several whole conversations in each window instead (bin
packing, done once at construction) and marks which conversation each token belongs to; the model attends only
within a conversation and restarts positions at each one, so a packed window trains exactly as its conversations
would one by one.
"""

from __future__ import annotations

import os
from bisect import bisect_left, insort
from itertools import chain

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset import IGNORE_INDEX, SFTDataset


def pack_lengths(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: the indices of `lengths`, grouped into bins of at most `capacity` in total.

    Items go longest first (ties by index), each into the open bin with the least room that still fits it, else a
    new bin. Open bins are kept in buckets by room left, with the distinct rooms in a sorted list, so finding the
    best fit is a bisect rather than a scan over the bins. Deterministic; every index appears exactly once.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {lengths.shape}")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"every length must be in 1..{capacity}, got {lengths.min()}..{lengths.max()}")
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    bins_with_room: dict[int, list[int]] = {}  # room left -> bins with exactly that room (used as a stack)
    rooms: list[int] = []  # the keys of bins_with_room, sorted
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        at = bisect_left(rooms, length)
        if at == len(rooms):
            chosen, room = len(bins), capacity
            bins.append([])
        else:
            room = rooms[at]
            stack = bins_with_room[room]
            chosen = stack.pop()
            if not stack:
                del bins_with_room[room]
                rooms.pop(at)
        bins[chosen].append(index)
        room -= length
        if room > 0:
            if room in bins_with_room:
                bins_with_room[room].append(chosen)
            else:
                bins_with_room[room] = [chosen]
                insort(rooms, room)
    return bins


def conversation_lengths(sft: SFTDataset) -> np.ndarray:
    """The token count of each SFTDataset item after its truncation to max_seq_len (its unpadded length)."""
    offsets = np.asarray(sft.file.arrays["sample_offsets"], dtype=np.int64)
    lengths = np.diff(offsets)[sft.indices]
    # Only conversations stored longer than max_seq_len change; truncation may drop whole turns, so ask it.
    for j in np.nonzero(lengths > sft.max_seq_len)[0]:
        lengths[j] = len(sft._sample(int(sft.indices[j]))[0])
    sft.file._arrays = None  # reopen lazily in each DataLoader worker, as SFTDataset does
    return lengths


class PackedSFTDataset(Dataset):
    """Windows of max_seq_len holding whole conversations, over `data_process.py sft` output.

    Each conversation is exactly SFTDataset's item (same truncation, same skipped samples), unpadded; conversations
    are packed into windows with `pack_lengths` once, at construction (the training loop shuffles windows per
    epoch). Items, each LongTensor[max_seq_len]:
    - `input_ids`: the conversations back to back, then 0-padding;
    - `labels`: SFTDataset's labels of each conversation, with its first token's forced to -100 so the previous
      conversation's last token predicts nothing across the boundary; -100 on padding;
    - `document_ids`: 0, 1, 2, ... for the conversations of the window, -1 on padding. The model attends only
      within a conversation and derives positions restarting at 0 from these, so no `position_ids` are stored.
    """

    def __init__(self, path: str | os.PathLike, max_seq_len: int):
        self.sft = SFTDataset(path, max_seq_len)
        self.max_seq_len = max_seq_len
        self.lengths = conversation_lengths(self.sft)
        bins = pack_lengths(self.lengths, max_seq_len)
        # Flat arrays rather than a list of lists: cheap to pickle into DataLoader workers.
        self.window_offsets = np.cumsum([0] + [len(b) for b in bins], dtype=np.int64)
        self.window_items = np.fromiter(chain.from_iterable(bins), dtype=np.int64, count=len(self.lengths))
        self.skipped = self.sft.skipped
        self.n_conversations = len(self.sft)
        self.real_tokens = int(self.lengths.sum())
        self.fill = self.real_tokens / (len(bins) * max_seq_len)

    def __len__(self) -> int:
        return len(self.window_offsets) - 1

    def window_conversations(self, index: int) -> list[int]:
        """The SFTDataset item indices packed into window `index`, in their order in the window."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.window_items[self.window_offsets[index]:self.window_offsets[index + 1]].tolist()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        length = self.max_seq_len
        input_ids = torch.zeros(length, dtype=torch.long)
        labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        document_ids = torch.full((length,), -1, dtype=torch.long)
        start = 0
        for doc, item in enumerate(self.window_conversations(index)):
            ids, mask = self.sft._sample(int(self.sft.indices[item]))
            end = start + len(ids)
            ids = torch.from_numpy(ids)
            input_ids[start:end] = ids
            labels[start:end] = torch.where(torch.from_numpy(mask), ids, IGNORE_INDEX)
            labels[start] = IGNORE_INDEX  # never predicted from the previous conversation
            document_ids[start:end] = doc
            start = end
        return {"input_ids": input_ids, "labels": labels, "document_ids": document_ids}

    def summary(self) -> str:
        return (f"packed {self.n_conversations:,} conversations into {len(self):,} windows of {self.max_seq_len} "
                f"(fill {self.fill:.1%})")


def load_sft_data(path: str | os.PathLike, max_seq_len: int, packed: bool = True) -> tuple[Dataset, str]:
    """(dataset, one line describing it) for the SFT scripts: packed windows, or v1's one padded conversation per
    item; the line gives the share of positions that are real tokens either way."""
    if packed:
        dataset = PackedSFTDataset(path, max_seq_len)
        return dataset, dataset.summary()
    dataset = PaddedSFTDataset(path, max_seq_len)
    fill = dataset.lengths.sum() / (len(dataset) * max_seq_len)
    return dataset, f"{len(dataset):,} conversations, each padded to {max_seq_len} (fill {fill:.1%})"


class PaddedSFTDataset(SFTDataset):
    """SFTDataset's items plus `token_mask` (1 on the conversation, 0 on its right padding): attention stays plain
    causal (exact, as padding only follows the tokens), while the loop counts real tokens and the MoE balance loss
    skips the padding."""

    def __init__(self, path: str | os.PathLike, max_seq_len: int):
        super().__init__(path, max_seq_len)
        self.lengths = conversation_lengths(self)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        item["token_mask"] = (torch.arange(self.max_seq_len) < int(self.lengths[index])).long()
        return item


def add_packing_arg(parser) -> None:
    parser.add_argument("--no_packing", action="store_true",
                        help="pad each conversation to max_seq_len (v1's batches) instead of packing several per "
                             "window: the same loss per token, for several times the compute")
