"""The coarse-to-fine schedule and the generation plan against the official tables."""
from __future__ import annotations

import json

import numpy as np
import pytest

from detailflow_engine.config import TokenizerConfig, read_config_files
from detailflow_engine.schedule import Schedule, generation_plan, token_res


def _tiny_schedule(tiny_a) -> Schedule:
    return Schedule.from_config(TokenizerConfig.from_dicts(*read_config_files(tiny_a / "tokenizer")))


def test_tiny_a_schedule_matches_golden(tiny_a, golden):
    s = _tiny_schedule(tiny_a)
    ts = s.scheduled_tokens
    assert ts == golden["sched_t"].tolist()
    assert [s.res(t) for t in ts] == golden["sched_res"].tolist()
    assert [s.decode_size(t) for t in ts] == golden["sched_dec_res"].tolist()
    assert [s.decode_size(t) for t in ts] == golden["sched_dec_out_res"].tolist()
    assert [s.encode_size(t) for t in ts] == golden["sched_enc_res"].tolist()
    every_t = range(1, s.num_tokens + 1)
    assert [s.res(t) for t in every_t] == golden["sched_all_t_res"].tolist()
    assert [s.decode_size(t) for t in every_t] == golden["sched_all_t_dec_res"].tolist()
    best = golden["sched_decres2besttoken"]
    assert s.best_resolutions == best[:, 0].tolist()
    assert [s.best_tokens(int(r)) for r in best[:, 0]] == best[:, 1].tolist()


def test_detailflow16_schedule_json(meta16):
    d = json.loads((meta16 / "schedule.json").read_text())
    s = Schedule(d["S"], d["T"], d["group_size"], d["causal_num"], d["p"], d["P_enc"], d["P_dec"])
    assert s == Schedule.from_config(TokenizerConfig.from_dicts(*read_config_files(meta16 / "tokenizer")))
    assert s.scheduled_tokens == d["token_list"]
    for key, fn in (("token2res", s.res), ("token2dec_res", s.decode_size),
                    ("token2dec_out_res", s.decode_size), ("token2enc_res", s.encode_size)):
        assert {int(k): v for k, v in d[key].items()} == {t: fn(t) for t in s.scheduled_tokens}, key
    assert {int(k): v for k, v in d["all_t"].items()} == {
        t: {"res": s.res(t), "dec_res": s.decode_size(t)} for t in range(1, s.num_tokens + 1)}
    assert s.best_resolutions == d["best_res"]
    assert {r: s.best_tokens(r) for r in s.best_resolutions} == {int(k): v for k, v in d["decres2besttoken"].items()}


def test_detailflow16_design_facts():
    s = Schedule(256, 128, 8, 8)
    facts = {8: 32, 16: 48, 32: 96, 48: 128, 64: 176, 96: 224, 112: 256, 128: 256}
    assert {t: s.decode_size(t) for t in facts} == facts
    assert s.res(1) == 1 and s.res(128) == 256
    # best token count is the closest res, ties to the larger t -- not the smallest t of a size
    assert s.best_tokens(16) == 6 and s.best_tokens(224) == 96 and s.best_tokens(256) == 128
    with pytest.raises(ValueError):
        s.best_tokens(64)  # no scheduled t decodes at 64 px for DetailFlow-16


def test_token_res_edges():
    assert token_res(256, 1, 1) == 256
    with pytest.raises(ValueError):
        token_res(256, 128, 0)
    with pytest.raises(ValueError):
        Schedule(256, 128, 8, 12)  # causal_num not a multiple of group_size


def spans(plan) -> list:
    """A plan's steps as (start, stop) token ranges."""
    return [(step.start, step.stop) for step in plan]


def test_generation_plan_tiny_a(tiny_a):
    readme = json.loads((tiny_a / "README.json").read_text())
    want = [tuple(step["new_tokens"]) for step in readme["generation_steps"]]
    assert spans(generation_plan(16, 4, 4)) == want
    assert spans(_tiny_schedule(tiny_a).generation_plan()) == want


def test_generation_plan_json(meta16):
    plans = json.loads((meta16 / "generation_plan.json").read_text())
    for name, p in plans.items():
        plan = spans(generation_plan(p["T"], p["group"], p["causal_num"]))
        assert len(plan) == p["forwards"], name
        assert [end for _, end in plan] == p["seq_len_per_forward"], name
        assert [end - start for start, end in plan] == p["kvcache_new_positions_per_forward"], name
        assert sum(end for _, end in plan) == p["positions_nocache"], name
    assert len(generation_plan(128, 8, 8)) == 23
    assert np.all(np.diff([s for s, _ in spans(generation_plan(128, 8, 8))]) > 0)
