"""Process-group start-up: the comm timeouts apply to every group that carries training traffic."""

import os
import re

from tests.helpers import launch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timeout_worker.py")


def test_timeouts_reach_every_mesh_group_and_a_silent_rank_fails_the_collective():
    output = launch([WORKER], 4, timeout=90, fork=True)
    for rank in range(4):
        # the default group, dp_shard and tp
        assert f"rank {rank} groups 3 init timeouts [77.0, 77.0, 77.0]" in output, output
        assert f"rank {rank} train timeouts [2.0, 2.0, 2.0]" in output, output
        assert f"rank {rank} first-validation timeouts [77.0, 77.0, 77.0]" in output, output
        assert f"rank {rank} after-validation timeouts [2.0, 2.0, 2.0]" in output, output
    # rank 0 waits on its tp peer rank 1 (asleep for 8 s): the 2 s training timeout fires, not torch's 30 min default
    seconds = float(re.search(r"rank 0 collective failed after ([\d.]+)s", output).group(1))
    assert 1.5 < seconds < 6, output
