"""A tiny regression model/dataset/task registered as ``c2f_toy_*`` for runner tests.

Importing this module registers them; the package itself never imports it. The components
use the same interfaces as the real ones (LAVIS ``BaseModel`` with ``from_config``, a builder
with an absolute ``DATASET_CONFIG_DICT``, a ``C2FTask`` subclass) and include dropout and
shuffling, so they exercise every random generator the runner must control.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.models.base_model import BaseModel

from lavis_c2f.data.cfg import check_keys
from lavis_c2f.paths import config_path
from lavis_c2f.tasks.base import C2FTask


class ToyRegressionDataset(torch.utils.data.Dataset):
    """``n`` samples ``x ~ N(0, 1)^in_dim``, ``y = w . x + 0.1 noise`` (fixed ``w`` per seed)."""

    def __init__(self, n: int, in_dim: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(in_dim, generator=torch.Generator().manual_seed(1234))
        self.x = torch.randn(n, in_dim, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"index": i, "x": self.x[i], "y": self.y[i]}

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"index": [s["index"] for s in samples], "x": torch.stack([s["x"] for s in samples]),
                "y": torch.stack([s["y"] for s in samples])}


@registry.register_builder("c2f_toy_regression")
class ToyRegressionBuilder(BaseDatasetBuilder):
    DATASET_CONFIG_DICT = {"default": config_path("testing/toy_dataset.yaml")}

    def build_datasets(self):
        c = self.config
        return {"train": ToyRegressionDataset(int(c.n_train), int(c.in_dim), int(c.seed)),
                "val": ToyRegressionDataset(int(c.n_val), int(c.in_dim), int(c.seed) + 1)}


@registry.register_model("c2f_toy_regressor")
class ToyRegressor(BaseModel):
    PRETRAINED_MODEL_CONFIG_DICT = {"default": config_path("testing/toy_model.yaml")}

    def __init__(self, in_dim: int = 8, hidden_dim: int = 16, dropout: float = 0.1):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden_dim), torch.nn.ReLU(),
                                       torch.nn.Dropout(dropout), torch.nn.Linear(hidden_dim, 1))

    def forward(self, samples: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        pred = self.net(samples["x"]).squeeze(-1)
        loss = torch.nn.functional.mse_loss(pred, samples["y"])
        return {"loss": loss, "loss_mse": loss.detach()}

    @classmethod
    def from_config(cls, cfg) -> "ToyRegressor":
        cfg = check_keys(cfg, {"arch", "model_type", "in_dim", "hidden_dim", "dropout"}, "model")
        return cls(in_dim=int(cfg.get("in_dim", 8)), hidden_dim=int(cfg.get("hidden_dim", 16)),
                   dropout=float(cfg.get("dropout", 0.1)))


@registry.register_task("c2f_toy_regression")
class ToyRegressionTask(C2FTask):
    def valid_step(self, model, samples) -> List[Dict[str, Any]]:
        pred = model.net(samples["x"]).squeeze(-1)
        return [{"index": int(i), "sq_err": float((p - y) ** 2)}
                for i, p, y in zip(samples["index"], pred, samples["y"])]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs) -> Dict[str, Any]:
        mse = sum(r["sq_err"] for r in val_result) / max(len(val_result), 1)
        return {"agg_metrics": -mse, "mse": mse, "n": len(val_result),
                "indices": [r["index"] for r in val_result]}
