"""The training loop: stage 1 lowers bits/dim; interrupted runs resume bit-exactly; non-finite losses are skipped,
counted, and stop the run when they persist."""

from __future__ import annotations

import dataclasses
import math
import os
import signal

import pytest
import torch

from biflow_bench.config import TrainingConfig, scale_config
from biflow_bench.data import load_digits
from biflow_bench.identity import backward_key, flow_key
from biflow_bench.metrics.likelihood import bits_per_dim
from biflow_bench.models import TARFlow
from biflow_bench.training.losses import nll_loss
from biflow_bench.training.loop import TrainingDiverged, TrainingInterrupted, fit
from biflow_bench.training.stages import train_flow


def _tiny(steps: int, **stage1):
    cfg = scale_config("tiny")
    return dataclasses.replace(cfg, stage1=dataclasses.replace(cfg.stage1, steps=steps, warmup=5, **stage1))


def test_stage1_lowers_bits_per_dim():
    data = load_digits()
    cfg = _tiny(60, batch_size=64)
    torch.manual_seed(0)
    before = bits_per_dim(TARFlow(cfg.flow), data.test.images, data.test.labels, data.test.levels)
    flow, result = train_flow(cfg, data.train, progress=False)
    after = bits_per_dim(flow, data.test.images, data.test.labels, data.test.levels)
    assert math.isfinite(after) and after < before - 0.3, (before, after)
    assert result.steps == 60 and result.skipped_steps == 0


def _fit(model, loss_fn, checkpoint, steps=12, max_bad_steps=20, **kw):
    train = TrainingConfig(steps=steps, batch_size=16, lr=1e-3, warmup=2, weight_decay=0.0, checkpoint_every=4,
                           max_bad_steps=max_bad_steps)
    return fit(model, loss_fn, load_digits().train, train, seed=0, checkpoint=checkpoint, progress=False, **kw)


def _flow_loss(model, x, y, gen):
    loss = nll_loss(model, x + 0.1 * torch.randn(x.shape, generator=gen), y)
    return loss, {"nll": float(loss.detach())}


def test_interrupt_saves_checkpoint_and_resume_is_bit_exact(tmp_path):
    cfg = _tiny(12)
    torch.manual_seed(1)
    straight = TARFlow(cfg.flow)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    _fit(straight, _flow_loss, tmp_path / "a.pt", ema_decay=0.9)

    def interrupting(model, x, y, gen):  # SIGINT arrives during step 6; the loop stops at the next boundary
        if interrupting.calls == 6:
            os.kill(os.getpid(), signal.SIGINT)
        interrupting.calls += 1
        return _flow_loss(model, x, y, gen)

    interrupting.calls = 0
    resumed = TARFlow(cfg.flow)
    resumed.load_state_dict(init)
    with pytest.raises(TrainingInterrupted, match="re-run the same command to resume"):
        _fit(resumed, interrupting, tmp_path / "b.pt", ema_decay=0.9)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 7
    fresh = TARFlow(cfg.flow)  # a new process: weights come from the checkpoint only
    result = _fit(fresh, _flow_loss, tmp_path / "b.pt", ema_decay=0.9)
    assert result.resumed_from == 7
    for k, v in straight.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    model = TARFlow(_tiny(12).flow)

    def sometimes_nan(m, x, y, gen):
        loss, terms = _flow_loss(m, x, y, gen)
        sometimes_nan.calls += 1
        return (loss * float("nan"), terms) if sometimes_nan.calls in (3, 4) else (loss, terms)

    sometimes_nan.calls = 0
    result = _fit(model, sometimes_nan, None)
    assert result.skipped_steps == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_nan_stops_with_step_terms_and_checkpoint(tmp_path):
    model = TARFlow(_tiny(30).flow)

    def nan_after_five(m, x, y, gen):
        loss, terms = _flow_loss(m, x, y, gen)
        nan_after_five.calls += 1
        if nan_after_five.calls > 5:
            return loss * float("nan"), {"nll": float("nan")}
        return loss, terms

    nan_after_five.calls = 0
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses in a row at step 7 \(nll=nan\).*a.pt"):
        _fit(model, nan_after_five, tmp_path / "a.pt", steps=30, max_bad_steps=3)


