"""kNN math, top-k accuracy, LARS and the linear head."""

import math

import pytest
import torch

from eva_train.eval.accuracy import topk_correct
from eva_train.eval.heads import LinearHead
from eva_train.eval.knn import knn_accuracy, knn_scores
from eva_train.eval.optim import build_optimizer, param_groups


def _clusters(num_classes, per_class, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:num_classes]  # orthogonal class directions
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    feats = centers[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels, centers


def test_knn_separated_clusters_are_perfect():
    train, train_y, _ = _clusters(6, 30, 16, 0.05, 0)
    test, test_y, _ = _clusters(6, 10, 16, 0.05, 1)
    acc = knn_accuracy(train, train_y, test, test_y, num_classes=6)
    assert acc == {"knn_top1": 100.0, "knn_top5": 100.0}


def test_knn_half_mislabeled_queries_give_half_top1():
    # queries of the second half sit exactly on the next class's center: kNN must answer that class
    train, train_y, centers = _clusters(4, 25, 8, 0.01, 0)
    test_y = torch.arange(4).repeat(10)
    shifted = torch.arange(len(test_y)) >= len(test_y) // 2
    test = centers[torch.where(shifted, (test_y + 1) % 4, test_y)]
    acc = knn_accuracy(train, train_y, test, test_y, num_classes=4)
    assert acc["knn_top1"] == pytest.approx(50.0)
    assert acc["knn_top5"] == 100.0  # 4 classes: the label is always among the top 5


def test_knn_temperature_weights_the_nearest_neighbour():
    # one very close neighbour of class 0 against two farther ones of class 1, k=3
    train = torch.tensor([[1.0, 0.0], [math.cos(0.5), math.sin(0.5)], [math.cos(0.5), -math.sin(0.5)]])
    train_y = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    sharp = knn_scores(train, train_y, query, num_classes=2, k=3, temperature=0.07)
    flat = knn_scores(train, train_y, query, num_classes=2, k=3, temperature=100.0)
    assert sharp.argmax().item() == 0 and flat.argmax().item() == 1


def test_knn_matches_a_plain_loop():
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(50, 5, generator=g), torch.randn(7, 5, generator=g)
    train_y = torch.randint(0, 3, (50,), generator=g)
    got = knn_scores(train, train_y, test, num_classes=3, k=4, temperature=0.5, chunk_rows=3)
    for i in range(7):
        sims = [torch.cosine_similarity(test[i], train[j], dim=0).item() for j in range(50)]
        nearest = sorted(range(50), key=lambda j: -sims[j])[:4]
        want = torch.zeros(3)
        for j in nearest:
            want[train_y[j]] += math.exp(sims[j] / 0.5)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


def test_knn_bad_inputs_say_what_is_wrong():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(4, 3, generator=g), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="num_classes=3"):
        knn_scores(feats, labels, feats, num_classes=3)
    with pytest.raises(ValueError, match="same model"):
        knn_scores(feats, labels, torch.randn(2, 5, generator=g), num_classes=4)


def test_topk_correct_counts():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(scores, labels, (1, 2, 5)) == {1: 1, 2: 2, 5: 3}


def lars(module, lr, momentum=0.9, weight_decay=0.0):
    """The protocols' LARS: timm's Lars on our parameter groups, lr set as the runner sets it."""
    opt = build_optimizer(param_groups(module, weight_decay), "lars", momentum, (0.9, 0.999))
    for group in opt.param_groups:
        group["lr"] = lr
    return opt


def test_lars_trust_ratio_scales_matrix_updates_only():
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(3.0)
        layer.bias.zero_()
    opt = lars(layer, lr=1.0, momentum=0.0)
    layer.weight.grad, layer.bias.grad = torch.full((2, 2), 5.0), torch.ones(2)
    opt.step()
    # MAE's LARS by hand: ||w|| = 6, ||g|| = 10 -> step = 0.001 * 6 / 10 * g = 0.003 per entry; bias: plain SGD
    torch.testing.assert_close(layer.weight.detach(), torch.full((2, 2), 3.0 - 0.003))
    torch.testing.assert_close(layer.bias.detach(), torch.full((2,), -1.0))


def test_linear_head_bn_has_no_affine_and_learns():
    torch.manual_seed(0)
    head = LinearHead(4, 2, batch_norm=True, init_std=0.01)
    assert not any("bn" in n for n, _ in head.named_parameters())
    x = torch.randn(64, 4) * 10 + 3
    y = (x[:, 0] > 3).long()
    opt = lars(head, lr=6.4)  # MAE's 0.1 x 16384 / 256
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (head(x).argmax(1) == y).float().mean() > 0.9


LARS_UNDER_DEEPSPEED = r"""
import json, sys
import torch, deepspeed
from eva_train.eval.optim import build_optimizer, param_groups
from eva_train.eval.runner import setup_distributed
setup_distributed()
layer = torch.nn.Linear(2, 2)
with torch.no_grad():
    layer.weight.fill_(3.0)
    layer.bias.zero_()
opt = build_optimizer(param_groups(layer, 0.0), "lars", 0.0, (0.9, 0.999))
config = {"train_batch_size": 1, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0},
          "bf16": {"enabled": sys.argv[1] == "bf16"}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=layer, optimizer=opt, config=config)
for group in engine.optimizer.param_groups:
    group["lr"] = 1.0
dtype = torch.bfloat16 if sys.argv[1] == "bf16" else torch.float32
# loss = sum(W x + b) with x = (2.5, 2.5): dL/dW = 2.5 everywhere (||g|| = 5), dL/db = 1
engine.backward(engine(torch.full((1, 2), 2.5, dtype=dtype)).sum())
engine.step()
# what LARS itself updated (under bf16 DeepSpeed keeps fp32 copies for it): one 2x2 matrix and one vector
seen = {p.ndim: p.float().tolist() for g in opt.param_groups for p in g["params"]}
print(json.dumps({"weight": seen[2], "bias": seen[1]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lars_keeps_its_trust_ratio_inside_deepspeed_without_zero(precision):
    """The configuration LARS is allowed in (ZeRO 0) still hands it whole matrices: the update is the
    trust-ratio step, not plain SGD (which would subtract 2.5 from every weight)."""
    import json
    import os
    import subprocess
    import sys

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    run = subprocess.run(
        [sys.executable, "-c", LARS_UNDER_DEEPSPEED, precision],
        capture_output=True,
        text=True,
        env=dict(env, DS_ACCELERATOR="cpu"),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    # ||w|| = 6, ||g|| = 5 -> 0.001 * 6 / 5 * 2.5 = 0.003 off each weight; the bias takes the plain step
    torch.testing.assert_close(torch.tensor(got["weight"]), torch.full((2, 2), 3.0 - 0.003), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got["bias"]), torch.full((2,), -1.0), rtol=0, atol=1e-6)
