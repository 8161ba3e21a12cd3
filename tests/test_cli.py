"""The main job end to end, at a tiny size."""

from __future__ import annotations

import json

import pytest
import torch

import bipkernels
from bipkernels import data, models
from bipkernels.cli import main


def test_digits_split_is_fixed_and_disjoint():
    first, second = data.digits(), data.digits()
    assert {name: len(split) for name, split in first.items()} == {"train": 1078, "val": 269, "test": 450}
    assert torch.equal(first["test"].tensors[0], second["test"].tensors[0])
    assert first["train"].tensors[0].shape[1:] == (1, 8, 8)


@pytest.mark.parametrize("structure", ["unstructured", "filter"])
def test_prune_writes_checkpoint_and_results(tmp_path, structure):
    main(["prune", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--structure", structure,
          "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= result["test_accuracy"] <= 1.0
    if structure == "unstructured":
        assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    model = bipkernels.convert(models.SmallResNet(), structure=structure)
    model.load_state_dict(torch.load(tmp_path / "pruned.pt")["model"])
    assert bipkernels.sparsity(model) == pytest.approx(result["sparsity"])
    assert not list(tmp_path.glob("*.tmp"))
