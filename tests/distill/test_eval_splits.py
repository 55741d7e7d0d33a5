"""The eval splits: the validation split used to choose students shares nothing with the table's."""

from __future__ import annotations

from distill.evaluate import SPLITS, eval_prompts


def test_val_and_test_share_no_noise_and_few_prompts() -> None:
    test, val = SPLITS["test"], SPLITS["val"]
    test_noise = {test.noise_base + s for s in range(test.seeds)}
    val_noise = {val.noise_base + s for s in range(val.seeds)}
    assert not test_noise & val_noise
    test_prompts = eval_prompts(test.prompts, test.scene_seed)
    val_prompts = eval_prompts(val.prompts, val.scene_seed)
    assert len(set(val_prompts)) > 0.9 * val.prompts  # drawn scenes, not one prompt repeated
    # 2,240 full captions exist, so ~7 shared prompts are chance (and with other noise, other images);
    # more would mean the two splits draw from one stream
    chance = test.prompts * val.prompts / 2240
    assert len(set(test_prompts) & set(val_prompts)) < 2 * chance


def test_the_table_split_is_the_documented_one() -> None:
    test = SPLITS["test"]
    assert (test.prompts, test.seeds, test.noise_base, test.suffix) == (64, 4, 1000, "")
    assert eval_prompts(test.prompts) == eval_prompts(test.prompts, test.scene_seed)
