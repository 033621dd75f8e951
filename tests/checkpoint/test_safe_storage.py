"""Loading never unpickles arbitrary objects: crafted DCP metadata is refused."""

from __future__ import annotations

import os
import pickle

import pytest

from tests.checkpoint.common import build_model, checkpoint_config
from torchtitan_like.checkpoint import create_seed_checkpoint
from torchtitan_like.checkpoint.safe_storage import read_metadata
from torchtitan_like.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_that_would_run_code_is_refused(tmp_path):
    folder = create_seed_checkpoint(checkpoint_config(), str(tmp_path), build_model())
    assert read_metadata(folder).state_dict_metadata  # the genuine metadata reads fine
    with open(os.path.join(folder, ".metadata"), "wb") as metadata_file:
        pickle.dump(_RunsCode(), metadata_file)
    with pytest.raises(DataError, match="posix.system|os.system"):
        read_metadata(folder)
    assert not os.path.exists("pwned")
