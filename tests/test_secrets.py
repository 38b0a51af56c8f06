"""No secret in any output: tracker keys and tokens in the environment never reach run_info.json,
config.yaml, metrics.jsonl, the logs, the tracker's files, checkpoints or the export. A short real run
with a checkpoint, the tensorboard tracker and an export, then every byte it wrote is searched."""

from __future__ import annotations

from conftest import TINY, assert_ok, run_train

SECRETS = {
    "WANDB_API_KEY": "wandb-fake-3f9a1c77e2",
    "HF_TOKEN": "hf_fakeTOKENq8w7e6r5t4",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-fake-pass-5521",
    "MY_SERVICE_SECRET": "svc-fake-secret-0042",
    "STORAGE_ACCESS_KEY": "storage-fake-key-9911",
    "GITLAB_DEPLOY_TOKEN": "glpat-fake-7a7a7a",
}


def test_no_secret_reaches_any_file_or_log(tmp_path):
    out = tmp_path / "run"
    proc = run_train(
        [
            *TINY,
            "--output_dir",
            str(out),
            "--log.report_to",
            "tensorboard",
            "--train.max_steps",
            "4",
            "--checkpoint.save_steps",
            "2",
            "--eval.steps",
            "2",
        ],
        **SECRETS,
    )
    assert_ok(proc)
    written = [p for p in out.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in written}
    assert {".json", ".yaml", ".jsonl", ".safetensors"} <= kinds  # run files, checkpoint and export all there
    assert any("tfevents" in p.name for p in written)  # the tracker wrote its files
    assert any("/checkpoints/" in str(p) for p in written) and any("/final/" in str(p) for p in written)
    for name, value in SECRETS.items():
        needle = value.encode()
        leaks = [str(p) for p in written if needle in p.read_bytes()]
        assert not leaks, f"{name} leaked into {leaks}"
        assert value not in proc.stdout and value not in proc.stderr, name
    info = (out / "run_info.json").read_text()
    assert "WANDB_API_KEY" not in info or "***" in info  # the name may be listed, never the value
