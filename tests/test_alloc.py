"""Large CPU outputs of the C++ kernels come from huge-page-advised memory (csrc/include/gankern/common.h)."""
import pytest
import torch
import torch.nn.functional as F

import gankern
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not gankern.backends()["cpp"]["available"], reason="gankern._C not built")
HUGE = 2 << 20  # 2 MiB


def test_large_output_is_huge_page_aligned_and_fully_written():
    x = torch.randn(10 << 20, 1)  # 40 MiB: above the 32 MiB threshold
    loss = gankern.bce_with_logits(x, 0.9, reduction="none", backend="cpp")  # poisoned (NaN) before the kernel
    assert loss.untyped_storage().data_ptr() % HUGE == 0
    assert_close(loss, F.binary_cross_entropy_with_logits(x.double(), torch.full_like(x, 0.9, dtype=torch.float64),
                                                          reduction="none"))
    loss.resize_(10)  # an ordinary resizable tensor
    assert loss.shape == (10,)


def test_large_channels_last_output_keeps_its_layout():
    x = torch.randn(64, 64, 64, 40).contiguous(memory_format=torch.channels_last)  # 40 MiB
    y = gankern.batch_norm_relu(x, None, None, None, None, True, backend="cpp")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert y.untyped_storage().data_ptr() % HUGE == 0
    assert_close(y, F.relu(F.batch_norm(x.double(), None, None, None, None, True)))

