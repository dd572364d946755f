"""Serving gives a candidate the LUM inputs that training gave it: the scorer's features equal the trainer's
featurizer on the examples the joiner writes for the same user, candidates and stored outputs."""

from __future__ import annotations

import numpy as np
import torch

from schemas.events import TARGET_CATEGORY, ConditionOutput, ItemEmbedding, LumFeatures, TrainingExample
from trainers.dlrm.features import Featurizer
from trainers.dlrm.model import DLRMConfig, build_model
from trainers.dlrm.score import LumStore, Scorer

T = 1_767_225_600_000


def test_each_candidate_is_matched_with_the_users_answer_for_its_own_category_and_its_item_vector():
    torch.manual_seed(0)
    cfg = DLRMConfig.preset("debug", features="lum", lum_conditions=["behavior=click"], lum_dim=4)
    model = build_model(cfg)
    click, own5, item = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.6, 0.8, 0.0]
    store = LumStore()
    store.put_user(LumFeatures(user_id=1, model_version="v", computed_at_ms=T, conditions=[
        ConditionOutput(condition="behavior=click", vector=click),
        ConditionOutput(condition="behavior=click,category=5", vector=own5, own_category=5)]))
    # Item 11 has no vector of its own (the model never trained on it): its category's record serves it.
    for i, c in ((10, 5), (None, 6)):
        store.put_item(ItemEmbedding(item_id=i, category_id=c, model_version="v", vector=item, computed_at_ms=T))
    served = Scorer(model, cfg).score(1, "home", [(10, 5), (11, 6)], store=store)

    def joined(item_id, category, conds, user):  # what the joiner writes for this candidate
        return TrainingExample(example_id=f"r/{item_id}", request_id="r", user_id=1, item_id=item_id,
                               category_id=category, position=0, scenario="home", event_time_ms=T, label=0,
                               lum_model_version="v", lum_conditions=conds, lum_user=user, lum_item=item)

    fb = Featurizer(cfg)([joined(10, 5, ["behavior=click", TARGET_CATEGORY], [click, own5]),
                          joined(11, 6, ["behavior=click"], [click])])
    model.eval()
    with torch.no_grad():
        trained = torch.sigmoid(model(fb.dense, fb.sparse).squeeze(-1)).numpy()
    assert np.allclose(served, trained, atol=1e-6), (served, trained)


def test_a_user_is_matched_with_the_item_vector_of_its_own_model_version():
    """Serving attaches item vectors as the joiner does in training: of the user features' model version (an item
    vector of another version is meaningless to match), and none for a user without features."""
    torch.manual_seed(0)
    cfg = DLRMConfig.preset("debug", features="lum", lum_conditions=["behavior=click"], lum_dim=4)
    model = build_model(cfg)
    user, old, new = [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]
    store = LumStore()
    store.put_user(LumFeatures(user_id=1, model_version="old", computed_at_ms=T,
                               conditions=[ConditionOutput(condition="behavior=click", vector=user)]))
    store.put_item(ItemEmbedding(item_id=10, category_id=5, model_version="old", vector=old, computed_at_ms=T))
    store.put_item(ItemEmbedding(item_id=10, category_id=5, model_version="new", vector=new, computed_at_ms=T + 1))
    store.put_item(None)  # a retired version's tombstone
    scorer = Scorer(model, cfg)

    def joined(user_id, version, conds, vecs, item):  # what the joiner writes for this candidate
        return TrainingExample(example_id="r/10", request_id="r", user_id=user_id, item_id=10, category_id=5,
                               position=0, scenario="home", event_time_ms=T, label=0, lum_model_version=version,
                               lum_conditions=conds, lum_user=vecs, lum_item=item)

    fb = Featurizer(cfg)([joined(1, "old", ["behavior=click"], [user], old), joined(2, None, None, None, None)])
    model.eval()
    with torch.no_grad():
        trained = torch.sigmoid(model(fb.dense, fb.sparse).squeeze(-1)).numpy()
    served = [scorer.score(u, "home", [(10, 5)], store=store)[0] for u in (1, 2)]
    assert np.allclose(served, trained, atol=1e-6), (served, trained)
