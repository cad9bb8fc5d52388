"""`train.py --compile --fused`: one training step of the fused model under torch.compile (Inductor)
equals the same step in eager mode.

The kernels are PyTorch custom ops (their fake implementations give Inductor the output shapes),
so Inductor compiles everything around them, the matmuls, embeddings, residual adds and the
backward glue, and calls the kernels as opaque ops. On a CPU Inductor's backend
generates C++ (it needs a C++ compiler) and the kernels themselves run in Triton's interpreter; on
a GPU Inductor emits Triton and the kernels run compiled.
A tiny model keeps the compile to seconds. Compared: the loss, every parameter's gradient and the
parameters after one SGD step.
"""

import copy
import shutil

import pytest
import torch

from accuracy import DEVICE, seeded
from model import GPTConfig, GPTModel

# head dim 16 (the kernels' minimum), T = 11 (prime), V = 67 (prime): shapes a model would not pick.
CFG = GPTConfig(vocab_size=67, context_length=16, emb_dim=32, n_heads=2, n_layers=1, qkv_bias=True)


def _step(model, forward, idx, targets):
    # SGD, not AdamW: Adam divides by sqrt(v), which turns the rounding noise of a gradient that is
    # zero in exact arithmetic (the key bias: softmax ignores a shift common to a row) into a full step.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model.loss(forward(idx), targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor's CPU backend needs a C++ compiler")
def test_one_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    with torch.device(DEVICE):  # the kernels' device: the GPU where there is one (Inductor then emits Triton)
        eager = GPTModel(CFG, fused=True)
    compiled = copy.deepcopy(eager)
    g = seeded(1)
    idx = torch.randint(0, CFG.vocab_size, (2, 11), generator=g, device=DEVICE)
    targets = torch.randint(0, CFG.vocab_size, (2, 11), generator=g, device=DEVICE)
    targets[1, :4] = -100  # ignored positions, as padding in fine-tuning

    torch._dynamo.reset()
    loss_e, grads_e, params_e = _step(eager, eager, idx, targets)
    # fullgraph: the custom ops must not break the graph (a break would silently run that part eager)
    loss_c, grads_c, params_c = _step(compiled, torch.compile(compiled, backend="inductor", fullgraph=True),
                                      idx, targets)

    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for name in params_e:
        torch.testing.assert_close(params_c[name], params_e[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert loss_c.item() > 0 and any(g.abs().sum() > 0 for g in grads_c.values())
