"""The divergence diagnostic: a pre-training whose loss rises above chance (ln of the dictionary
size) after warm-up, or ends above it, is flagged in the result, results.parquet and the report."""
import math

import pytest

from conmim.trial import pretrain_diverged, result_row, trial_warnings

LN16 = math.log(16)


def h(*losses):
    return [{"epoch": i + 1, "pretrain_loss": x} for i, x in enumerate(losses)]


@pytest.mark.parametrize("history, warmup, diverged", [
    (h(2.5, 1.9, 1.2), 0.5, False),           # healthy: below chance after warm-up
    (h(3.4, 1.9, 1.2), 1, False),             # above chance only during warm-up (random init starts above)
    (h(2.2, 4.7, 3.0), 0.5, True),            # rises above chance after warm-up (the tiny no_momentum_encoder arm)
    (h(2.2, 2.0, 2.9), 0, True),              # ends above chance
    (h(2.2, 2.0, float("nan")), 0, True),     # ends not finite
    (h(3.4), 1, True),                        # only epoch is warm-up, but it ends above chance
    ([], 0, False),                           # no pre-training (the scratch row)
])
def test_pretrain_diverged(history, warmup, diverged):
    assert pretrain_diverged(history, LN16, warmup) is diverged


def test_chance_is_ln_of_the_dictionary(small):
    assert small().dictionary_size() == 16  # 28 px / 7 px patches: P = 16
    batch = small(objective__dictionary="batch")
    assert batch.dictionary_size() == 16 * batch.micro_batch("pretrain")


def test_flag_reaches_the_row_and_the_warning_tag():
    rec = {"name": "a_seed0", "variant": "a", "seed": 0, "overrides": {}, "key": "k"}
    assert result_row(rec, "pending")["diverged"] is False
    assert trial_warnings({"diverged": True, "collapsed": False}) == ["pre-training diverged (loss above chance after warm-up)"]
    assert trial_warnings({"collapsed": True, "at_chance": True}) == ["collapsed pre-training"]


@pytest.mark.slow
def test_a_run_made_to_diverge_is_flagged(small, tmp_path):
    """lr 1.0 makes the online encoder's predictions confidently wrong: the loss climbs far above
    ln 16 (4.8 here), and the trial's result and its results.parquet row say so."""
    import json
    from conmim.trial import TrialResult, run_in_process
    bad = run_in_process(small(pretrain__lr=1.0), tmp_path / "bad")
    assert bad.flags["diverged"] and bad.metrics["final_pretrain_loss"] > LN16 + 1
    assert json.loads((tmp_path / "bad" / "result.json").read_text())["diverged"] is True
    rec = {"name": "a_seed0", "variant": "a", "seed": 0, "overrides": {}, "key": bad.canonical_hash}
    assert result_row(rec, "finished", TrialResult.read(tmp_path / "bad"))["diverged"] is True
