"""FedAvg: the baseline every saving is measured against."""

from __future__ import annotations

from fedlayer.methods.base import LayerwiseStrategy


class FedAvgStrategy(LayerwiseStrategy):
    """FedAvg (McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629): the base strategy as it is."""

    method = "fedavg"
