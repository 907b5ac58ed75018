"""On a CUDA device (skipped elsewhere; tools/gpu_check.sh runs these): a whole GAN training step with gankern
ops captured in a CUDA graph and replayed (which fails if any op synchronises with the host or allocates outside
the graph's pool).  Every op x GPU backend x dtype against PyTorch in float64 on the device is
tests/test_samples.py's ``cuda-*`` variants (the same samples as on CPU, plus large shapes), also ``gpu``-marked."""
import copy

import pytest
import torch

import gankern
from conftest import GPU_BACKENDS
from tolerances import assert_close

pytestmark = pytest.mark.gpu


def _need(backend):
    info = gankern.backends()[backend]
    if not info["available"]:
        pytest.skip(f"backend {backend} unavailable: {info['reason']}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_training_step_cuda_graph_replay_matches_eager(backend, model):
    """A full D+G step (forward, backward, Adam) with gankern ops, captured in a CUDA graph: replays give
    the same losses and parameters as running the same step eagerly (same inputs, same start)."""
    _need(backend)
    from gankern.models import make_models

    torch.manual_seed(0)
    shape = (28, 28) if model == "mlp" else (32, 32)
    G, D = make_models(model, shape, 16, fused=True, backend=backend)
    G, D = G.cuda(), D.cuda()
    B = 16
    z = torch.randn(B, 16, device="cuda")
    real = torch.rand(B, shape[0] * shape[1], device="cuda")

    def build(G, D):
        kw = dict(lr=1e-3, betas=(0.5, 0.999), fused=True, capturable=True)
        opt_g, opt_d = torch.optim.Adam(G.parameters(), **kw), torch.optim.Adam(D.parameters(), **kw)

        def step():
            fake = G(z)
            logits = D(torch.cat([real, fake.detach()]))
            loss_d = gankern.bce_with_logits(logits[:B], 0.9, backend=backend) + \
                gankern.bce_with_logits(logits[B:], 0.0, backend=backend)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            loss_g = gankern.bce_with_logits(D(fake), 1.0, backend=backend)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            return torch.stack([loss_d.detach(), loss_g.detach()])
        return step

    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    eager_step, graph_step = build(G, D), build(G2, D2)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            eager_step()
            graph_step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_losses = graph_step()
    eager_step()   # the captured call ran no kernels: keep the eager copy in step with the replays
    graph.replay()
    for _ in range(4):
        eager_losses = eager_step()
        graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static_losses).all()
    assert_close(static_losses, eager_losses.double(), torch.float32, scale=10, name="losses")
    for (n, p), p2 in zip(list(G.named_parameters()) + list(D.named_parameters()),
                          list(G2.parameters()) + list(D2.parameters())):
        assert_close(p2, p.double(), torch.float32, scale=10, name=n)
