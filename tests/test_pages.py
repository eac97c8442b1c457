"""Page sizes of the memory-mapped weights (runtime/pages.py)."""
from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from dsv4.runtime import pages
from dsv4.runtime.st_writer import write_safetensors
from dsv4.runtime.weights import SafetensorsFile


def test_weights_are_mapped_for_huge_pages(tmp_path):
    """The shard mapping asks for 2 MB pages (VmFlags 'hg' in smaps), and mapped_pages
    counts its resident bytes."""
    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps")
    if not pages.advise_huge(mmap.mmap(-1, 4096)):
        pytest.skip("this kernel offers no transparent huge pages")
    path = tmp_path / "a.safetensors"
    size = 8 << 20
    write_safetensors(path, {"w": ("U8", np.ones(size, np.uint8))})
    st = SafetensorsFile(path)
    before = pages.mapped_pages([path])
    assert before is not None and before.resident == 0
    assert int(st.tensor("w")[::4096].sum()) == size // 4096
    found = pages.mappings([path])
    assert found, "the shard is not mapped"
    assert all("hg" in m["VmFlags"].split() for m in found)
    after = pages.mapped_pages([path])
    assert size <= after.resident <= size + (4 << 20)
    assert 0 <= after.huge <= after.resident
    assert pages.mapped_pages([tmp_path / "other.safetensors"]).resident == 0
