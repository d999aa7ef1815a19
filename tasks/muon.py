"""Muon for the hidden weights and AdamW for the rest, as one optimizer (`use_muon: true`)."""

from __future__ import annotations

from typing import Any

import torch


class MuonAdamW(torch.optim.Optimizer):
    """torch's Muon on the 2-D hidden weights, AdamW on embeddings, the head and 1-D parameters, as one optimizer
    (LlamaFactory's split); the learning rate is AdamW-matched (`adjust_lr_fn="match_rms_adamw"`)."""

    def __init__(self, muon_params, adamw_params, lr: float, weight_decay: float, betas, eps: float):
        self.parts = []
        if muon_params:
            self.parts.append(torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay,
                                               adjust_lr_fn="match_rms_adamw"))
        if adamw_params:
            self.parts.append(torch.optim.AdamW(adamw_params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        super().__init__([p for part in self.parts for g in part.param_groups for p in g["params"]], {"lr": lr})
        self.param_groups = [g for part in self.parts for g in part.param_groups]  # shared: schedulers reach both

    @classmethod
    def for_model(cls, model, **kwargs) -> MuonAdamW:
        muon, adamw = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                hidden = param.ndim == 2 and "embed" not in name and "lm_head" not in name
                (muon if hidden else adamw).append(param)
        return cls(muon, adamw, **kwargs)

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, state in zip(self.parts, state_dict["parts"], strict=True):
            part.load_state_dict(state)
        self.param_groups = [g for part in self.parts for g in part.param_groups]
