"""``anchor_init``: the official N(0, 1) anchors from the seed, or the same law on fixed,
evenly spread points (seed-free), with the rest of the init unchanged."""
import pytest
import torch
from scipy.stats import norm

from grounder_helpers import tiny_qd_config
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.models.grounder import C2FQDDETR
from lavis_c2f.models.grounder.model import spread_anchor_logits


def build(seed: int, anchor_init: str) -> C2FQDDETR:
    torch.manual_seed(seed)
    return C2FQDDETR.from_config(tiny_qd_config(anchor_init=anchor_init))


def test_spread_points_are_halton_through_the_normal_quantile():
    logits = spread_anchor_logits(4)
    # Halton bases 2 and 3 without the first point (0, 0): (1/2, 1/3), (1/4, 2/3), (3/4, 1/9), (1/8, 4/9)
    expected = norm.ppf([[1 / 2, 1 / 3], [1 / 4, 2 / 3], [3 / 4, 1 / 9], [1 / 8, 4 / 9]])
    assert logits.shape == (4, 2) and logits.dtype == torch.float32
    assert torch.allclose(logits, torch.tensor(expected, dtype=torch.float32))
    assert len({tuple(r) for r in spread_anchor_logits(30).tolist()}) == 30


def test_spread_anchors_do_not_depend_on_the_seed_and_nothing_else_changes():
    a, b = build(0, "spread"), build(1, "spread")
    assert torch.equal(a.detr.query_embed.weight, b.detr.query_embed.weight)
    official = build(0, "official")
    assert not torch.equal(official.detr.query_embed.weight, a.detr.query_embed.weight)
    rest = {k: v for k, v in official.state_dict().items() if "query_embed" not in k}
    for k, v in rest.items():                      # same random draws for every other parameter
        assert torch.equal(v, a.state_dict()[k]), k
    assert official.config["anchor_init"] == "official" and a.config["anchor_init"] == "spread"


def test_unknown_anchor_init_is_a_config_error():
    with pytest.raises(ConfigError, match="anchor_init"):
        C2FQDDETR.from_config(tiny_qd_config(anchor_init="grid"))
