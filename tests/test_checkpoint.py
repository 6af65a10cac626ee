"""Checkpoints: saved at one TP/PP, loaded at another, weights identical; interrupted saves never look complete."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from nemo_minitron import checkpoint
from nemo_minitron.models import bridge
from tiny import hf_model, tiny_arch


def save_from_global(arch, global_sd, path):
    from nemo_minitron.models.gpt import build_gpt_model

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    checkpoint.save_checkpoint(model, path, metadata={"stage": "test"})


def load_and_gather(path):
    model = checkpoint.load_checkpoint(path)
    return bridge.gather_global(model)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tie,save_layout,load_layout", [(True, (2, 1), (1, 2)), (False, (2, 2), (1, 1)), (True, (1, 1), (2, 2))]
)
def test_reshard_on_load(tmp_path, tie, save_layout, load_layout):
    arch = tiny_arch(tie=tie)
    global_sd = bridge.hf_to_global(arch, hf_model(arch).state_dict())
    ckpt = tmp_path / "ckpt"
    tp, pp = save_layout
    run_distributed(save_from_global, world_size=tp * pp, tp=tp, pp=pp, args=(arch, global_sd, ckpt))
    assert checkpoint.is_complete(ckpt) and not ckpt.with_name("ckpt.partial").exists()
    assert checkpoint.read_arch(ckpt) == arch
    assert checkpoint.read_metadata(ckpt)["saved_with"] == {"tp": tp, "pp": pp, "dp": 1}
    tp, pp = load_layout
    for loaded in run_distributed(load_and_gather, world_size=tp * pp, tp=tp, pp=pp, args=(ckpt,)):
        assert loaded.keys() == global_sd.keys()
        for name, tensor in global_sd.items():
            assert torch.equal(loaded[name], tensor), name


def test_incomplete_checkpoint_is_refused(tmp_path: Path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.read_arch(tmp_path / "missing")
    partial = tmp_path / "ckpt.partial"
    (partial / checkpoint.WEIGHTS_DIR).mkdir(parents=True)
    tiny_arch(tie=True).save(partial / checkpoint.CONFIG_FILE)  # killed before metadata.json
    assert not checkpoint.is_complete(partial)
    with pytest.raises(checkpoint.CheckpointError, match="interrupted save"):
        checkpoint.read_arch(partial)
