"""The benchmark (bench/run.py) in its quick mode: every case runs, from one command. No speed is judged
here (speed goals are measured by `make bench` and written in the README); what is checked are the
things that must hold at any speed: the cases compare like with like, packing removes the padding, the
8-bit optimizers keep 8-bit state, the profiles hold what the ZeRO formula says, the chunked loss lowers
the peak."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, env_for_subprocess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env_for_subprocess(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Throughput" in proc.stdout  # the table is printed
    return json.loads(out.read_text())


def _section(results: dict, kind: str) -> dict:
    return next(s for s in results["sections"] if s["kind"] == kind)


def _summary(section: dict, case: str) -> dict:
    assert section["cases"][case]["status"] == "ok", section["cases"][case]
    return section["cases"][case]["summary"]


def test_every_case_ran(quick):
    assert quick["failed"] == []
    assert {s["kind"] for s in quick["sections"]} == {
        "section_overhead",
        "section_throughput",
        "section_optim_state",
        "section_profiles",
        "section_loss_memory",
        "section_startup",
        "section_data_prepare",
        "section_data_startup",
        "section_data_large",
        "section_checkpoint",
    }
    for section in quick["sections"]:
        assert all(case["status"] == "ok" for case in section["cases"].values()), section["title"]


def test_throughput_cases_train_the_same_tokens_and_packing_removes_padding(quick):
    section = _section(quick, "section_throughput")
    cases = ["dtrain_dynamic", "trainer_dynamic", "trainer_flatten", "loop_pad_max"]
    per_step = {c: _summary(section, c)["tokens_per_step"] for c in cases}
    assert len(set(per_step.values())) == 1, per_step  # the very same batches
    packed = _summary(section, "dtrain_packing")
    assert packed["tokens_per_step"] == pytest.approx(per_step["trainer_dynamic"], rel=0.1)
    assert packed["padding_fraction"] < 0.1 < _summary(section, "dtrain_dynamic")["padding_fraction"]
    assert _summary(section, "trainer_flatten")["padding_fraction"] == 0.0
    assert all(_summary(section, c)["tokens_per_sec"] > 0 for c in [*cases, "dtrain_packing"])
    assert {g["goal"] for g in section["goals"]} >= {"dtrain packing / Trainer + DataCollatorForSeq2Seq"}
    gpt2 = {c: _summary(section, c)["tokens_per_step"] for c in ("gpt2_dtrain", "gpt2_trainer")}
    assert len(set(gpt2.values())) == 1, gpt2  # GPT-2 (text template, no pad token): the same rows too


def test_optimizer_state_bytes_and_profile_memory(quick):
    state = _section(quick, "section_optim_state")["cases"]
    bytes_per_param = {
        name: case["repeats"][0]["optim_state_bytes_per_param"] for name, case in state.items()
    }
    assert bytes_per_param["adamw"] == pytest.approx(8.0, rel=0.01)
    assert 1.9 < bytes_per_param["adamw_8bit"] < 2.5 and 1.9 < bytes_per_param["adamw_8bit_ao"] < 2.5
    goals = _section(quick, "section_profiles")["goals"]  # zero3 in quick mode (all five: tests/test_plan.py)
    assert goals
    for goal in goals:
        assert goal["value"] == pytest.approx(1.0, abs=0.1), goal


def test_the_chunked_loss_lowers_the_peak(quick):
    section = _section(quick, "section_loss_memory")
    plain, chunked = _summary(section, "full_logits"), _summary(section, "chunked")
    assert chunked["peak_rss_mib"] < 0.6 * plain["peak_rss_mib"]
    assert chunked["tokens_per_step"] == plain["tokens_per_step"]


def test_prepare_reads_every_token_the_baseline_reads_and_trains_on_two_ranks(quick):
    cases = _section(quick, "section_data_prepare")["cases"]
    assert all(c["status"] == "ok" for c in cases.values())
    prep, base = cases["dtrain_np2"]["repeats"][0], cases["runclm_np2"]["repeats"][0]
    assert prep["documents"] == base["documents"]
    # nothing truncated: each piece of a document adds one token (its EOS, or the overlap with the next)
    assert prep["examples"] == base["dtrain_pieces"]
    assert prep["tokens"] == base["text_tokens"] + base["dtrain_pieces"]
    assert cases["dtrain_np1"]["repeats"][0]["tokens"] == prep["tokens"]  # the same with one worker
    assert prep["fill"] > 0.9 and base["block_tokens"] <= base["text_tokens"]
    startup = _section(quick, "section_data_startup")
    for case in startup["cases"].values():
        r = case["repeats"][0]
        for per_rank in (r["rank_peak_rss_mib"], r["rank_first_step_rss_mib"]):
            assert len(per_rank) == 2 and min(per_rank.values()) > 0
        assert 0 < r["startup_s"] < r["wall_s"]
    small, big = startup["cases"]["train_1x"]["repeats"][0], startup["cases"]["train_10x"]["repeats"][0]
    assert big["documents"] == 10 * small["documents"]
    assert [g["met"] for g in startup["goals"]] == [None, None]  # quick mode judges nothing


def test_checkpoint_section_times_what_a_save_blocks(quick):
    """Synchronous: the loop is held for the whole save; async: only while the snapshot is staged, and the
    commit comes later; a stop request with a background save in flight commits both and exits 75. A background save's times reach the first metrics row after its commit, so the last
    periodic one may land after the last row. (Times are reported, not judged, in quick mode.)"""
    section = _section(quick, "section_checkpoint")
    assert all(section["cases"][c]["status"] == "ok" for c in ("sync", "async", "stop")), section["cases"]
    sync, background, stop = (section["cases"][c]["repeats"][0] for c in ("sync", "async", "stop"))
    assert sync["saves"] >= background["saves"] >= 1
    assert sync["blocked_s"] == pytest.approx(sync["committed_s"], abs=0.01)
    assert background["blocked_s"] < background["committed_s"]
    # SIGTERM with a save in flight: exit 75 with that save and the stop's own committed (checked by the
    # section, which fails the case otherwise), timed from the signal
    assert stop["saves"] >= 2 and 0 < stop["stop_s"] < 120
