"""Load balancing: the bias update rule, the sequence-wise and classic balance losses, MaxVio, and a check
that the bias update actually balances a skewed router."""

import pytest
import torch

from dsv3 import DeepSeekV3, preset
from dsv3.model.moe import Router, Routing
from dsv3.train.balance import (
    aux_balance_loss,
    max_vio,
    relative_loads,
    routers,
    sequence_balance_loss,
    update_biases,
)


def routing(scores: torch.Tensor, indices: torch.Tensor) -> Routing:
    E = scores.shape[1]
    counts = torch.bincount(indices.flatten(), minlength=E)
    return Routing(scores=scores, indices=indices, weights=scores.gather(1, indices), counts=counts)


def test_max_vio():
    assert max_vio(torch.tensor([4, 4, 4, 4])).item() == 0.0
    assert max_vio(torch.tensor([8, 0, 0, 0])).item() == pytest.approx(3.0)  # E - 1: all on one expert
    assert max_vio(torch.tensor([6, 2, 4, 4])).item() == pytest.approx(0.5)
    assert max_vio(torch.tensor([[6, 2, 4, 4], [4, 4, 4, 4]])).tolist() == pytest.approx([0.5, 0.0])


def test_relative_loads():
    assert relative_loads(torch.tensor([[6, 2, 4, 4]])) == [[1.5, 0.5, 1.0, 1.0]]


def test_bias_update_moves_towards_the_mean_load_by_gamma():
    cfg = preset("tiny")
    gate = Router(cfg)
    loads = torch.tensor([[9, 1, 4, 4, 4, 4, 3, 3]])  # mean 4
    update_biases({0: gate}, loads, gamma=0.001)
    assert gate.bias.tolist() == pytest.approx([-0.001, 0.001, 0, 0, 0, 0, 0.001, 0.001])
    assert gate.bias.dtype == torch.float32


def test_sequence_balance_loss_by_hand():
    # B=2 sequences of T=2 tokens, E=4, K=1
    scores = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.2, 0.4], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    indices = torch.tensor([[0], [3], [0], [3]])
    r = routing(scores, indices)
    # each sequence: f = E/(K T) * counts = 2 * [1, 0, 0, 1]
    p0 = torch.tensor([(0.5 + 0.2) / 2, (0.5 + 0.2) / 2, 0.1, 0.2])
    p1 = torch.tensor([0.5, 0.0, 0.0, 0.5])
    f = torch.tensor([2.0, 0, 0, 2.0])
    expected = ((f * p0).sum() + (f * p1).sum()) / 2
    assert sequence_balance_loss(r, batch=2).item() == pytest.approx(expected.item())


def test_balance_losses_are_one_when_balanced_and_larger_when_not():
    E, K, T = 8, 2, 16
    uniform = torch.full((T, E), 0.5)
    even = torch.stack([torch.arange(K) + 2 * (i % 4) for i in range(T)])  # each expert chosen 4 times
    assert sequence_balance_loss(routing(uniform, even), 1).item() == pytest.approx(1.0)
    assert aux_balance_loss(routing(uniform, even)).item() == pytest.approx(1.0)
    skewed = torch.ones(T, E) * 0.1
    skewed[:, :2] = 0.9
    same = torch.tensor([[0, 1]] * T)
    assert sequence_balance_loss(routing(skewed, same), 1).item() > 3.0
    assert aux_balance_loss(routing(skewed, same)).item() > 3.0


def test_balance_loss_gradient_pushes_scores_away_from_overloaded_experts():
    logits = torch.zeros(16, 8, requires_grad=True)
    scores = logits.sigmoid()
    indices = torch.tensor([[0, 1]] * 16)
    aux_balance_loss(routing(scores, indices)).backward()
    assert (logits.grad[:, :2] > 0).all() and (logits.grad[:, 2:] < 0).all()  # descent lowers experts 0, 1


def test_routers_lists_main_layers_then_mtp_in_run_order():
    model = DeepSeekV3(preset("tiny"))
    gates = routers(model)
    assert gates == {0: model.layers[1].ffn.gate, 1: model.mtp[0].block.ffn.gate}
    out = model.run(torch.randint(0, 512, (1, 8)), mtp=True)
    assert len(out.routing + out.mtp_routing) == len(gates)
    model.layers[1] = torch.nn.Module()  # a pipeline rank's share keeps the whole model's numbering
    assert routers(model) == {1: model.mtp[0].block.ffn.gate}


def test_bias_updates_balance_a_skewed_router():
    """The aux-loss-free rule alone, on a router that prefers two experts: MaxVio falls from ~3 towards 0."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    gate = Router(cfg)
    torch.nn.init.normal_(gate.weight, std=0.02)
    x = torch.randn(512, cfg.hidden_size)
    x[:, 0] += 3.0
    with torch.no_grad():
        gate.weight[:2, 0] += 0.5  # experts 0 and 1 score high for every token
    before = max_vio(gate(x).counts).item()
    for _ in range(300):
        update_biases({0: gate}, gate(x).counts[None], gamma=0.002)
    after = max_vio(gate(x).counts).item()
    assert before > 1.5 and after < 0.3
