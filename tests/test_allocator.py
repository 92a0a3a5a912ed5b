import os
import subprocess
import sys

import pytest

# Allocate, fill and free a 64 MiB tensor five times; print whether the settings took and the
# page faults those five rounds cost (glibc by default unmaps such blocks on free: ~16k faults each).
ROUNDS = """
import resource, torch
from manyheads.allocator import keep_freed_memory
applied = keep_freed_memory()
for _ in range(5):  # the heap settles over the first rounds
    torch.ones(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(16 * 2**20)
print(applied, keep_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def rounds(**env: str) -> tuple[str, str, int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    applied, again, faults = out.stdout.split()
    return applied, again, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    applied, again, faults = rounds()
    assert (applied, again) == ("True", "True")
    applied, _, system_faults = rounds(MANYHEADS_MALLOC="system")  # the opt-out keeps glibc's defaults
    assert applied == "False"
    assert system_faults > 5 * 10_000  # every round maps and faults in 16k fresh pages
    assert faults < system_faults / 4  # kept: the freed block comes back from the heap
