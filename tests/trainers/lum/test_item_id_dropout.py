"""Items the LUM never trained on are read as their category (``LumConfig.item_id_dropout``)."""

from __future__ import annotations

import json

import torch

from trainers.lum.model import PRESETS, LumModel, info_nce
from trainers.lum.pretrain import load_checkpoint, save_checkpoint


def test_an_unknown_item_is_its_category_alone():
    torch.manual_seed(0)
    model = LumModel(PRESETS["debug"].model_copy(update={"item_id_dropout": 0.1})).eval()
    ids, cats = torch.tensor([11, 12, 13]), torch.tensor([4, 4, 5])
    unknown = torch.zeros(3, dtype=torch.bool)
    cold = model.item_vectors(ids, cats, unknown)
    assert torch.allclose(cold[0], cold[1]) and not torch.allclose(cold[0], cold[2])  # the id plays no part
    known = model.item_vectors(ids, cats)
    assert not torch.allclose(known[0], known[1]) and torch.allclose(known, model.item_vectors(ids, cats, ~unknown))


def test_training_drops_ids_at_the_configured_rate_and_evaluation_never():
    torch.manual_seed(0)
    model = LumModel(PRESETS["debug"].model_copy(update={"item_id_dropout": 0.3}))
    kept = model.train().id_kept(torch.arange(20_000))
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.02
    assert model.eval().id_kept(torch.arange(10)) is None
    assert LumModel(PRESETS["debug"].model_copy(update={"item_id_dropout": 0.0})).train().id_kept(
        torch.arange(10)) is None


def test_the_loss_trains_the_category_only_vectors():
    """Candidates lose their ids in training too: the category rows get gradient through category-only
    vectors, which a loss that always sees ids would leave to the ids alone."""
    torch.manual_seed(0)
    cfg = PRESETS["debug"]
    user = torch.nn.functional.normalize(torch.randn(8, cfg.d_model), dim=-1)
    items, cats = torch.arange(100, 108), torch.arange(8) % 3

    def id_grad_share(p: float) -> float:
        torch.manual_seed(1)
        model = LumModel(cfg.model_copy(update={"item_id_dropout": p})).train()
        info_nce(model, user, items, items, cats, None, cfg.temperature).backward()
        return model.tokens.item.weight.grad.abs().sum().item()

    assert id_grad_share(0.5) < id_grad_share(0.0)  # dropped ids get no gradient


def test_checkpoint_from_before_item_id_dropout_loads_without_it(tmp_path):
    d = save_checkpoint(tmp_path, LumModel(PRESETS["debug"].model_copy(update={"item_id_dropout": 0.1})), None, 1)
    meta = json.loads((d / "meta.json").read_text())
    del meta["config"]["item_id_dropout"]  # written before the field existed: trained without it
    (d / "meta.json").write_text(json.dumps(meta))
    model, _, _ = load_checkpoint(tmp_path)
    assert model.cfg.item_id_dropout == 0.0 and PRESETS["small"].item_id_dropout > 0
