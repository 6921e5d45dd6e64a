"""A checkpoint written before the training loop became explicit parts still resumes exactly.

``fixtures/run_c4d26ef/`` is a run that kiln at commit c4d26ef interrupted after update 9 (mid
epoch 2); ``fixtures/make_run_c4d26ef.py`` shows how it was made. Today's code resumes it where
it stopped and ends with the weights the old code reached running straight through.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from kiln.config import load_config
from kiln.train.checkpoint import load_checkpoint, resolve_checkpoint
from kiln.train.trainer import Trainer

FIXTURES = Path(__file__).parent / "fixtures"


def test_checkpoint_of_c4d26ef_resumes_where_it_stopped_and_ends_the_same(
    tmp_path: Path,
) -> None:
    run = tmp_path / "old"
    shutil.copytree(FIXTURES / "run_c4d26ef", run)
    cfg = load_config(run / "config.yaml", [f"resume={run}", f"out_dir={tmp_path}"])
    trainer = Trainer(cfg, verbose=False)
    assert (trainer.epoch, trainer.batch_in_epoch, trainer.step) == (1, 4, 9)
    result = trainer.fit()
    assert result.run_dir == run and result.steps == 10
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert [(r["step"], r["epoch"], r["batch"]) for r in resumed] == [(9, 1, 4)]
    final = load_checkpoint(resolve_checkpoint(run))
    assert final["loop"]["step"] == 10 and final["resumed_from"] == [9]
    expected = load_file(str(FIXTURES / "run_c4d26ef_final_model.safetensors"))
    assert final["model"].keys() == expected.keys()
    for k, v in expected.items():
        # The same machine gives the same bits; another CPU may round a matmul differently.
        torch.testing.assert_close(final["model"][k], v, rtol=1e-5, atol=1e-6)
