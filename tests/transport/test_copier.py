"""ParallelCopier: every byte lands where it should, split or not; threads end at close."""

import threading

import pytest
import torch

from localrref.transport.copier import ParallelCopier


@pytest.mark.parametrize("helpers", [0, 1, 3])
@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 64 * 1024 + 7, 3 * 4096 + 1])
def test_copies_are_exact_at_every_split(helpers, nbytes):
    copier = ParallelCopier(helpers=helpers, threshold=1)  # split everything
    try:
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        dst = torch.zeros(nbytes + 2, dtype=torch.uint8)  # guard bytes on both sides
        copier.memmove(dst.data_ptr() + 1, src.data_ptr(), nbytes)
        assert torch.equal(dst[1:-1], src)
        assert dst[0] == 0 and dst[-1] == 0
    finally:
        copier.close()


def test_small_copies_start_no_thread_and_close_stops_the_helpers():
    before = threading.active_count()
    copier = ParallelCopier(helpers=2, threshold=1 << 20)
    src = torch.ones(1 << 16, dtype=torch.uint8)
    dst = torch.zeros(1 << 16, dtype=torch.uint8)
    copier.memmove(dst.data_ptr(), src.data_ptr(), src.numel())
    assert threading.active_count() == before
    big_src = torch.ones(2 << 20, dtype=torch.uint8)
    big_dst = torch.zeros(2 << 20, dtype=torch.uint8)
    copier.memmove(big_dst.data_ptr(), big_src.data_ptr(), big_src.numel())
    assert bool((big_dst == 1).all())
    assert threading.active_count() > before
    copier.close()
    assert threading.active_count() == before
    # Closed: still copies, on the calling thread.
    big_dst.zero_()
    copier.memmove(big_dst.data_ptr(), big_src.data_ptr(), big_src.numel())
    assert bool((big_dst == 1).all()) and threading.active_count() == before


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="helpers must be >= 0"):
        ParallelCopier(helpers=-1)
