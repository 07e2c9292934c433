import json

import pytest
import torch
import yaml
from test_distillation import config, pattern_blocks
from test_models import TINY, tiny_model

from tqcompressor.cli import main
from tqcompressor.params import count_parameters
from tqcompressor.schedule import Schedule, run_schedule
from tqcompressor.serialization import load
from tqcompressor.training import FINAL, METRICS


def quick_preset(name: str = "tqcompressedgpt2") -> Schedule:
    search = {"iterations": 1, "time_budget": 1.0} if name == "tqcompressedgpt2" else {}  # kngpt2 has no search
    return Schedule.from_preset(name, tiny_model().config, **search)


def test_preset_schedule_has_the_papers_three_steps_and_a_one_shot_form():
    schedule = quick_preset()
    assert [step.name for step in schedule.steps] == ["step1-embedding", "step2-mlp", "step3-embedding"]
    assert schedule.token_budgets(300) == [100, 100, 100]
    merged = schedule.one_shot()
    assert len(merged.steps) == 1
    assert [r.pattern for r in merged.steps[0].plan.rules] == [
        r.pattern for step in schedule.steps for r in step.plan.rules
    ]
    assert all(not r.config.permute for step in quick_preset("kngpt2").steps for r in step.plan.rules)


def test_schedule_file_with_rules_plan_files_and_own_budgets(tmp_path):
    (tmp_path / "mlp.yaml").write_text(
        yaml.safe_dump({"rules": [{"pattern": r"transformer\.h\.1\.mlp\.c_fc", "ratio": 0.5, "iterations": 1}]})
    )
    (tmp_path / "schedule.yaml").write_text(
        yaml.safe_dump(
            {
                "steps": [
                    {"name": "emb", "rules": [{"pattern": r"transformer\.wte", "embedding_factor": 2}], "tokens": 50},
                    {"name": "mlp", "plan": "mlp.yaml"},
                    {"name": "polish"},
                ]
            }
        )
    )
    schedule = Schedule.load(tmp_path / "schedule.yaml")
    assert [s.name for s in schedule.steps] == ["emb", "mlp", "polish"]
    assert schedule.steps[2].plan is None
    assert schedule.token_budgets(250) == [50, 100, 100]
    schedule.check(tiny_model())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": []}, "at least one step"),
        ({"stages": []}, "'steps' list"),
        ({"steps": [{"name": "a", "colour": 1}]}, "unknown keys"),
        ({"steps": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"steps": [{"tokens": -3}]}, "positive integer"),
        ({"steps": [{"rules": [{"pattern": "x", "method": "magic"}]}]}, "unknown compression method"),
    ],
)
def test_bad_schedules_are_rejected(data, message):
    with pytest.raises(ValueError, match=message):
        Schedule.from_dict(data)


def test_a_step_that_names_nothing_fails_before_any_work(tmp_path):
    schedule = Schedule.from_dict(
        {"steps": [{"name": "ghost", "rules": [{"pattern": "decoder\\.layers\\.0", "ratio": 0.5}]}]}
    )
    with pytest.raises(ValueError, match=r"ghost.*match no module"):
        run_schedule(tiny_model(), None, schedule, pattern_blocks(), config(), tmp_path / "out", 100)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--tokens"):
        quick_preset().token_budgets(None)


def test_multi_step_run_saves_every_step_and_resumes_after_the_last_finished_one(tmp_path):
    teacher = tiny_model()
    evaluations = []

    def evaluate(model):
        evaluations.append(count_parameters(model))
        return {"params": count_parameters(model)}

    def run(resume: bool = False):
        return run_schedule(
            teacher, None, quick_preset(), pattern_blocks(), config(), tmp_path, 24 * 8 * 6, resume, False, evaluate
        )

    results = run()
    assert [r["step"] for r in results] == ["step1-embedding", "step2-mlp", "step3-embedding"]
    params = [r["params"] for r in results]
    assert params[0] > params[1] > params[2] and params[0] < count_parameters(teacher)
    assert all(r["steps"] == 2 and r["eval_before"]["params"] == r["params"] for r in results)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["01-step1-embedding", "02-step2-mlp", "03-step3-embedding"]
    final = load(tmp_path / folders[-1] / FINAL)
    assert count_parameters(final) == params[-1]
    assert json.loads((tmp_path / folders[0] / METRICS).read_text())["compression"]["layers"][0]["name"] == (
        "transformer.wte"
    )

    # Resume: drop the last step's result and continue; the finished steps are loaded, not recomputed.
    (tmp_path / folders[-1] / METRICS).unlink()
    evaluations.clear()
    again = run(resume=True)
    assert [r["params"] for r in again] == params
    assert evaluations == [params[2], params[2]]  # only step 3 ran (before and after its distillation)
    with pytest.raises(FileExistsError, match="resume"):
        run_schedule(teacher, None, quick_preset(), pattern_blocks(), config(), tmp_path, 100, progress=False)


