"""`scripts/eval_difix_pairs.py`: per-kind scores of Difix models on a dataset's test pairs."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from script_modules import load_script


@pytest.fixture(scope="module")
def eval_pairs():
    return load_script("eval_difix_pairs")


def test_bands_split_an_output_into_low_and_high_frequencies(eval_pairs):
    generator = torch.Generator().manual_seed(0)
    image = 0.4 + 0.2 * torch.rand(1, 3, 24, 32, generator=generator)
    output = 0.4 + 0.2 * torch.rand(1, 3, 24, 32, generator=generator)
    swaps = eval_pairs.band_swaps(output, image, 2.0)
    torch.testing.assert_close(swaps["low band"] + swaps["high band"], output + image)
    # A global brightness change is all low band: kept by "low band", dropped by "high band".
    brighter = image + 0.05
    swaps = eval_pairs.band_swaps(brighter, image, 2.0)
    torch.testing.assert_close(swaps["low band"], brighter)
    torch.testing.assert_close(swaps["high band"], image)


def one_pair_dataset(folder, with_reference: bool = True):
    """A dataset JSON whose train and test splits hold one noisy 32x32 pair (and its shifted reference)."""
    rng = np.random.default_rng(0)
    clean = rng.uniform(0.2, 0.8, (32, 32, 3))
    images = {"in": np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1), "gt": clean, "ref": np.roll(clean, 3, axis=1)}
    for name, image in images.items():
        iio.imwrite(folder / f"{name}.png", (image * 255).astype(np.uint8))
    pair = {"image": "in.png", "target_image": "gt.png", "prompt": "remove degradation"}
    pair.update({"ref_image": "ref.png"} if with_reference else {})
    dataset = folder / "data.json"
    dataset.write_text(json.dumps({"train": {"p0": pair}, "test": {"t0": pair}}))
    return dataset


def test_scores_models_with_ablations_and_bands(eval_pairs, tmp_path):
    dataset = one_pair_dataset(tmp_path)

    report = tmp_path / "scores.json"
    settings = eval_pairs.EvalPairs(dataset=dataset, model=["random-tiny-architecture"], ablations=True, bands=2.0, json=report)
    summary = eval_pairs.main(settings)

    spec = "random-tiny-architecture"
    expected = [f"{spec}", f"{spec} no ref", f"{spec} UNet off", f"{spec} low band", f"{spec} high band"]
    assert json.loads(report.read_text())["models"] == expected
    row = summary["other"]
    assert row["pairs"] == 1 and set(row) == {"pairs", "input", *expected}
    assert all(np.isfinite(row[name]["psnr"]) for name in ["input", *expected])


def test_on_targets_scores_difix_run_on_the_clean_target(eval_pairs, tmp_path):
    dataset = one_pair_dataset(tmp_path, with_reference=False)

    summary = eval_pairs.main(eval_pairs.EvalPairs(dataset=dataset, model=["random-tiny-architecture"], on_targets=True))

    row = summary["other"]
    assert set(row) == {"pairs", "input", "random-tiny-architecture", "random-tiny-architecture on target"}
    # Random weights move the clean target far: a finite PSNR, well below an untouched image's.
    assert np.isfinite(row["random-tiny-architecture on target"]["psnr"])
    assert row["random-tiny-architecture on target"]["psnr"] < 40
