"""The demo's measure of how much the LUM's query conditions change a user's answer (``condition_agreement``), and
which of them the DLRM takes as inputs (``input_conditions``)."""

import numpy as np
import pytest

from deploy.demo import condition_agreement, input_conditions
from schemas.events import ConditionOutput, LumFeatures

T = 1_767_225_600_000  # 2026-01-01


def _features(user: int, vectors: list[list[float]]) -> LumFeatures:
    return LumFeatures(user_id=user, model_version="m", computed_at_ms=T, as_of_ms=T,
                       conditions=[ConditionOutput(condition=f"scenario=s{k}", vector=v) for k, v in enumerate(vectors)])


def test_identical_answers_agree_fully_and_orthogonal_ones_not_at_all():
    same = _features(1, [[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.5, 1.0, 0.0]])  # one direction, any length
    orth = _features(2, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    assert condition_agreement([same]) == pytest.approx(1.0)
    assert condition_agreement([orth]) == pytest.approx(0.0)
    assert condition_agreement([same, orth]) == pytest.approx(0.5)  # mean over users


def test_pairwise_mean_of_one_user():
    v = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]  # cosines: 0, 1/sqrt2, 1/sqrt2
    assert condition_agreement([_features(1, v)]) == pytest.approx(np.sqrt(2) / 3)


def test_users_with_fewer_than_two_answers_do_not_count():
    assert condition_agreement([_features(1, [[1.0, 0.0]])]) is None
    assert condition_agreement([_features(1, [[1.0, 0.0]]), _features(2, [[1.0, 0.0], [-1.0, 0.0]])]) == \
        pytest.approx(-1.0)


def test_per_user_category_queries_are_not_dlrm_inputs_nor_counted_in_the_agreement():
    f = LumFeatures(user_id=1, model_version="m", computed_at_ms=T, as_of_ms=T, conditions=[
        ConditionOutput(condition="behavior=click", vector=[1.0, 0.0]),
        ConditionOutput(condition="scenario=home", vector=[1.0, 0.0]),
        ConditionOutput(condition="behavior=click,category=17", vector=[0.0, 1.0], own_category=17),
        ConditionOutput(condition="category=4", vector=[-1.0, 0.0], own_category=4),
        ConditionOutput(condition="behavior=buy,category=3", vector=[1.0, 0.0])])  # configured: an input
    names = input_conditions(f)
    assert names == ["behavior=click", "scenario=home", "behavior=buy,category=3"]
    assert condition_agreement([f], names) == pytest.approx(1.0)
    assert condition_agreement([f]) == pytest.approx(0.0)  # all ten pairs: 1, 0, -1, 1, 0, -1, 1, 0, 0, -1


def test_lead_counts_only_windows_from_the_first_features():
    from deploy.demo import lead_once_features_exist

    H = 3_600_000
    base = [{"window_start_ms": T + h * H, "auc": a} for h, a in enumerate([0.70, 0.72, 0.74, 0.75])]
    lum = [{"window_start_ms": T + h * H, "auc": a} for h, a in enumerate([0.60, 0.73, 0.73, None])]
    lead = lead_once_features_exist(base, lum, T + H)  # hour 0 (no features yet) does not count
    assert lead["windows"] == 2 and lead["ahead"] == 1
    assert lead["deltas"] == pytest.approx([0.01, -0.01])
    assert lead_once_features_exist(base, lum, T + 9 * H)["windows"] == 0
