"""Held-out accuracy: greedy answers to each sample's first question, compared exactly with the reference answer."""

from __future__ import annotations

from collections import defaultdict

import torch

from .data import SampleEncoder, turns


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = torch.tensor(r)
        mask[i, length - len(r) :] = 1
    return ids, mask


def answer(model, encoder: SampleEncoder, samples: list[dict], max_new_tokens: int = 16) -> list[str]:
    """The model's greedy answers to the first user turn of each sample (one left-padded batch)."""
    prompts, visuals = [], defaultdict(list)
    for sample in samples:
        ids, _, visual = encoder.prompt(sample)
        prompts.append(ids)
        for key, value in visual.items():
            visuals[key].append(value)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    input_ids, attention_mask = _left_pad(prompts, pad)
    device = model.device
    inputs = {k: torch.cat(v).to(device) for k, v in visuals.items()}
    out = model.generate(
        input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens, **inputs
    )
    new = out[:, input_ids.shape[1] :].tolist()
    eos = model.config.eos_token_id
    return [encoder.tokenizer.decode(row[: row.index(eos)] if eos in row else row).strip() for row in new]


def accuracy(
    model, encoder: SampleEncoder, samples: list[dict], batch_size: int = 50
) -> tuple[dict[str, float], list[dict]]:
    """Exact-match accuracy per ``task`` and the per-sample results (id, task, expected, got).

    Generation stops one token past the longest reference answer of the batch: a longer answer cannot match.
    """
    model.eval()
    results = []
    by_task = defaultdict(list)
    for sample in samples:
        by_task[sample.get("task", "all")].append(sample)
    for task, group in by_task.items():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            expected = [next(content for role, content in turns(s) if role == "assistant") for s in chunk]
            limit = max(len(encoder.tokenizer.encode(e)) for e in expected) + 1
            for sample, want, got in zip(chunk, expected, answer(model, encoder, chunk, limit)):
                results.append({"id": sample.get("id"), "task": task, "expected": want, "got": got})
    scores = {}
    for task in by_task:
        rows = [r for r in results if r["task"] == task]
        scores[task] = sum(r["expected"] == r["got"] for r in rows) / len(rows)
    return scores, results


def character_accuracy(results: list[dict]) -> float:
    """Fraction of the reference characters read correctly (same character at the same position)."""
    total = sum(len(r["expected"]) for r in results)
    right = sum(a == b for r in results for a, b in zip(r["expected"], r["got"]))
    return right / max(1, total)
