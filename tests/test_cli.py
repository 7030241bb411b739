"""The real `mosaic` CLI end to end on the tiny recipe: train -> info -> generate, and its failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mosaic(
    *args: str, cache: Path, check: bool = True, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOSAIC_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "mosaic_safety.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        input=stdin,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"mosaic {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    art = root / "art"
    proc = mosaic("train", "--config", "configs/tiny-test.yaml", "--output", str(art), cache=root / "cache")
    return root, art, proc


def test_train_writes_artifact_log_and_table(trained):
    root, art, proc = trained
    assert (art / "mosaic.json").exists() and (art / "tokens.safetensors").exists()
    assert (art / "checkpoints" / "epoch-2" / "optimizer.safetensors").exists()
    assert "Refusal rate on held-out test prompts" in proc.stdout
    assert "order 2: 3 subsets" in proc.stderr  # the budget used per order is logged
    logs = [json.loads(line) for line in (art / "train_log.jsonl").read_text().splitlines()]
    assert logs and {"step", "loss", "kl", "ce_pos"} <= set(logs[-1])
    table = json.loads((art / "eval_table.json").read_text())
    assert set(table["rates"]) == {"", "alcohol", "betting", "horror"}


def test_info(trained):
    root, art, _ = trained
    proc = mosaic("info", str(art), cache=root / "cache")
    assert (
        "tiny-random-llama" in proc.stdout
        and "alcohol" in proc.stdout
        and "trainable parameters: 192" in proc.stdout
    )


def test_generate_prompt_and_file(trained, tmp_path):
    root, art, _ = trained
    one = mosaic(
        "generate",
        "--artifact",
        str(art),
        "--policy",
        "alcohol,horror",
        "--prompt",
        "hi there",
        "--max-new-tokens",
        "4",
        cache=root / "cache",
    )
    assert one.returncode == 0
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "bake bread"}\n\n{"prompt": "tell a story"}\n')
    many = mosaic(
        "generate",
        "-a",
        str(art),
        "-p",
        "betting",
        "-f",
        str(prompts),
        "--max-new-tokens",
        "3",
        cache=root / "cache",
    )
    rows = [json.loads(line) for line in many.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["bake bread", "tell a story"] and rows[0]["policy"] == "betting"


def test_generate_file_in_windows_keeps_input_order_and_responses(trained, tmp_path):
    """A long file is decoded window by window (8 batches each) and written as it goes; the rows
    come out in input order and say what a single pass over the whole file says."""
    root, art, _ = trained
    asks = [f"question {i}: " + "why " * (i % 5) for i in range(11)]
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": a}) + "\n" for a in asks))

    def run(batch_size: str) -> list[dict]:
        proc = mosaic(
            "generate", "-a", str(art), "-p", "horror", "-f", str(prompts), "--max-new-tokens", "5",
            "--batch-size", batch_size, cache=root / "cache",
        )  # fmt: skip
        return [json.loads(line) for line in proc.stdout.splitlines()]

    windowed, whole = run("1"), run("16")  # windows of 8 rows (two of them) vs one window
    assert [r["prompt"] for r in windowed] == asks
    assert windowed == whole


@pytest.mark.filterwarnings("error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning")
def test_a_reader_that_stops_early_ends_generate_quietly(trained, tmp_path):
    """`mosaic generate --file f | head -1`: the closed pipe ends the command without an error line.
    The test closes its own ends of the pipes too (an unclosed one is a ResourceWarning)."""
    root, art, _ = trained
    prompts = tmp_path / "long.jsonl"  # more output than a pipe buffers, so writing must hit the closed end
    prompts.write_text("".join(json.dumps({"prompt": f"{i} " + "why " * 60}) + "\n" for i in range(400)))
    env = {**os.environ, "MOSAIC_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = ["generate", "-a", str(art), "-f", str(prompts), "--max-new-tokens", "1", "--batch-size", "64"]
    with subprocess.Popen(
        [sys.executable, "-m", "mosaic_safety.cli", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    ) as proc:
        assert json.loads(proc.stdout.readline())["prompt"].startswith("0 why")
        proc.stdout.close()  # what `head -1` does once it has its line
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=600) == 141, err
    assert "error" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_resume_flag(trained):
    root, art, _ = trained
    proc = mosaic("train", "-c", "configs/tiny-test.yaml", "-o", str(art), "--resume", cache=root / "cache")
    assert "resumed from epoch-2" in proc.stderr


def test_select_per_category_on_a_finished_run(trained, tmp_path):
    """Resuming a finished run with selection scores its epochs and ships each category's best."""
    import shutil

    root, art, _ = trained
    run = tmp_path / "run"
    shutil.copytree(art, run)
    cmd = ("train", "-c", "configs/tiny-test.yaml", "-o", str(run), "--resume", "select.per_group=2")
    proc = mosaic(*cmd, "select.mode=per_category", cache=root / "cache")
    assert "epoch 1 validation" in proc.stderr and "epoch 2 validation" in proc.stderr
    assert "from their best validated epoch: alcohol epoch" in proc.stderr
    assert "Refusal rate on held-out test prompts" in proc.stdout
    manifest = json.loads((run / "mosaic.json").read_text())
    assert set(manifest["training"]["selected_epochs"]) == {"alcohol", "betting", "horror"}
    assert {"validation", "refusal_table"} <= set(manifest["metrics"])
    info = mosaic("info", str(run), cache=root / "cache").stdout
    assert "tokens from their best validated epoch: alcohol " in info
    err = _error(mosaic(*cmd, "select.mode=best", cache=root / "cache", check=False))
    assert "select.mode 'best': choose last | per_category" in err


