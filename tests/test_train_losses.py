"""The training objective: MTP targets line up with depth, lambda's schedule, the balance terms by mode; the
chunked cross-entropy gives torch's loss and gradient."""

import pytest
import torch
import torch.nn.functional as F

from dsv3 import DeepSeekV3, preset
from dsv3.data.loader import IGNORE
from dsv3.model import Output
from dsv3.train import TrainConfig
from dsv3.train import losses as losses_module
from dsv3.train.balance import aux_balance_loss, sequence_balance_loss
from dsv3.train.losses import compute_losses, cross_entropy, mtp_lambda


def one_hot_logits(targets: torch.Tensor, V: int) -> torch.Tensor:
    return F.one_hot(targets, V).float() * 20.0  # confident and right


def test_mtp_depth_k_is_scored_against_labels_shifted_by_k():
    B, T, V = 2, 10, 32
    inputs = torch.randint(0, V, (B, T + 2))
    labels = inputs[:, 1:T + 1]  # the inputs would be inputs[:, :T]
    # depth k at position i predicts token i+k+1 = labels[:, i+k]
    out = Output(logits=one_hot_logits(labels, V), hidden=torch.zeros(B, T, 4),
                 mtp_logits=[one_hot_logits(labels[:, 1:], V), one_hot_logits(labels[:, 2:], V)])
    losses = compute_losses(out, labels, TrainConfig(balance="none"), lam=0.3)
    assert losses.main.item() < 1e-6 and all(m.item() < 1e-6 for m in losses.mtp)
    assert losses.mtp_acc.item() == 1.0
    shifted = Output(logits=out.logits, hidden=out.hidden, mtp_logits=[one_hot_logits(labels[:, :-1], V)])
    assert compute_losses(shifted, labels, TrainConfig(balance="none"), lam=0.3).mtp[0].item() > 1.0


def test_total_is_main_plus_lambda_over_depth_times_mtp_sum():
    torch.manual_seed(0)
    B, T, V = 2, 6, 16
    labels = torch.randint(0, V, (B, T))
    out = Output(logits=torch.randn(B, T, V), hidden=torch.zeros(B, T, 4),
                 mtp_logits=[torch.randn(B, T - 1, V), torch.randn(B, T - 2, V)])
    losses = compute_losses(out, labels, TrainConfig(balance="none"), lam=0.3)
    expected = losses.main + 0.3 / 2 * (losses.mtp[0] + losses.mtp[1])
    assert losses.total.item() == pytest.approx(expected.item())
    assert losses.balance is None


def test_lambda_is_03_then_01():
    cfg = TrainConfig()
    assert mtp_lambda(0.0, cfg) == 0.3 and mtp_lambda(0.67, cfg) == 0.3
    assert mtp_lambda(0.68, cfg) == 0.1 and mtp_lambda(0.99, cfg) == 0.1


@pytest.mark.parametrize("mode", ["aux-free", "aux-loss", "none"])
def test_balance_term_follows_the_mode_and_covers_every_router(mode):
    torch.manual_seed(0)
    model = DeepSeekV3(preset("tiny"))
    model.init_weights()
    x = torch.randint(0, 512, (2, 12))
    out = model.run(x, mtp=True)
    cfg = TrainConfig(balance=mode, seq_alpha=1e-4, aux_alpha=1e-3)
    losses = compute_losses(out, x, cfg, lam=0.3)
    routing = out.routing + out.mtp_routing
    if mode == "none":
        assert losses.balance is None
    elif mode == "aux-free":
        assert losses.balance.item() == pytest.approx(1e-4 * sum(sequence_balance_loss(r, 2) for r in routing).item())
    else:
        assert losses.balance.item() == pytest.approx(1e-3 * sum(aux_balance_loss(r) for r in routing).item())
    losses.total.backward()
    assert model.layers[1].ffn.gate.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_gives_torchs_loss_and_gradient(monkeypatch, dtype):
    monkeypatch.setattr(losses_module, "CHUNK_ELEMENTS", 4 * 33)  # chunks of 4 rows: 21 rows, the last chunk short
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 33) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 33, (3, 7))
    targets[0, :3] = IGNORE
    fused = cross_entropy(logits, targets)
    (g_fused,) = torch.autograd.grad(0.3 * fused, logits)
    reference = cross_entropy(logits, targets, fused=False)
    (g_reference,) = torch.autograd.grad(0.3 * reference, logits)
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(reference.item(), rel=1e-6)
    assert g_fused.dtype == dtype and not g_fused[0, :3].any()  # ignored rows get no gradient
    torch.testing.assert_close(g_fused, g_reference)  # within the dtype's rounding
    with torch.no_grad():
        assert cross_entropy(logits, targets).item() == fused.item()


def test_chunked_cross_entropy_of_only_ignored_targets_is_zero_with_zero_gradient():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = cross_entropy(logits, torch.full((2, 5), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()
