"""Plans are strict: one meaning per field, and every conflict or misplaced field is an error naming it."""

import pytest

from tqcompressor import CompressionPlan, KroneckerConfig, LowRankConfig, Rule


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"pattern": "x", "method": "magic"}, r"plan rule 'x': unknown compression method 'magic'"),
        (
            {"pattern": "x", "shape": [2, 2, 2, 2], "ratio": 0.5},
            r"'x': give exactly one of 'shape', 'ratio' or 'embedding_factor' \(got shape and ratio\)",
        ),
        (
            {"pattern": "x", "embedding_factor": 2, "method": "svd"},
            r"'x': field 'embedding_factor' does not apply to method 'lowrank'",
        ),
        (
            {"pattern": "x", "ratio": 0.5, "rank": 4},
            r"'x': field 'rank' .* applies with 'shape'; with 'ratio' use 'max_rank'",
        ),
        ({"pattern": "x", "shape": [2, 2, 2, 2], "max_rank": 2}, r"'x': field 'max_rank' applies with 'ratio' only"),
        (
            {"pattern": "x", "embedding_factor": 2, "permute": False, "time_budget": 5},
            r"'x': field 'time_budget' tunes the permutation search",
        ),
        ({"pattern": "x", "method": "lowrank", "rank": 4, "ratio": 0.5}, r"'x': give exactly one of 'rank' or 'ratio'"),
        ({"pattern": "x", "method": "lowrank"}, r"'x': give exactly one of 'rank' or 'ratio'"),
        ({"pattern": "x", "ratio": 1.5}, r"'x': field 'ratio' must be in \(0, 1\]"),
        ({"pattern": "x", "ratio": 0.5, "time_budget": -1}, r"'x': field 'time_budget' must be a non-negative"),
        (
            {"pattern": "x", "embedding_factor": 2, "colour": "red"},
            r"'x': field 'colour' does not apply to method 'kronecker'",
        ),
        ({"pattern": "(", "ratio": 0.5}, r"not a valid regular expression"),
        ({"ratio": 0.5}, r"needs|with a 'pattern'"),
    ],
)
def test_a_rule_with_conflicting_or_foreign_fields_is_refused_naming_rule_and_field(rule, message):
    with pytest.raises(ValueError, match=message):
        CompressionPlan.from_dict({"rules": [rule]})


def test_unknown_plan_keys_and_empty_plans_are_refused():
    with pytest.raises(ValueError, match="unknown plan keys"):
        CompressionPlan.from_dict({"rules": [], "rulez": 1})
    with pytest.raises(ValueError, match="at least one rule"):
        CompressionPlan.from_dict({"rules": []})


def test_plan_files_round_trip_and_omit_unset_fields(tmp_path):
    plan = CompressionPlan(
        [
            Rule(r"a\.wte", KroneckerConfig(embedding_factor=2, time_budget=5.0)),
            Rule(r"a\.fc", KroneckerConfig(shape=(4, 8, 2, 2), rank=2, permute="rows")),
            Rule(r"a\.proj", LowRankConfig(ratio=0.25)),
        ],
        name="p",
        tie_head=False,
    )
    assert plan.rules[1].to_dict() == {
        "pattern": r"a\.fc",
        "method": "kronecker",
        "shape": [4, 8, 2, 2],
        "rank": 2,
        "permute": "rows",
    }
    for suffix in (".yaml", ".json"):
        plan.save(tmp_path / f"plan{suffix}")
        assert CompressionPlan.load(tmp_path / f"plan{suffix}") == plan
    # "svd" names the low-rank method in older plan files.
    assert CompressionPlan.from_dict({"rules": [{"pattern": "x", "method": "svd", "rank": 3}]}).rules[
        0
    ].config == LowRankConfig(rank=3)


def test_python_configs_validate_on_construction():
    with pytest.raises(ValueError, match="exactly one"):
        KroneckerConfig(shape=(2, 2, 2, 2), embedding_factor=2)
    with pytest.raises(TypeError, match="method config"):
        Rule("x", {"ratio": 0.5})
