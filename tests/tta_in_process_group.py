"""`wemoe-tta` as torchrun starts it, asserting afterwards, inside each process, that it ran in a process group of
the size the test expects (`EXPECTED_WORLD_SIZE`): a launcher that silently starts one process fails here."""

import os
import sys

import torch.distributed as dist

from wemoe.cli.tta import main

if __name__ == "__main__":
    main(sys.argv[1:])
    expected = int(os.environ["EXPECTED_WORLD_SIZE"])
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    assert world_size == expected, f"wemoe-tta ran in a process group of {world_size}, expected {expected}"
    print(f"process {dist.get_rank()} of {world_size} done", flush=True)