def test_cli_distill_preset_student_and_user_errors(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from tqcompressor.assets import assets_dir

    folder = assets_dir() / "gpt2-tokenizer"
    tokenizer = GPT2TokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    gpt2_vocab = {**TINY, "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256}
    teacher = GPT2LMHeadModel(GPT2Config(**gpt2_vocab))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("It was the best of times, it was the worst of times. " * 60)
    common = ["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "books"), "--quiet"]
    small = ["--block-size", "32", "--batch-size", "4", "--micro-batch-size", "2"]
    out = tmp_path / "run"
    assert main(["distill", *common, *small, "--preset", "kngpt2", "--tokens", "768", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "distilled model:" in printed and "03-step3-embedding" in printed
    student = out / "03-step3-embedding" / FINAL
    assert main(["eval", str(student), "--dataset", str(tmp_path / "books"), "--max-tokens", "64", "--quiet"]) == 0

    # A single stage on a saved student, then user mistakes: one line, exit 2, nothing written.
    more = tmp_path / "more"
    assert main(["distill", *common, *small, "--student", str(student), "--tokens", "256", "--out", str(more)]) == 0
    assert (more / FINAL / "model.safetensors").is_file()
    # Resuming a finished run says so and succeeds, touching nothing.
    stamp = (more / FINAL / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert (
        main(["distill", *common, *small, "--student", str(student), "--tokens", "256", "--out", str(more), "--resume"])
        == 0
    )
    assert "finished run" in capsys.readouterr().out
    assert (more / FINAL / "model.safetensors").stat().st_mtime_ns == stamp
    capsys.readouterr()
    other = GPT2LMHeadModel(GPT2Config(**{**gpt2_vocab, "vocab_size": 50300}))
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    mismatch = ["distill", "--teacher", str(tmp_path / "other"), "--data", str(tmp_path / "books"), *small]
    assert main([*mismatch, "--student", str(student), "--tokens", "64", "--out", str(tmp_path / "x1")]) == 2
    missing = ["distill", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "nope.txt")]
    assert main([*missing, "--preset", "kngpt2", "--tokens", "64", "--out", str(tmp_path / "x2")]) == 2
    assert main(["distill", *common, "--preset", "kngpt2", "--tokens", "64", "--out", str(out)]) == 2  # exists
    assert main(["distill", *common, "--tokens", "64", "--out", str(tmp_path / "x3")]) == 2  # nothing to do
    # Flags that only shape a preset are refused where they would be ignored or overridden.
    assert (
        main(
            [
                "distill",
                *common,
                "--preset",
                "kngpt2",
                "--time-budget",
                "1",
                "--tokens",
                "64",
                "--out",
                str(tmp_path / "x4"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "distill",
                *common,
                "--student",
                str(student),
                "--dense-head",
                "--tokens",
                "64",
                "--out",
                str(tmp_path / "x5"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("tqcompressor: error:") == 6 and "Traceback" not in err
    assert "vocabulary" in err and "does not exist" in err
    assert "'time_budget' tunes the permutation search" in err and "--dense-head apply to presets only" in err
    assert not any((tmp_path / name).exists() for name in ("x1", "x2", "x3", "x4", "x5"))


def test_a_step_without_rules_only_distils(tmp_path):
    schedule = Schedule.from_dict(
        {
            "steps": [
                {"name": "mlp", "rules": [{"pattern": r"transformer\.h\.1\.mlp\.c_fc", "ratio": 0.5, "iterations": 1}]},
                {"name": "polish"},
            ]
        }
    )
    results = run_schedule(
        tiny_model(), None, schedule, pattern_blocks(), config(), tmp_path, 24 * 8 * 4, progress=False
    )
    assert [r["step"] for r in results] == ["mlp", "polish"]
    assert results[0]["params"] == results[1]["params"] < count_parameters(tiny_model())
    assert (tmp_path / "01-mlp" / "compressed").is_dir() and not (tmp_path / "02-polish" / "compressed").exists()
    assert (tmp_path / "02-polish" / FINAL / "model.safetensors").is_file()
