"""keep_freed_memory: large tensors allocated again and again reuse the heap's pages instead of
faulting in fresh ones each time (in a process of its own: the setting is process-wide)."""

import subprocess
import sys

import pytest

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