def test_learning_rate_schedule_golden_values():
    """Linear warm-up to the peak over `warmup` steps, then a half cosine to zero at the last step."""
    from biflow_bench.training.loop import lr_at

    assert lr_at(0, 100, 1e-3, 10) == pytest.approx(1e-4)  # (step + 1) / warmup
    assert lr_at(9, 100, 1e-3, 10) == pytest.approx(1e-3)
    assert lr_at(10, 100, 1e-3, 10) == pytest.approx(1e-3)  # cosine progress 0
    assert lr_at(55, 100, 1e-3, 10) == pytest.approx(0.5e-3)  # progress 1/2: cos(pi/2) = 0
    assert lr_at(40, 100, 1e-3, 10) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert lr_at(100, 100, 1e-3, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(150, 100, 1e-3, 10) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    # "constant": the same warm-up, then the peak to the end
    assert lr_at(0, 100, 1e-3, 10, "constant") == pytest.approx(1e-4)
    assert [lr_at(s, 100, 1e-3, 10, "constant") for s in (10, 55, 99)] == [1e-3, 1e-3, 1e-3]


def test_a_constant_schedule_is_part_of_the_keys_and_the_default_is_not():
    """Runs keyed before `schedule` existed keep their keys (cosine left out); a constant schedule is another G."""
    from biflow_bench.config import SCALES, apply_delta
    from biflow_bench.identity import config_id

    cfg = apply_delta(SCALES["small"], {"stage2.schedule": "cosine"})
    constant = apply_delta(cfg, {"stage2.schedule": "constant"})
    assert backward_key(constant, 0) != backward_key(cfg, 0)  # the default's keys: pinned in tests/test_identity.py
    assert flow_key(constant) == flow_key(cfg)
    assert config_id(constant.to_dict()) != config_id(cfg.to_dict())
    with pytest.raises(ValueError, match="stage2.schedule='linear' is not one of cosine, constant"):
        apply_delta(cfg, {"stage2.schedule": "linear"})


def test_ema_update_golden_values():
    from biflow_bench.training.loop import ema_update

    ema, p = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    ema_update(ema, p, decay=0.99, step=0)  # warm-up decay min(0.99, 1/10) = 0.1
    torch.testing.assert_close(ema[0], torch.tensor([0.1 * 1 + 0.9 * 3, 0.1 * 2 + 0.9 * -2]))
    ema = [torch.tensor([1.0])]
    ema_update(ema, [torch.tensor([0.0])], decay=0.9, step=1000)  # min(0.9, 1001/1010) = 0.9
    torch.testing.assert_close(ema[0], torch.tensor([0.9]))


def test_progress_without_a_terminal_is_a_line_per_stage_and_periodic_lines(tmp_path, monkeypatch, capsys):
    """In a log (stderr not a TTY) a run says when a stage starts, how far it is with the time left, and when it
    ends; a terminal gets the bar instead."""
    import biflow_bench.training.loop as train

    monkeypatch.setattr(train, "PROGRESS_EVERY_S", 0.0)
    cfg = _tiny(4)
    fit(TARFlow(cfg.flow), _flow_loss, load_digits().train,
        TrainingConfig(steps=4, batch_size=16, lr=1e-3, warmup=2, weight_decay=0.0), seed=0, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "train: step 0/4"
    assert [line.split(" (")[0] for line in lines[1:-1]] == [f"train: step {k}/4" for k in range(1, 5)]
    assert all("steps/s, about" in line and "min left" in line for line in lines[1:-1])
    assert lines[-1].startswith("train: done, 4 steps in ")


def test_snapshots_hand_over_the_ema_weights_every_n_steps_and_at_the_end():
    """fit's Snapshot: called at steps 4, 8 and 10 (the end) with the weights the run would end with (the EMA's);
    the last equals the trained model's final weights."""
    from biflow_bench.training.loop import Snapshot

    model = TARFlow(_tiny(10).flow)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    _fit(model, _flow_loss, None, steps=10, ema_decay=0.9, snapshot=Snapshot(4, lambda s, w: seen.__setitem__(s, w)))
    assert sorted(seen) == [4, 8, 10]
    final = model.state_dict()  # fit copies the EMA into the model at the end
    assert seen[10].keys() == final.keys() and all(torch.equal(seen[10][k], final[k]) for k in final)
    assert any(not torch.equal(seen[4][k], final[k]) for k in final)  # an earlier point is another model
