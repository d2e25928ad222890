"""Central evaluation of the global model on the server's test set."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from fedlayer.client.training import evaluate
from fedlayer.data import ArrayDataset
from fedlayer.layers import State, numpy_to_torch_state
from fedlayer.workload import build_configured_model


class CentralEvaluator:
    """Evaluates a global state on (a fixed, seeded sample of) the central test set."""

    def __init__(self, cfg: DictConfig, test_set: ArrayDataset) -> None:
        limit = int(cfg.evaluation.max_examples)
        if limit and len(test_set) > limit:
            rng = np.random.default_rng(int(cfg.seed))
            test_set = test_set.subset(np.sort(rng.choice(len(test_set), limit, replace=False)))
        self.test_set = test_set
        self.model = build_configured_model(cfg, test_set)

    def __call__(self, state: State) -> dict[str, float]:
        """Loss and accuracy of ``state`` on the central test set."""
        self.model.load_state_dict(numpy_to_torch_state(state))
        return evaluate(self.model, self.test_set, torch.device("cpu"))
