"""An LM head tied to a compressed token embedding: logits = hidden @ E.T, with no dense copy of E."""

from __future__ import annotations

import torch
from torch import nn

from .methods import CompressedModule
from .methods.targets import computed_weight, optional_bias


class TiedEmbeddingHead(nn.Module):
    """The embedding is referenced, not registered, so its parameters appear (and are counted) once."""

    def __init__(self, embedding: CompressedModule, bias: torch.Tensor | None = None):
        super().__init__()
        self.__dict__["embedding"] = embedding
        # A bias Parameter is kept as is: BERT shares its decoder bias with another module.
        self.bias = bias if isinstance(bias, nn.Parameter) else optional_bias(bias)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """E (vocab x d), as a dense head's weight, computed from the embedding's factors: for models that
        read it (Mamba casts its input to ``lm_head.weight.dtype``)."""
        like = next(self.embedding.parameters())
        return computed_weight(lambda: self.embedding.weight, (self.out_features, self.in_features), like)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.embedding.attend(hidden)
        return logits if self.bias is None else logits + self.bias.to(logits.dtype)
