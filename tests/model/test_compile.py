"""The model forward is torch.compile-friendly: one graph, no breaks, same numbers when compiled."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import tiny_config

from modeling_mfm import MFMForImageClassification, MFMForPreTraining, low_pass_mask


@pytest.mark.parametrize("backbone", ["beit", "vit", "resnet", "convnext"])
def test_pretraining_forward_has_no_graph_breaks(backbone):
    torch._dynamo.reset()
    model = MFMForPreTraining(tiny_config(backbone)).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))  # masks drawn inside the graph
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_classifier_forward_has_no_graph_breaks():
    torch._dynamo.reset()
    model = MFMForImageClassification(tiny_config("beit", num_labels=3)).train()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]


@pytest.mark.parametrize("backbone", ["beit", "resnet"])
def test_compiled_training_step_matches_eager(backbone):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MFMForPreTraining(tiny_config(backbone)).train()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.stack([low_pass_mask(32, 32, 4), 1 - low_pass_mask(32, 32, 4)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = model(x, frequency_mask=mask).loss
    eager.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.load_state_dict(state)
    # aot_eager traces forward and backward through AOTAutograd like inductor, without a C++ compile in CI
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x, frequency_mask=mask).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, atol=1e-6, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], atol=1e-6, rtol=1e-4, msg=name)
