"""pFedLA's per-client hypernetwork: embedding -> MLP -> one weight vector per layer.

The architecture of the paper: ``v_i -> (Linear + ReLU) x 3, hidden H -> for each
layer l a head FC_l -> alpha_i^l = ReLU(FC_l(h)) in R^N``, heads initialised
U(0, 1) with zero bias. Each client owns one; the parameters travel to and
from disk as numpy arrays (see ``ClientHypernetwork.to_numpy``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedlayer.layers import State


class ClientHypernetwork(nn.Module):
    """Client ``i``'s embedding ``v_i`` and hypernetwork ``HN_i``.

    Parameters
    ----------
    num_clients : int
        ``N``: length of each layer's weight vector.
    num_layers : int
        ``L``: one head per model layer.
    embedding_dim, hidden_dim : int
        Sizes of ``v_i`` and of the MLP's hidden layers.
    seed : int
        Seeds the initialisation (one seed per client keeps runs reproducible).
    """

    def __init__(self, num_clients: int, num_layers: int, embedding_dim: int, hidden_dim: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embedding = nn.Parameter(torch.randn(embedding_dim, generator=generator))
        self.mlp = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(hidden_dim, num_clients) for _ in range(num_layers))
        with torch.no_grad():
            for module in self.mlp:
                if isinstance(module, nn.Linear):
                    bound = 1.0 / module.in_features**0.5
                    module.weight.uniform_(-bound, bound, generator=generator)
                    module.bias.uniform_(-bound, bound, generator=generator)
            for head in self.heads:
                head.weight.uniform_(0.0, 1.0, generator=generator)
                head.bias.zero_()

    def forward(self) -> Tensor:
        """``alpha_i``: shape ``(L, N)``, non-negative (ReLU)."""
        hidden = self.mlp(self.embedding)
        return torch.stack([torch.relu(head(hidden)) for head in self.heads])

    def to_numpy(self) -> State:
        """Parameters as numpy arrays (for the store and checkpoints)."""
        return {name: value.detach().cpu().numpy().copy() for name, value in self.state_dict().items()}

    def load_numpy(self, state: State) -> None:
        """Load ``to_numpy`` output."""
        self.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()})


def aggregation_weights(alpha: Tensor, own: int) -> Tensor:
    """Normalise each layer's ``alpha`` over clients; an all-zero row becomes one-hot on ``own``.

    ``alpha`` has shape ``(L, N)``. Differentiable wherever some alpha is positive.
    """
    totals = alpha.sum(dim=1, keepdim=True)
    zero = totals.squeeze(1) <= 0.0
    safe = torch.where(totals > 0.0, totals, torch.ones_like(totals))
    weights = alpha / safe
    if bool(zero.any()):
        one_hot = torch.zeros_like(alpha[0])
        one_hot[own] = 1.0
        weights = torch.where(zero[:, None], one_hot[None, :], weights)
    return weights
