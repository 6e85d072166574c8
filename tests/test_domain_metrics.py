"""The domain classifier and its metrics (acc_cls, conf_cls, fd_cls), the real-data calibration rows, the record's
diagnostics, and the report's calibration rows and metric columns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import randomize

from biflow_bench.metrics import classifier as cls
from biflow_bench import evaluation
from biflow_bench.ablations import get_spec
from biflow_bench.data import DataSplits, ImageDataset
from biflow_bench.metrics.frechet import feature_stats, frechet_distance
from biflow_bench.metrics.inverse import inverse_gaps, measure_noise_sensitivity, noise_sensitivity, sensitivity_labels
from biflow_bench.models import TARFlow, TARFlowConfig
from biflow_bench.models.biflow import BackwardOutput, BiFlow, BiFlowConfig
from biflow_bench.report.render import render_report
from biflow_bench.results import CALIBRATION, write_record

# ------------------------------------------------------------------------------------------------ acc_cls, conf_cls


def test_label_accuracy_golden():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 1.0], [math.log(3), 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 0])
    acc, conf = cls.label_accuracy(logits, labels)
    # argmax: 0, 0 (tie -> first), 1, 0 -> right, wrong, wrong, right
    assert acc == pytest.approx(0.5)
    p = [math.exp(2) / (math.exp(2) + 2), 1 / 3, math.exp(1) / (math.exp(3) + math.exp(1) + 1), 3 / 5]
    assert conf == pytest.approx(sum(p) / 4, rel=1e-6)  # float32 logits
    acc_se, conf_se = cls.label_accuracy_se(logits, labels)
    assert acc_se == pytest.approx(math.sqrt(0.5 * 0.5 / 4))  # binomial: sqrt(acc (1 - acc) / n)
    mean = sum(p) / 4
    assert conf_se == pytest.approx(math.sqrt(sum((q - mean) ** 2 for q in p) / 4) / 2, rel=1e-6)


def test_quantize_is_eight_bit():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.003, 0.5, 1.0, 3.0])
    q = cls.quantize(x)
    assert torch.allclose(q, torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1)
    assert q[0] == -1 and q[-1] == 1 and q[3] == q[2] + 0  # 0.003 rounds to the 0 level's neighbour at most
    assert torch.equal(cls.quantize(q), q)


def _toy_splits(n: int = 96, side: int = 8, seed: int = 0) -> DataSplits:
    """Two classes a CNN separates at once: a bright left half or a bright right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 1, side, side), -0.8)
    for i in range(n):
        half = slice(0, side // 2) if labels[i] == 0 else slice(side // 2, side)
        x[i, :, :, half] = 0.8
    x = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    full = ImageDataset("toy", x, labels, 2, 256)
    return DataSplits(full.subset(slice(0, n // 2)), full.subset(slice(n // 2, n)))


def _toy_cfg() -> cls.ClassifierConfig:
    return cls.ClassifierConfig(image_size=8, num_classes=2, width=4, features=8, steps=30, batch_size=16)


def test_classifier_metrics_reuse_frechet_and_accuracy():
    torch.manual_seed(0)
    model = cls.DomainClassifier(_toy_cfg()).eval()
    splits = _toy_splits()
    images, labels = splits.test.images, splits.test.labels
    ref_images = splits.train.images
    out = cls.classifier_metrics(model, images, labels, cls.reference_features_stats(model, ref_images), bootstrap=3)
    with torch.no_grad():  # plain reference: the same network by hand on 8-bit images
        q = lambda x: torch.round((x + 1) * 127.5) / 127.5 - 1  # noqa: E731
        f_gen = model.penultimate(model.body(q(images)))
        f_ref = model.penultimate(model.body(q(ref_images)))
        logits = model.head(f_gen)
    expected_fd = frechet_distance(*feature_stats(f_gen.double().numpy()), *feature_stats(f_ref.double().numpy()))
    assert out["fd_cls"] == pytest.approx(expected_fd, rel=1e-6)
    acc, conf = cls.label_accuracy(logits, labels)
    assert out["acc_cls"] == pytest.approx(acc) and out["conf_cls"] == pytest.approx(conf, rel=1e-6)
    assert out["fd_cls_std"] > 0
    assert "acc_cls" not in cls.classifier_metrics(model, images, None, cls.reference_features_stats(model, images))


def test_classifier_trains_deterministically_and_is_cached(tmp_path, capsys):
    splits, cfg = _toy_splits(), _toy_cfg()
    model, meta = cls.get_classifier("toy", splits, tmp_path, cfg)
    assert not meta["cached"] and meta["test_accuracy"] >= 0.9  # the toy classes are trivially separable
    again, _ = cls.train_classifier(cfg, splits)  # the same seed: the same weights
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    path = tmp_path / "classifier" / meta["key"] / "classifier.pt"
    assert path.exists() and Path(str(path) + ".sha256").exists()
    hit, hit_meta = cls.get_classifier("toy", splits, tmp_path, cfg)
    assert hit_meta["cached"] and hit_meta["test_accuracy"] == meta["test_accuracy"]
    assert torch.equal(hit.head.weight, model.head.weight)
    data = bytearray(path.read_bytes())  # a flipped byte: reported by name, rebuilt, never loaded
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    rebuilt, rebuilt_meta = cls.get_classifier("toy", splits, tmp_path, cfg)
    assert not rebuilt_meta["cached"] and "checksum mismatch" in capsys.readouterr().err
    assert torch.equal(rebuilt.head.weight, model.head.weight)
    assert cls.get_classifier("toy", splits, tmp_path, cfg)[1]["cached"]


def test_classifier_config_per_dataset():
    digits_like = _toy_splits()
    assert cls.classifier_config(digits_like).steps == 200
    assert cls.classifier_key("a", _toy_cfg()) != cls.classifier_key("b", _toy_cfg())


# ------------------------------------------------------------------------------------------------ diagnostics


def _tiny_models(denoise: str) -> tuple[TARFlow, BiFlow]:
    flow = randomize(TARFlow(TARFlowConfig(image_size=4, patch_size=2, channels=16, num_blocks=2, num_heads=2,
                                           num_classes=3, clip=None))).double().eval()
    g = randomize(BiFlow(BiFlowConfig(image_size=4, patch_size=2, width=16, num_groups=2, num_heads=2, num_classes=3,
                                      denoise=denoise)), seed=1).double().eval()
    return flow, g


@pytest.mark.parametrize("denoise", ["learned", "score"])
def test_inverse_gap_compares_with_the_right_target(denoise):
    flow, g = _tiny_models(denoise)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1])
    gaps = inverse_gaps(flow, g, x, y, sigma=0.1, seed=7)
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        fwd = flow(noisy, y)
        out = g(fwd.z, y, 0.0)
    target = x if denoise == "learned" else noisy
    assert gaps["output"] == pytest.approx(float(((out.x - target) ** 2).mean()), rel=1e-10)
    other = noisy if denoise == "learned" else x
    assert gaps["output"] != pytest.approx(float(((out.x - other) ** 2).mean()), rel=1e-6)
    # each state against x_{B-1}, x_{B-2}, ... (here B = 2: x_1, then x_0 = x~ for learned denoising), both sides
    # scaled to unit RMS per sample (rms_normalize, eps 1e-6)
    unit = lambda t: t / (t.flatten(1).pow(2).mean(1) + 1e-6).sqrt().view(-1, 1, 1, 1)  # noqa: E731
    expected = [float(((unit(s) - unit(t)) ** 2).mean()) for s, t in zip(out.states, [fwd.trajectory[1], noisy])]
    assert len(gaps["states"]) == (2 if denoise == "learned" else 1)
    assert gaps["states"] == pytest.approx(expected[: len(gaps["states"])], rel=1e-5)


def test_noise_sensitivity_golden():
    """Per-pixel std over the noises (axis 1), averaged, G's over the inverse's: written out by hand."""
    inverse = torch.tensor([[[0.0, 2.0], [2.0, 0.0]], [[1.0, 1.0], [3.0, 5.0]]])  # (K=2, M=2, 2 pixels)
    g = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    sd = lambda a, b: abs(a - b) / 2**0.5  # noqa: E731  (unbiased std of two values)
    inverse_spread = (sd(0, 2) + sd(2, 0) + sd(1, 3) + sd(1, 5)) / 4
    g_spread = (sd(0, 1) + sd(1, 0) + 0 + 0) / 4
    assert noise_sensitivity(g, inverse) == pytest.approx(g_spread / inverse_spread)
    assert noise_sensitivity(inverse, inverse) == pytest.approx(1.0)
    assert noise_sensitivity(torch.zeros_like(inverse) + 3, inverse) == 0.0


def test_noise_sensitivity_of_the_exact_inverse_is_one():
    """A 'G' that runs F's exact inverse has ratio 1; one that ignores its noise, 0."""
    flow, g = _tiny_models("score")
    g = g.float()
    flow = flow.float()

    class Inverse(torch.nn.Module):
        config = g.config

        def forward(self, z, y, w, with_states=False):
            return BackwardOutput(flow.reverse(z, y), [])

    class Constant(Inverse):
        def forward(self, z, y, w, with_states=False):
            return BackwardOutput(torch.zeros_like(z) + y.view(-1, 1, 1, 1), [])

    assert measure_noise_sensitivity(flow, Inverse(), 3, per_label=8) == pytest.approx(1.0, rel=1e-6)
    assert measure_noise_sensitivity(flow, Constant(), 3, per_label=8) == 0.0
    assert 0 < measure_noise_sensitivity(flow, g, 3, per_label=8)


def test_noise_sensitivity_takes_evenly_spaced_classes_beyond_max_labels():
    """ImageNet's 1,000 classes: 10 evenly spaced ones, 32 noises each (320 serial inverses, not 32,000)."""
    assert sensitivity_labels(3, 10).tolist() == [0, 1, 2]
    assert sensitivity_labels(10, 10).tolist() == list(range(10))
    assert sensitivity_labels(1000, 10).tolist() == list(range(0, 1000, 100))
    assert sensitivity_labels(7, 2).tolist() == [0, 3]
    assert sensitivity_labels(0, 10) is None
    flow, g = (m.float() for m in _tiny_models("score"))
    seen = []

    class Recording(torch.nn.Module):
        config = g.config

        def forward(self, z, y, w, with_states=False):
            seen.append(y)
            return BackwardOutput(flow.reverse(z, y), [])

    measure_noise_sensitivity(flow, Recording(), 3, per_label=2, max_labels=2)
    assert seen[0].tolist() == [0, 0, 1, 1]


# ------------------------------------------------------------------------------------------ calibration and report

QUICK = {"stage1.steps": 30, "stage1.batch_size": 32, "stage2.steps": 12, "stage2.batch_size": 32,
         "sample.num_samples": 40, "eval.num_real": 40, "eval.nll_samples": 40, "eval.resize": 32}


def test_calibration_rows_written_once_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    cfg = get_spec("denoise").resolve("learned", "tiny", QUICK)
    where = (tmp_path / "results", None, tmp_path / "cache")  # results, data and cache directories
    key = evaluation.ensure_calibration(cfg, *where)
    path = tmp_path / "results" / "tiny" / CALIBRATION
    entry = json.loads(path.read_text())["entries"][key]
    rows = {r["name"]: r["metrics"] for r in entry["rows"]}
    assert list(rows) == ["real", "real+noise", "real+blur"] and entry["num_images"] == 40
    for m in rows.values():
        assert {"fd_effnet", "precision_effnet", "recall_effnet", "acc_cls", "conf_cls", "fd_cls",
                "noise_residual", "cls_test_acc"} <= set(m)
    # real data is the floor: blurring moves it away in the classifier's features and removes high frequencies
    assert rows["real+blur"]["fd_cls"] > rows["real"]["fd_cls"]
    assert rows["real+blur"]["noise_residual"] < rows["real"]["noise_residual"]
    calls = []
    monkeypatch.setattr(evaluation, "calibration_rows", lambda *a, **k: calls.append(1) or [])
    assert evaluation.ensure_calibration(cfg, *where) == key and not calls  # recorded: not computed again
    path.write_text("{not json")
    assert evaluation.ensure_calibration(cfg, *where) == key and calls == [1]
    assert json.loads(path.read_text())["entries"][key]["rows"] == []


def _record(variant: str, value: float, acc: float, calibration: str | None) -> dict:
    return {"schema": 1, "kind": "ablation", "ablation": "denoise", "variant": variant, "label": variant,
            "scale": "tiny", "seed": 0, "spec_version": 1, "config": {"inverse": "learned"}, "config_hash": variant,
            "metric": "fd_effnet", "metrics": {"fd_effnet": value, "fd_effnet_std": 0.5, "acc_cls": acc,
                                               "fd_cls": 2 * value, "fd_cls_std": 0.25},
            "nfe": 1, "nfe_label": "1", "params": {}, "timing": {"ms_per_image": 1.0},
            "paper": {"fid": None, "table": "T"}, "notes": [], "samples_png": None, "calibration": calibration}


def test_report_puts_calibration_rows_on_top_with_metric_columns(tmp_path):
    from biflow_bench.results import RESULT_SCHEMA

    rdir = tmp_path / "results"
    for variant, value, acc in (("learned", 10.0, 0.9), ("none", 20.0, 0.5)):
        write_record(rdir, {**_record(variant, value, acc, "k1"), "schema": RESULT_SCHEMA})
    rows = [{"name": "real", "label": "real data: the floor", "metrics": {"fd_effnet": 1.5, "fd_effnet_std": 0.1,
                                                                         "acc_cls": 0.97, "fd_cls": 0.75}},
            {"name": "real+blur", "label": "real data: blurred", "metrics": {"fd_effnet": 7.0, "acc_cls": 0.6}}]
    entry = {"key": "k1", "num_images": 40, "noise_sigma": 0.1, "classifier": {"test_accuracy": 0.93}, "rows": rows}
    other = {**entry, "key": "k0", "rows": [{"name": "real", "label": "another config", "metrics": {}}]}
    (rdir / "tiny" / "calibration.json").write_text(json.dumps({"schema": 1, "entries": {"k0": other, "k1": entry}}))
    render_report(rdir, tmp_path / "out", registry={})
    md = (tmp_path / "out" / "tiny" / "denoise.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert "acc_cls ↑" in lines[0] and "fd_cls ↓" in lines[0]
    del lines[1]  # the alignment row
    # the judged domain metrics beside ours, then dashes for the columns real data has none of
    assert lines[1] == "| *real data: the floor* | 1.5 ± 0.1 | 0.97 | 0.75 | — | — | — |"
    assert lines[2].startswith("| *real data: blurred* | 7.00 | 0.60 | — |")
    assert lines[3].startswith("| learned | 10.0 ± 0.5 | 0.90 | 20.0 ± 0.2 | 1 |")
    assert "another config" not in md and "93.0% test accuracy" in md
    csv = (tmp_path / "out" / "tiny" / "denoise.csv").read_text().splitlines()
    assert csv[0].endswith(",acc_cls,fd_cls") and csv[1].split(",")[2] == "calibration:real"


def test_headline_shows_acc_cls_beside_the_primary_metric(tmp_path):
    from biflow_bench.results import RESULT_SCHEMA

    rdir = tmp_path / "results"
    for variant, value, acc, inverse in (("itarflow", 10.0, 0.9, "exact"), ("biflow", 20.0, 0.5, "learned")):
        rec = _record(variant, value, acc, None)
        write_record(rdir, {**rec, "schema": RESULT_SCHEMA, "ablation": "main", "config": {"inverse": inverse},
                            "metrics": {**rec["metrics"], "acc_cls_std": 0.01}})
    render_report(rdir, tmp_path / "out", registry={})
    readme = (tmp_path / "out" / "README.md").read_text()
    header = next(ln for ln in readme.splitlines() if ln.startswith("| Variant |"))
    assert "| Ours (fd_effnet, ↓) | acc_cls ↑ | Seeds |" in header
    assert "| itarflow | 10.0 ± 0.5 | 0.90 ± 0.01 | 1 |" in readme


def test_a_variant_name_shared_by_two_tables_keeps_each_tables_default(tmp_path):
    """`none` is a variant of several tables, each with its own default config: neither is an 'other config'."""
    from biflow_bench.results import RESULT_SCHEMA

    rdir = tmp_path / "results"
    for ablation, config_hash in (("denoise", "aaa"), ("norm-control", "bbb")):
        write_record(rdir, {**_record("none", 10.0, 0.5, None), "schema": RESULT_SCHEMA, "ablation": ablation,
                            "config": {"inverse": "learned", "table": ablation}, "config_hash": config_hash})
    summary = render_report(rdir, tmp_path / "out", registry={})
    assert summary.separated == []
    for ablation in ("denoise", "norm-control"):
        assert "Other configurations" not in (tmp_path / "out" / "tiny" / f"{ablation}.md").read_text()
