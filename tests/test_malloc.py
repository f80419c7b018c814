"""keep_freed_memory: large tensors allocated again and again reuse the heap's pages instead of
faulting in fresh ones each time (in a process of its own: the setting is process-wide);
huge_pages: the sparse memories' large stores ask for transparent huge pages."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsemem._malloc import huge_pages
from sparsemem.memory import SDNCMemory

CHURN = """
import resource, torch
from sparsemem._malloc import keep_freed_memory

def faults_of_churn():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.ones(2**24)  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_churn()
plain = faults_of_churn()
applied = keep_freed_memory()
faults_of_churn()
print(applied, plain, faults_of_churn())
"""


def test_large_tensors_reuse_freed_pages():
    done = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True)
    applied, plain, kept = done.stdout.split()
    if applied != "True":
        pytest.skip("not glibc's malloc: keep_freed_memory changes nothing here")
    pages = 8 * 2**26 // 4096
    assert int(plain) > pages / 2  # each 64 MiB tensor faulted in fresh (4 KiB pages)
    assert int(kept) < pages / 100


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds address (Linux's /proc/self/smaps)."""
    flags, inside = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "VmFlags:":
            flags = line.split()[1:]
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc/self/smaps")
def test_a_sparse_memorys_large_stores_ask_for_huge_pages():
    """huge_pages marks the whole 2 MiB pages inside a tensor (the "hg" flag: MADV_HUGEPAGE) and
    leaves its values alone; the rows, link rows and LRU stamps of a large SDNC memory get it."""
    tensor = torch.arange(3 * 2**20, dtype=torch.float32)  # 12 MiB: whole huge pages inside
    assert huge_pages(tensor) is tensor and torch.equal(tensor, torch.arange(3 * 2**20, dtype=torch.float32))
    middle = tensor.data_ptr() + tensor.numel() * 2
    assert "hg" in _vm_flags(middle)
    # A tensor within one huge page is left alone. Its flags may already hold "hg": the heap can
    # place it in pages an earlier test's large tensor asked for and freed (keep_freed_memory).
    small = torch.zeros(1000)
    flags = _vm_flags(small.data_ptr())
    assert huge_pages(small) is small and _vm_flags(small.data_ptr()) == flags
    state = SDNCMemory(2**18, 16, 1, k=4).init_state(4)  # stamps: 4 MiB
    links, lru = state.links.store, state.usage
    stores = (state.memory.store.rows, links.rows, links.indices, lru.last_access)
    assert all("hg" in _vm_flags(store.data_ptr() + store.numel() * store.element_size() // 2) for store in stores)
