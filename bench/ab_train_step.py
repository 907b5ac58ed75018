"""Interleaved A/B of training steps in one process (min over rounds): python bench/ab_train_step.py mlp|dcgan [ROUNDS]."""
# interleaved A/B of training steps, min over rounds (contended machine)
import sys, time, torch, contextlib

torch.set_num_threads(2)
import gankern
from gankern.gan.models import make_models
from gankern.gan.config import TrainConfig
from gankern.gan.step import make_optimizers, make_train_step
B, Z = 128, 64
model = sys.argv[1] if len(sys.argv) > 1 else "mlp"
DEV = torch.device("cpu")
def mk(fused, precision, cache=True):
    torch.manual_seed(0)
    G, D = make_models(model, (28, 28), Z, fused=fused, backend="cpp" if fused else None)
    og, od = make_optimizers(G, D, TrainConfig(), DEV)
    return make_train_step(G, D, og, od, z_dim=Z, batch_size=B, device=DEV, fused=fused, backend="cpp" if fused else None, precision=precision, cache_casts=cache)
steps = {"eager fp32": mk(False, "fp32"), "eager bf16 autocast": mk(False, "bf16", False),
         "gankern fp32": mk(True, "fp32"), "gankern bf16": mk(True, "bf16"), "gankern bf16 nocache": mk(True, "bf16", False)}
x = [torch.rand(B, 784) for _ in range(4)]
for s in steps.values():
    for i in range(3): s(x[i % 4])
best = {k: 1e9 for k in steps}
n = 5 if model == "mlp" else 2
for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 8):
    for k, s in steps.items():
        t = time.perf_counter()
        for i in range(n): s(x[i % 4])
        best[k] = min(best[k], (time.perf_counter() - t) / n)
for k, v in best.items():
    print(f"{model} {k:24s} {v*1e3:8.2f} ms  vs eager fp32 {best['eager fp32']/v:5.2f}x  vs eager bf16 {best['eager bf16 autocast']/v:5.2f}x")
