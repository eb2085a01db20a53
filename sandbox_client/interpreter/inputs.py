"""Turn a language model's invoke inputs into one left-padded batch.

    rows = token_rows("Hello world", tokenizer)          # [[15496, 995]], masks [[1, 1]]
    batch = pad_left([rows_a, rows_b], pad_id=0)         # input_ids, attention_mask, position_ids

Accepted inputs: str, list[str], list[int], list[list[int]], 1-D/2-D tensors of ids, or a
dict with ``input_ids`` (and optionally ``attention_mask``). Left padding with position ids
counted over real tokens only, so a padded row computes what it would alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import TraceError

Row = tuple[list[int], list[int]]   # (token ids, attention mask)


@dataclass
class TokenBatch:
    """A padded batch; ``padded`` is False when every row is full length (no mask needed)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    padded: bool

    def mask(self) -> torch.Tensor:
        """The attention mask (all ones when the batch has no padding)."""
        return self.attention_mask if self.attention_mask is not None else torch.ones_like(self.input_ids)


def token_rows(value: Any, tokenizer: Any) -> list[Row]:
    """The rows (ids, mask) that one invoke input stands for."""
    if isinstance(value, str):
        return [_tokenize(value, tokenizer)]
    if isinstance(value, torch.Tensor):
        return _tensor_rows(value, None)
    if isinstance(value, dict):
        if "input_ids" not in value:
            raise TraceError("a dict input needs 'input_ids' (and optionally 'attention_mask')")
        return _tensor_rows(torch.as_tensor(value["input_ids"]), value.get("attention_mask"))
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return [_tokenize(v, tokenizer) for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [(list(value), [1] * len(value))]
        if all(isinstance(v, (list, tuple)) for v in value):
            return [row for v in value for row in token_rows(list(v), tokenizer)]
    raise TraceError(
        f"cannot use {type(value).__name__} as language-model input: pass a string, a list of strings, "
        "token ids (list or tensor), or a dict with 'input_ids'")


def pad_left(rows: list[Row], pad_id: int) -> TokenBatch:
    """Stack rows, padding on the left; position ids count real tokens only."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row_ids, row_mask) in enumerate(rows):
        if row_ids:
            ids[r, width - len(row_ids):] = torch.tensor(row_ids, dtype=torch.long)
            mask[r, width - len(row_mask):] = torch.tensor(row_mask, dtype=torch.long)
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(input_ids=ids, attention_mask=mask, position_ids=positions, padded=padded)


def unpadded_ids(value: Any) -> TokenBatch | None:
    """Fast path: a 2-D integer tensor with no mask is already a batch (no copy, no padding)."""
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.dtype == torch.long:
        return TokenBatch(input_ids=value, attention_mask=None, position_ids=None, padded=False)
    return None


def _tokenize(text: str, tokenizer: Any) -> Row:
    if tokenizer is None:
        raise TraceError("this model has no tokenizer: pass token ids, or give sc.LanguageModel(..., tokenizer=tok)")
    ids = list(tokenizer(text)["input_ids"])
    return ids, [1] * len(ids)


def _tensor_rows(ids: torch.Tensor, mask: Any) -> list[Row]:
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TraceError(f"token id tensors must be integers, got {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise TraceError(f"token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    masks = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    rows: list[Row] = []
    for row_ids, row_mask in zip(ids.tolist(), masks.tolist(), strict=True):
        keep = [i for i, m in enumerate(row_mask) if m]
        rows.append(([row_ids[i] for i in keep], [1] * len(keep)))
    return rows