def test_fresh_train_into_an_earlier_run_is_refused(trained):
    root, art, _ = trained
    before = (art / "tokens.safetensors").read_bytes()

    def train_error(*flags: str) -> str:
        cmd = ("train", "-c", "configs/tiny-test.yaml", "-o", str(art), *flags)
        return _error(mosaic(*cmd, cache=root / "cache", check=False))

    err = train_error()
    assert "already holds a training run" in err and "--overwrite" in err
    assert "pick one" in train_error("--resume", "--overwrite")
    # another method's artifact would replace mosaic.json: refused the same way
    assert "already holds a training run" in train_error("--method", "lora_sft")
    assert "this is a 'mosaic' artifact, not 'dsa'" in train_error("--method", "dsa", "--resume")
    assert (art / "tokens.safetensors").read_bytes() == before  # nothing lost


def test_overwrite_keeps_the_earlier_run_until_the_new_one_is_under_way(trained, tmp_path):
    root, art, _ = trained
    out = tmp_path / "run"
    shutil.copytree(art, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def train(*flags: str, check: bool = False) -> subprocess.CompletedProcess:
        cmd = ("train", "-c", "configs/tiny-test.yaml", "-o", str(out), "--overwrite", *flags)
        return mosaic(*cmd, cache=root / "cache", check=check)

    def files() -> dict:
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # a start that fails after the earlier run was moved aside: it comes back, byte for byte
    assert "not found" in _error(train("model.name=/no/such/model"))
    assert files() == before
    # the earlier run as the base of an incremental run: replacing it would delete what it starts from
    err = _error(train(f"init_artifact={out}", "data.categories=[sex]"))
    assert "belongs to the run that --overwrite would replace" in err and files() == before
    (tmp_path / "link").symlink_to(out, target_is_directory=True)  # the same run by another name
    err = _error(train(f"init_artifact={tmp_path / 'link'}", "data.categories=[sex]"))
    assert "belongs to the run that --overwrite would replace" in err and files() == before
    # a run that goes through replaces it, with nothing of the old run or the move left behind
    train("optim.epochs=1", "eval.max_new_tokens=0", check=True)
    after = files()
    assert after != before and not [p for p in out.iterdir() if p.name.startswith(".replaced-run")]
    assert json.loads((out / "mosaic.json").read_text())["training"]["config"]["optim"]["epochs"] == 1
    assert not (out / "checkpoints" / "epoch-2").exists()  # the earlier run's second epoch is gone


def _error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_unknown_category(trained):
    root, art, _ = trained
    err = _error(
        mosaic(
            "generate",
            "-a",
            str(art),
            "-p",
            "alcohol,gambling",
            "--prompt",
            "x",
            cache=root / "cache",
            check=False,
        )
    )
    assert "unknown category 'gambling'" in err and "valid categories" in err


def test_corrupt_artifact(trained, tmp_path):
    root, art, _ = trained
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    (bad / "tokens.safetensors").write_bytes(b"junk")
    err = _error(mosaic("generate", "-a", str(bad), "--prompt", "x", cache=root / "cache", check=False))
    assert "tokens.safetensors is not the file mosaic.json was written with" in err
    err = _error(mosaic("info", str(bad), cache=root / "cache", check=False))
    assert "tokens.safetensors is not the file mosaic.json was written with" in err
    manifest = json.loads((bad / "mosaic.json").read_text())
    del manifest["tokens_sha256"]  # an artifact from before the hash: the reader's own error
    (bad / "mosaic.json").write_text(json.dumps(manifest))
    err = _error(mosaic("info", str(bad), cache=root / "cache", check=False))
    assert "not a readable safetensors file" in err
    assert (art / "tokens.safetensors").stat().st_size > 100  # the original is untouched


def test_artifact_from_another_backbone(trained, tmp_path):
    root, art, _ = trained
    from mosaic_safety.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    other = tmp_path / "other-model"
    build_model(tok, seed=7).save_pretrained(other)
    tok.save_pretrained(other)
    err = _error(
        mosaic(
            "generate",
            "-a",
            str(art),
            "--model",
            str(other),
            "--prompt",
            "x",
            cache=root / "cache",
            check=False,
        )
    )
    assert "fingerprint" in err and "trained on backbone tiny-random-llama" in err


def test_bad_config_and_missing_files(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optim:\n  lr: fast\n")
    assert "expected a number" in _error(mosaic("train", "-c", str(cfg), cache=tmp_path, check=False))
    assert "not found" in _error(
        mosaic("train", "-c", str(tmp_path / "nope.yaml"), cache=tmp_path, check=False)
    )
    err = _error(
        mosaic(
            "train",
            "-c",
            "configs/tiny-test.yaml",
            "data.categories=alcohol,wine",
            cache=tmp_path,
            check=False,
        )
    )
    assert "unknown category 'wine'" in err
    err = _error(
        mosaic("train", "-c", "configs/tiny-test.yaml", "data.refusal=No.", cache=tmp_path, check=False)
    )
    assert "data.refusal must contain {display}" in err
    assert "artifact directory not found" in _error(
        mosaic("info", str(tmp_path / "missing"), cache=tmp_path, check=False)
    )


def test_empty_inputs(trained, tmp_path):
    root, art, _ = trained
    proc = mosaic("generate", "-a", str(art), "--prompt", "   ", cache=root / "cache", check=False)
    assert proc.returncode == 2 and "--prompt is empty" in proc.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = mosaic("generate", "-a", str(art), "-f", str(empty), cache=root / "cache", check=False)
    assert proc.returncode == 2 and "no prompts" in proc.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    proc = mosaic(
        "generate", "-a", str(art), "-f", str(prompts), "--stream", cache=root / "cache", check=False
    )
    assert proc.returncode == 2 and "--stream is for one --prompt" in proc.stderr, proc.stderr


def test_bad_generation_inputs_are_one_line_errors(trained, tmp_path):
    root, art, _ = trained

    def generate_error(*args: str) -> str:
        proc = mosaic("generate", *args, "--max-new-tokens", "2", cache=root / "cache", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        return _error(proc)

    ask = ("-a", str(art), "--prompt", "hi")
    assert "temperature above 0" in generate_error(*ask, "--sample", "--temperature", "0")
    assert "top_p must be in (0, 1]" in generate_error(*ask, "--sample", "--top-p", "0")
    assert "batch size must be at least 1" in generate_error(*ask, "--batch-size", "0")
    assert "no control tokens (no artifact)" in generate_error(
        "--model", "tiny-random-llama", "--prompt", "hi", "-p", "alcohol"
    )
    assert "cannot be read as UTF-8" in generate_error("-a", str(art), "-f", str(tmp_path))  # a directory
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"prompt": "café"}\n'.encode("latin-1"))
    assert "cannot be read as UTF-8" in generate_error("-a", str(art), "-f", str(latin))


def test_generate_file_keeps_line_separators_inside_json_strings(trained, tmp_path):
    """JSON allows U+2028 and U+0085 raw inside strings; only "\\n" ends a JSONL row."""
    root, art, _ = trained
    asks = ["first\u2028line", "second\u0085row"]
    prompts = tmp_path / "seps.jsonl"
    prompts.write_bytes(
        b"\xef\xbb\xbf" + "".join(json.dumps({"prompt": a}, ensure_ascii=False) + "\n" for a in asks).encode()
    )
    proc = mosaic(
        "generate", "-a", str(art), "-f", str(prompts), "--max-new-tokens", "2", cache=root / "cache"
    )
    assert [json.loads(line)["prompt"] for line in proc.stdout.splitlines()] == asks


def test_chat_without_an_artifact_keeps_the_session_on_a_policy(tmp_path):
    proc = mosaic(
        "chat", "--model", "tiny-random-llama", "--max-new-tokens", "2", cache=tmp_path,
        stdin="/policy alcohol\n/policyhorror\nhello\n/quit\n",
    )  # fmt: skip
    assert "no control tokens (no artifact)" in proc.stderr and proc.stdout.count("bot> ") == 1
    assert "unknown command /policyhorror" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_chat_commands_it_does_not_know_are_not_sent_to_the_model(tmp_path):
    """/help and a mistyped /polcy went to the model as messages, and the old policy stayed on
    while the user believed it switched; a path at the start of a message is still a message."""
    proc = mosaic(
        "chat", "--model", "tiny-random-llama", "--max-new-tokens", "2", cache=tmp_path,
        stdin="/help\n/polcy alcohol\n/reset now\n/etc/hosts lists what?\n/quit\n",
    )  # fmt: skip
    assert "unknown command /polcy;" in proc.stderr and "unknown command /reset;" in proc.stderr
    assert "unknown command /help" not in proc.stderr and proc.stderr.count("/policy a,b switches") == 3
    assert proc.stdout.count("bot> ") == 1 and proc.returncode == 0


def test_chat_switches_policy(trained):
    root, art, _ = trained
    proc = mosaic(
        "chat",
        "-a",
        str(art),
        "--max-new-tokens",
        "3",
        cache=root / "cache",
        stdin="hello\n/policy horror\n/policy nope\nhi again\n/quit\n",
    )
    assert "policy: horror" in proc.stderr and "unknown category 'nope'" in proc.stderr
    assert proc.stdout.count("bot> ") == 2


def test_deep_tokens_train_info_generate(tmp_path):
    """``tokens.deep=true`` end to end: the artifact says so, and a generation runs through the offsets."""
    art = tmp_path / "deep"
    mosaic("train", "-c", "configs/tiny-test.yaml", "-o", str(art), "tokens.deep=true", cache=tmp_path / "c")
    info = mosaic("info", str(art), cache=tmp_path / "c")
    assert "deep: offsets in 1 layer " in info.stdout and "trainable parameters: 384" in info.stdout
    out = mosaic(
        "generate",
        "-a",
        str(art),
        "-p",
        "horror",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "3",
        cache=tmp_path / "c",
    )
    assert out.returncode == 0 and out.stdout.strip()
    bad = mosaic(
        "train",
        "-c",
        "configs/tiny-test.yaml",
        "-o",
        str(tmp_path / "x"),
        "tokens.deep=maybe",
        cache=tmp_path / "c",
        check=False,
    )
    assert bad.returncode != 0 and "tokens.deep" in bad.stderr + bad.stdout and "Traceback" not in bad.stderr


def test_hard_negatives_through_the_cli(trained):
    """``sampling.hard_negatives``: each epoch's measure is shown and logged, and a resume continues it."""
    root, _, _ = trained
    run = root / "hard"
    cmd = ("train", "-c", "configs/tiny-test.yaml", "-o", str(run), "sampling.hard_negatives=0.5")
    first = mosaic(*cmd, "optim.epochs=1", cache=root / "cache")
    assert "epoch 1 over-refusal on other categories' training prompts, worst per policy: alcohol → " in (
        first.stderr
    )
    resumed = mosaic(*cmd, "--resume", cache=root / "cache")
    assert "resumed from epoch-1" in resumed.stderr and "epoch 2 over-refusal" in resumed.stderr
    logged = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in logged if "confusion" in r] == [1, 2]
    bad = mosaic(*cmd, "method=lora_sft", "-o", str(root / "x"), cache=root / "cache", check=False)
    assert bad.returncode != 0 and "has no control tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_ctrl_c_during_training_says_what_was_kept_and_resume_continues(tmp_path):
    """A real SIGINT once epoch 1 is checkpointed: one line naming the checkpoint, exit 130, no
    traceback; the same command with --resume then finishes the run from there."""
    art, cache = tmp_path / "art", tmp_path / "cache"
    env = {**os.environ, "MOSAIC_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "mosaic_safety.cli", "train", "--config", "configs/tiny-test.yaml"]
    command += ["--output", str(art)]
    proc = subprocess.Popen(
        [*command, "optim.epochs=100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    state = art / "checkpoints" / "epoch-1" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = max(int(p.name.split("-")[1]) for p in (art / "checkpoints").glob("epoch-*"))
    assert f"interrupted: epoch-{last} is the last checkpoint" in stderr
    assert "--resume" in stderr and not (art / "mosaic.json").exists()

    resumed = mosaic(*command[3:], "--resume", f"optim.epochs={last + 1}", cache=cache)
    assert f"resumed from epoch-{last}" in resumed.stderr
    assert (art / "mosaic.json").exists()
    assert json.loads((art / "mosaic.json").read_text())["training"]["steps"] > 0


def test_ctrl_c_in_any_command_is_one_line_with_what_was_kept(capsys):
    import typer

    from mosaic_safety.cli import friendly_errors

    kept = "the responses generated so far are cached"
    with pytest.raises(typer.Exit) as exit_info, friendly_errors(interrupted=kept):
        raise KeyboardInterrupt
    assert exit_info.value.exit_code == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted: the responses generated so far are cached"
    with pytest.raises(typer.Exit), friendly_errors():
        raise KeyboardInterrupt
    assert capsys.readouterr().err.strip() == "interrupted"


def test_the_command_starts_without_importing_torch():
    """Every sub-command is registered when `mosaic` starts, before any command can turn a Ctrl-C
    into one line. `mosaic cache` imported torch there, so a Ctrl-C in the first second of any
    command was a torch traceback (and `mosaic --help` took a second)."""
    code = "import sys, mosaic_safety.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_interrupted_training_names_what_the_run_kept(trained, tmp_path):
    """The Ctrl-C line for each stage a run can be stopped in: before any epoch, after one, and
    after training while the closing table was still being made."""
    from mosaic_safety.cli import interrupted_training

    _, art, _ = trained
    assert "no epoch had finished" in interrupted_training(tmp_path / "empty", trained=False)
    assert interrupted_training(art, trained=False).startswith("epoch-2 is the last checkpoint")
    assert "only the closing table was cut short" in interrupted_training(art, trained=True)


def test_a_stop_before_the_new_run_writes_anything_puts_the_earlier_run_back(trained, tmp_path):
    """--overwrite moved the earlier run aside; a Ctrl-C while the model loads brings it back, and
    the Ctrl-C line says so instead of advising --resume (which would resume the earlier run)."""
    from mosaic_safety.cli import interrupted_training
    from mosaic_safety.training.run_dir import replacing_run

    _, art, _ = trained
    out = tmp_path / "run"
    shutil.copytree(art, out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(KeyboardInterrupt), replacing_run(out, overwrite=True) as replacement:
        assert not (out / "mosaic.json").exists()  # aside while the new run starts
        raise KeyboardInterrupt
    assert replacement.restored and sorted(p.name for p in out.iterdir()) == before
    assert "the earlier run in" in interrupted_training(out, False, replacement)
    # a first epoch cut short (a log, an empty checkpoints folder) has nothing to keep: the earlier
    # run still comes back, in place of those partial files
    with pytest.raises(KeyboardInterrupt), replacing_run(out, overwrite=True) as replacement:
        (out / "train_log.jsonl").write_text('{"step": 1}\n')
        (out / "checkpoints").mkdir()
        raise KeyboardInterrupt
    assert replacement.restored and sorted(p.name for p in out.iterdir()) == before
    assert (out / "train_log.jsonl").read_bytes() == (art / "train_log.jsonl").read_bytes()
    # once the new run has a complete checkpoint, a stop leaves the new run, not the earlier one
    with pytest.raises(KeyboardInterrupt), replacing_run(out, overwrite=True) as replacement:
        shutil.copytree(art / "checkpoints" / "epoch-1", out / "checkpoints" / "epoch-1")
        raise KeyboardInterrupt
    assert not replacement.restored and sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_a_second_train_into_an_output_in_use_is_refused(trained, tmp_path):
    """Two runs started into one directory both passed the occupied-output check (it comes before
    the first file is written) and then trained over each other: mixed checkpoints, a log of two
    runs, and the earlier run replaced although both said they had finished."""
    import fcntl

    root, art, _ = trained
    out = tmp_path / "run"
    shutil.copytree(art, out)
    with (out / ".mosaic-train.lock").open("a") as held:  # what a running `mosaic train` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        proc = mosaic(
            "train", "-c", "configs/tiny-test.yaml", "-o", str(out), "--overwrite",
            cache=root / "cache", check=False,
        )  # fmt: skip
    assert proc.returncode == 2 and "in use by another `mosaic train`" in proc.stderr, proc.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the run in it was not touched
    # once the other run has ended, the directory is free again; a start that fails leaves no folder
    proc = mosaic(
        "train", "-c", "configs/tiny-test.yaml", "-o", str(tmp_path / "new" / "deeper"),
        "model.name=./no-such-model", cache=root / "cache", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and not (tmp_path / "new").exists(), proc.stderr  # nor the folders above it
    assert not list(art.glob(".mosaic-*"))  # a finished run leaves no lock behind


def _killed_overwrite(out: Path, progress: bool) -> None:
    """What SIGKILL during `--overwrite` leaves: the earlier run in a hidden folder, maybe a partial
    new run beside it (no finally ran)."""
    aside = Path(tempfile.mkdtemp(prefix=".replaced-run-", dir=out))
    for name in [p.name for p in out.iterdir() if not p.name.startswith(".")]:
        os.replace(out / name, aside / name)
    (aside / ".moved").touch()
    (out / "train_log.jsonl").write_text("")
    if progress:
        shutil.copytree(aside / "checkpoints" / "epoch-1", out / "checkpoints" / "epoch-1")


def test_a_killed_overwrite_is_settled_by_the_next_train(trained, tmp_path):
    """SIGKILL runs no cleanup: the earlier run sat hidden, `mosaic info` said there was none, and
    each further killed --overwrite hid another copy. The next `mosaic train` in that folder puts
    the earlier run back (the new one had no checkpoint) or finishes the replacement (it had)."""
    from mosaic_safety.training.run_dir import recover_set_aside

    root, art, _ = trained
    out = tmp_path / "run"
    shutil.copytree(art, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _killed_overwrite(out, progress=False)
    _killed_overwrite(out, progress=False)  # killed twice: the earlier run is two folders deep
    hidden = mosaic("info", str(out), cache=root / "cache", check=False)
    assert hidden.returncode == 2 and "an interrupted --overwrite left the earlier run in" in hidden.stderr
    from mosaic_safety.tokens import ArtifactError, ControlTokens
    from mosaic_safety.training.run_dir import _lock

    aside = sorted(out.glob(".replaced-run-*"))[0]
    running = _lock(aside, wait=True)  # as the process whose --overwrite is still under way holds it
    try:
        with pytest.raises(ArtifactError, match="a running --overwrite is replacing the run here"):
            ControlTokens.load(out)
    finally:
        running.close()
    refused = mosaic(
        "train", "-c", "configs/tiny-test.yaml", "-o", str(out), cache=root / "cache", check=False
    )
    assert "restored the earlier run" in refused.stderr and "already holds a training run" in refused.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(out.glob(".replaced-run-*"))

    _killed_overwrite(out, progress=True)
    assert "had written a checkpoint" in recover_set_aside(out)
    assert not list(out.glob(".replaced-run-*")) and (out / "checkpoints" / "epoch-1").is_dir()
    assert recover_set_aside(out) is None


def test_a_stop_while_the_earlier_run_moves_or_comes_back_loses_nothing(trained, tmp_path, monkeypatch):
    """The earlier run is split between the output and the hidden folder while it moves (aside, or
    back): a failure, a second Ctrl-C or a kill right then must not delete the part already moved,
    and a folder whose run is still alive is not a leftover."""
    from mosaic_safety.training import run_dir

    _, art, _ = trained
    out = tmp_path / "run"
    shutil.copytree(art, out)

    def files() -> dict:
        return {
            p.relative_to(out): p.read_bytes()
            for p in out.rglob("*")
            if p.is_file() and ".replaced" not in str(p)
        }

    before = files()
    real = os.replace

    def fail_on(name: str, error: BaseException):
        def replace(src, dst):
            if Path(src).name == name and "replaced-run" in str(dst):
                raise error
            return real(src, dst)

        return replace

    # moving aside fails halfway (a mount point; or Ctrl-C): the moved files come back
    for error in (OSError(16, "Device or resource busy"), KeyboardInterrupt()):
        monkeypatch.setattr(run_dir.os, "replace", fail_on("checkpoints", error))
        with pytest.raises(type(error)), run_dir.replacing_run(out, overwrite=True):
            pass
        monkeypatch.setattr(run_dir.os, "replace", real)
        assert files() == before and not list(out.glob(".replaced-run-*"))

    # killed halfway through moving aside: the next recovery joins the two halves again
    aside = Path(tempfile.mkdtemp(prefix=".replaced-run-", dir=out))
    for name in ("mosaic.json", "tokens.safetensors"):
        real(out / name, aside / name)
    assert "restored the earlier run" in run_dir.recover_set_aside(out)
    assert files() == before and not list(out.glob(".replaced-run-*"))

    # a second Ctrl-C while the earlier run comes back: the folder stays, marked, and recovery ends it
    calls = {"n": 0}

    def second_stop(src, dst):
        if "replaced-run" in str(src) and Path(dst).parent == out:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real(src, dst)

    with pytest.raises(KeyboardInterrupt), run_dir.replacing_run(out, overwrite=True):
        monkeypatch.setattr(run_dir.os, "replace", second_stop)
        raise KeyboardInterrupt
    monkeypatch.setattr(run_dir.os, "replace", real)
    assert list(out.glob(".replaced-run-*"))  # kept: it still holds part of the earlier run
    assert "restored the earlier run" in run_dir.recover_set_aside(out)
    assert files() == before

    # a folder an older version set aside beside a run of the same files: named, nothing moved
    old = Path(tempfile.mkdtemp(prefix=".replaced-run-", dir=out))
    shutil.copy(out / "mosaic.json", old / "mosaic.json")
    assert "move its files back by hand" in run_dir.recover_set_aside(out)
    assert files() == before and (old / "mosaic.json").exists()
    shutil.rmtree(old)

    # a folder whose --overwrite is still running (it holds the lock) is not touched
    with run_dir.replacing_run(out, overwrite=True):
        (out / "train_log.jsonl").write_text("")
        assert run_dir.recover_set_aside(out) is None
        assert not (out / "mosaic.json").exists() and list(out.glob(".replaced-run-*"))


def test_sigterm_stops_training_like_ctrl_c(trained, tmp_path):
    """`kill`, systemd and docker stop send SIGTERM: the earlier run of an --overwrite comes back
    and the stop is reported, instead of a silent death with the run hidden."""
    root, art, _ = trained
    out = tmp_path / "run"
    shutil.copytree(art, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    env = {**os.environ, "MOSAIC_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "MOSAIC_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "mosaic_safety.cli", "train", "-c", "configs/tiny-test.yaml", "-o", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--overwrite", "optim.epochs=1000", "sampling.per_subset=40"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # the earlier run moved aside and the new one logging: under way, its first epoch not finished
    while proc.poll() is None and ((out / "mosaic.json").exists() or not (out / "train_log.jsonl").exists()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err, err
    assert "the earlier run in" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_sigterm_stops_an_evaluation_like_ctrl_c(trained, tmp_path):
    """The responses so far stay cached either way; SIGTERM now also says so (it died silently, 143)."""
    root, art, _ = trained
    env = {**os.environ, "MOSAIC_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "MOSAIC_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "mosaic_safety.cli", "eval", "-a", str(art), "--out", str(tmp_path / "ev")]
    proc = subprocess.Popen(
        [*cmd, "--limit", "0", "--batch-size", "1", "--max-new-tokens", "64", "--seed", "99"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    for line in proc.stderr:  # under way: responses are being generated
        if "responses:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "the same command reuses them" in err, err
    assert not (tmp_path / "ev" / "results.json").exists()


def test_a_checkpoint_with_a_damaged_marker_is_passed_over(trained, tmp_path):
    from mosaic_safety.training.checkpoint import latest_checkpoint

    _, art, _ = trained
    out = tmp_path / "run"
    shutil.copytree(art, out)
    assert latest_checkpoint(out).name == "epoch-2"
    (out / "checkpoints" / "epoch-2" / "trainer_state.json").write_text("")  # a power cut mid-write
    assert latest_checkpoint(out).name == "epoch-1"


def test_a_category_without_test_prompts_is_named_not_crashed_on(tmp_path):
    """The closing table has a policy row but no column for a category whose test prompts are all
    gone: training ends, the artifact and table are written, and the table says what it missed."""
    from mosaic_safety.data.suites import BUILTIN_DIR

    suite = tmp_path / "suite"
    shutil.copytree(BUILTIN_DIR / "minors", suite)
    horror = suite / "horror.jsonl"
    rows = [line for line in horror.read_text().splitlines() if '"split": "test"' not in line]
    horror.write_text("\n".join(rows) + "\n")
    art = tmp_path / "art"
    proc = mosaic(
        "train",
        "-c",
        "configs/tiny-test.yaml",
        "-o",
        str(art),
        f"data.suite={suite}",
        "optim.epochs=1",
        cache=tmp_path / "cache",
    )
    assert "no test prompts for horror" in proc.stdout
    table = json.loads((art / "eval_table.json").read_text())
    assert "horror" in table["rates"] and "horror" not in table["groups"]
    assert table["checks"]["no_prompts"] == ["horror"]


def test_an_empty_output_path_is_refused_not_the_working_directory(tmp_path):
    """`-o ''` became `.`: a run (or an evaluation's report) was written into the working directory."""
    env = {**os.environ, "MOSAIC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    config = str(ROOT / "configs" / "tiny-test.yaml")
    for args in (
        ["train", "-c", config, "-o", ""],
        ["eval", "--out", " "],
        ["report", "compare", "a", "-o", ""],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "mosaic_safety.cli", *args],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2 and "empty path" in proc.stderr, (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written where it ran


def test_text_that_is_not_utf8_and_an_overlong_chat_are_clear_errors(trained):
    """Bytes from a Latin-1 terminal reach Python as lone surrogates, which the tokenizer rejected
    with a traceback; a chat whose history outgrew the window ended the session and lost it."""
    root, art, _ = trained
    bad = mosaic("generate", "-a", str(art), "--prompt", "caf\udce9", cache=root / "cache", check=False)
    assert bad.returncode == 2 and "not valid UTF-8 text: b'\\xe9'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    long = "hello there " * 400
    session = f"caf\udce9\n{long}\n{long}\n{long}\nhi\n/quit\n".encode("utf-8", "surrogateescape")
    env = {**os.environ, "MOSAIC_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mosaic_safety.cli", "chat", "-a", str(art), "--max-new-tokens", "200"],
        input=session, capture_output=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "not valid UTF-8 text" in err and "exceeds the model's context window" in err
    assert proc.stdout.decode("utf-8", "replace").count("bot> ") >= 2  # the session went on


def test_info_survives_a_hand_edited_refusal_table(trained, tmp_path):
    root, art, _ = trained
    out = tmp_path / "art"
    shutil.copytree(art, out)
    manifest = json.loads((out / "mosaic.json").read_text())
    manifest["metrics"]["refusal_table"] = {"x": 1}
    (out / "mosaic.json").write_text(json.dumps(manifest))
    proc = mosaic("info", str(out), cache=root / "cache")
    assert "the recorded refusal table is not readable" in proc.stderr and "alcohol" in proc.stdout


def test_bad_paths_and_numbers_fail_before_the_work(trained, tmp_path):
    """Each of these failed only after the model loaded or the evaluation ran, or with a traceback."""
    root, art, _ = trained
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    cases = [
        (["train", "-c", "configs/tiny-test.yaml", "-o", str(dangling)], "which does not exist"),
        (["eval", "--artifact", str(art), "--out", str(dangling / "e")], "which does not exist"),
        (["train", "-c", "configs/tiny-test.yaml", "-o", str(a_file)], "is a file, not a directory"),
        (["eval", "--artifact", str(art), "--out", str(a_file / "x")], "is a file, not a directory"),
        (["eval", "--artifact", str(art), "--out", str(tmp_path / "e"), "--kl-prompts", "-5"], "kl-prompts"),
        (["judges", "validate", "--out", str(tmp_path)], "is a directory; give a file name"),
        (["judges", "validate", "--limit", "-1"], "--limit"),
        (["judges", "validate", "-j", "hf", "--batch-size", "0"], "--batch-size"),
        (["serve", "--artifact", str(art), "--port", "99999"], "--port"),
        (["generate", "-a", str(art), "--prompt", "hi", "--sample", "--seed", "9" * 20], "--seed"),
        (["info", str(art / "mosaic.json")], "is a file; give the artifact's directory"),
        (["train", "-c", "configs/tiny-test.yaml", "-o", str(tmp_path / ("x" * 300))], "File name too long"),
    ]
    for args, message in cases:
        proc = mosaic(*args, cache=root / "cache", check=False)
        assert proc.returncode == 2 and message in proc.stderr + proc.stdout, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    env_file = tmp_path / "cache-file"
    env_file.write_text("")
    proc = mosaic(
        "train", "-c", "configs/tiny-test.yaml", "-o", str(tmp_path / "r"), cache=env_file, check=False
    )
    assert proc.returncode == 2 and "set MOSAIC_CACHE" in proc.stderr and not (tmp_path / "r").exists()


def test_a_file_row_past_the_context_window_is_named_before_any_row_is_written(trained, tmp_path):
    root, art, _ = trained
    rows = [{"prompt": "hi"}] * 3 + [{"prompt": "word " * 5000}, {"prompt": "bye"}]
    file = tmp_path / "p.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = mosaic(
        "generate",
        "-a",
        str(art),
        "-f",
        str(file),
        "--max-new-tokens",
        "4",
        cache=root / "cache",
        check=False,
    )
    assert proc.returncode == 2 and "prompt 4 of 5 in the file" in proc.stderr and proc.stdout == ""


def test_serve_names_a_taken_port_or_a_bad_host_before_loading_anything(trained):
    import socket

    root, art, _ = trained
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = mosaic("serve", "--artifact", str(art), "--port", port, cache=root / "cache", check=False)
    assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    host = mosaic("serve", "--artifact", str(art), "--host", "bad host!", cache=root / "cache", check=False)
    assert host.returncode == 2 and "not an address or a known host name" in host.stderr


def test_chat_prints_each_piece_as_the_model_produces_it(trained, monkeypatch):
    """The reply streams: when the model yields a piece, every earlier piece is already on screen
    (a loop that collected the stream first, as one regression did, prints nothing until the end)."""
    import io

    from rich.console import Console

    from mosaic_safety import cli
    from mosaic_safety.controlled import ControlledModel

    root, art, _ = trained
    monkeypatch.setenv("MOSAIC_CACHE", str(root / "cache"))
    screen = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=screen, width=200))
    lines = iter(["hello", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen: list[tuple[str, str]] = []  # (piece the model yields, screen at that moment)
    real_stream = ControlledModel.stream

    def observed_stream(self, *args, **kwargs):
        for piece in real_stream(self, *args, **kwargs):
            seen.append((piece, screen.getvalue()))
            yield piece

    monkeypatch.setattr(ControlledModel, "stream", observed_stream)
    cli.chat(artifact=art, policy="", model=None, max_new_tokens=8, device="cpu", dtype="auto")
    assert len(seen) >= 2, "the tiny model stopped too early for this test to mean anything"
    for i, (_, shown) in enumerate(seen):
        assert shown.endswith("bot> " + "".join(p for p, _ in seen[:i])) or i == 0
    assert screen.getvalue().rstrip("\n").endswith("".join(p for p, _ in seen))


def test_info_shows_the_lineage_of_an_extended_artifact(trained, tmp_path):
    root, art, _ = trained
    ext = tmp_path / "ext"
    flags = ("optim.epochs=1", "eval.max_new_tokens=0", f"init_artifact={art}", "data.categories=[sex]")
    mosaic("train", "-c", "configs/tiny-test.yaml", "-o", str(ext), *flags, cache=root / "cache")
    info = mosaic("info", str(ext), cache=root / "cache").stdout
    sha = json.loads((art / "mosaic.json").read_text())["tokens_sha256"][:12]
    assert (
        f"extends {art.resolve()} (tokens sha256 {sha}): alcohol, betting, horror kept from it unchanged"
        in info
    )
    trained_more = mosaic(
        "train", "-c", "configs/tiny-test.yaml", "-o", str(tmp_path / "ext2"), "tokens.m=3", *flags,
        cache=root / "cache",
    )  # fmt: skip
    assert (
        "(alcohol, betting, horror frozen), tokens alcohol 2, betting 2, horror 2, sex 3,"
        in trained_more.stderr
    )


def test_eval_defaults_to_the_suite_the_artifact_was_trained_on(tmp_path):
    """A custom suite's artifact is evaluated on that suite's test prompts without --suite."""
    from mosaic_safety.data.suites import BUILTIN_DIR

    suite = tmp_path / "mysuite"
    shutil.copytree(BUILTIN_DIR / "minors", suite)
    art, cache = tmp_path / "art", tmp_path / "cache"
    mosaic(
        "train", "-c", "configs/tiny-test.yaml", "-o", str(art), f"data.suite={suite}", "optim.epochs=1",
        "eval.max_new_tokens=0", cache=cache,
    )  # fmt: skip
    ask = ("eval", "-a", str(art), "--limit", "1", "--max-order", "1", "--max-new-tokens", "2")
    mosaic(*ask, "--out", str(tmp_path / "ev"), cache=cache)
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["suite"] == "mysuite"
    shutil.rmtree(suite)
    proc = mosaic(*ask, "--out", str(tmp_path / "ev2"), cache=cache, check=False)
    assert proc.returncode == 2 and "(the suite the artifact was trained on; give --suite)" in proc.stderr


def test_generated_text_reaches_stdout_as_the_model_wrote_it(tmp_path, monkeypatch):
    """Into a pipe the output console is 120 columns wide: a longer answer gained line breaks,
    and a ``:name:`` in it became an emoji (with and without --stream)."""
    import io

    from rich.console import Console

    from mosaic_safety import cli
    from mosaic_safety.controlled import ControlledModel

    text = "I like :cat: a lot. " + "word " * 40 + "end"
    monkeypatch.setattr(ControlledModel, "generate", lambda self, prompts, *a, **k: [text] * len(prompts))
    monkeypatch.setattr(ControlledModel, "stream", lambda self, *a, **k: iter(text.partition("a lot.")))
    for stream in (False, True):
        screen = io.StringIO()
        monkeypatch.setattr(cli, "out", Console(file=screen, width=120))
        cli.generate(
            artifact=None, policy="", prompt="hi", file=None, model="tiny-random-llama",
            max_new_tokens=4, sample=False, temperature=0.7, top_p=0.95, seed=0, batch_size=1,
            stream=stream, device="cpu", dtype="auto",
        )  # fmt: skip
        assert screen.getvalue() == text + "\n", stream


def test_every_option_of_every_command_says_what_it_does():
    """`mosaic chat --help` listed its options with no word on any of them; generate left its
    decoding, batch and device options bare, and serve its host, port, batching and limits."""
    import typer

    from mosaic_safety.cli import app

    def bare_options(command, path: str):
        if hasattr(command, "commands"):  # a group: data, report, judges, cache
            for name, sub in command.commands.items():
                yield from bare_options(sub, f"{path} {name}".strip())
            return
        for param in command.params:
            if param.param_type_name == "option" and not getattr(param, "help", None):
                yield f"{path} --{param.name}"

    root = typer.main.get_command(app)
    assert {"generate", "chat", "serve", "data"} <= set(root.commands)
    assert list(bare_options(root, "")) == []


def test_mosaic_progress_0_also_turns_off_transformers_loading_bar(tmp_path):
    """Loading a model from a folder drew transformers' "Loading weights" bar into logs that set
    MOSAIC_PROGRESS=0."""
    from mosaic_safety.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model_dir = tmp_path / "model"
    build_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ask = ("generate", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "1")
    stderr = {
        setting: mosaic(*ask, cache=tmp_path / "cache", env={"MOSAIC_PROGRESS": setting}).stderr
        for setting in ("1", "0")
    }
    assert "Loading weights" in stderr["1"] and "Loading weights" not in stderr["0"], stderr
