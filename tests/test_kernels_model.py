"""The EVA model's forward and backward through the Triton kernels (interpreter on CPU) match the torch path."""

import copy

import pytest
import torch

import eva_kernels
from eva_train.models import build_backbone
from tests.helpers.kernels import kernels_runnable  # noqa: F401 (autouse fixture)


def _autograd_node_names(tensor):
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _forward_backward(model, images, backend):
    eva_kernels.set_backend(backend)
    try:
        tokens = model.forward_features(images)
        nodes = _autograd_node_names(tokens)
        loss = (tokens * torch.linspace(-1, 1, tokens.shape[-1])).sum()  # every feature matters
        loss.backward()
    finally:
        eva_kernels.set_backend(None)
    return tokens.detach(), nodes, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through Triton need the interpreter")
@pytest.mark.parametrize("variant, img_size, rope", [("eva_debug_p4", 16, False), ("eva02_demo_p8", 24, True)])
def test_model_with_triton_kernels_matches_torch(variant, img_size, rope):
    torch.manual_seed(0)
    model = build_backbone(variant, img_size=img_size, depth=2).train()
    twin = copy.deepcopy(model)
    images = torch.randn(2, 3, img_size, img_size)
    tokens_torch, nodes_torch, grads_torch = _forward_backward(model, images, "torch")
    tokens_triton, nodes_triton, grads_triton = _forward_backward(twin, images, "triton")
    ours = {"LayerNormFunctionBackward", "AttentionFunctionBackward"} | ({"Rope2dFunctionBackward"} if rope else set())
    assert ours <= nodes_triton and not ours & nodes_torch
    torch.testing.assert_close(tokens_triton, tokens_torch, rtol=1e-4, atol=1e-4)
    assert grads_triton.keys() == grads_torch.keys()
    for name, grad in grads_torch.items():
        torch.testing.assert_close(
            grads_triton[name], grad, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
