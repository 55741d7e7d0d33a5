"""Prompt encoding shared by the teacher, the student and evaluation."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer


def token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """The CLIP hidden states the UNet cross-attends to (as the SD pipeline feeds them)."""
    return text_encoder(token_ids(tokenizer, prompts)).last_hidden_state
