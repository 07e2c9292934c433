import copy
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
from tqcompressor.training import FINAL, METRICS, Trainer
from tqcompressor.training.continuation import (
    FINAL_OPTIMIZER,
    Continuation,
    parameter_values,
    read_optimizer_state,
    unchanged_parameters,
)


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
    assert schedule.share_tokens(400, [1, 1, 2]).token_budgets(None) == [100, 100, 200]
    with pytest.raises(ValueError, match="3 steps"):
        schedule.share_tokens(400, [1, 2])
    with pytest.raises(ValueError, match="positive"):
        schedule.share_tokens(400, [1, 0, 2])
    with pytest.raises(ValueError, match="own token budgets"):
        schedule.share_tokens(400, [1, 1, 2]).share_tokens(400, [1, 1, 1])


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
    shares = ["--preset", "kngpt2", "--token-shares", "1", "2", "1"]
    assert main(["distill", *common, *shares, "--out", str(tmp_path / "x6")]) == 2  # shares of what?
    assert main(["distill", *common, *shares[2:], "--student", str(student), "--out", str(tmp_path / "x7")]) == 2
    assert main(["distill", *common, *shares[:-1], "--tokens", "64", "--out", str(tmp_path / "x8")]) == 2
    err = capsys.readouterr().err
    assert err.count("tqcompressor: error:") == 9 and "Traceback" not in err
    assert "give both" in err and "--token-shares" in err and "2 token shares for a schedule of 3 steps" in err
    assert "vocabulary" in err and "does not exist" in err
    assert "'time_budget' tunes the permutation search" in err and "--dense-head apply to presets only" in err
    assert not any((tmp_path / f"x{i}").exists() for i in range(1, 9))


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


def test_distil_only_steps_of_a_continuous_run_equal_one_long_run(tmp_path):
    teacher, tokens = tiny_model(), 24 * 8 * 4
    polish = Schedule.from_dict({"steps": [{"name": "first"}, {"name": "second"}]})
    one = Trainer(
        copy.deepcopy(teacher), teacher, pattern_blocks(), config(tokens=tokens), tmp_path / "one", progress=False
    )
    one.run()
    ids = pattern_blocks().heldout[:4]
    expected = one.student.eval()(ids).logits
    for continuous in (True, False):
        out = tmp_path / f"continuous-{continuous}"
        run_schedule(
            teacher, None, polish, pattern_blocks(), config(), out, tokens, progress=False, continuous=continuous
        )
        logits = load(out / "02-second" / FINAL).eval()(ids).logits
        if continuous:
            torch.testing.assert_close(logits, expected)
        else:  # a fresh optimizer and schedule at the second step: another trajectory
            assert (logits - expected).abs().max() > 1e-3
        assert (out / "01-first" / FINAL_OPTIMIZER).is_file() == continuous
        assert not (out / "02-second" / FINAL_OPTIMIZER).exists()  # nothing follows the last step


def test_a_compression_step_keeps_the_moments_of_what_it_left_unchanged_and_warms_up_the_rest(tmp_path):
    teacher = tiny_model()
    mlp = {"pattern": r"transformer\.h\.1\.mlp\.c_fc", "ratio": 0.5, "iterations": 1}
    schedule = Schedule.from_dict({"steps": [{"name": "polish"}, {"name": "mlp", "rules": [mlp]}]})
    run_schedule(teacher, None, schedule, pattern_blocks(), config(), tmp_path / "run", 24 * 8 * 4, progress=False)
    moments = read_optimizer_state(tmp_path / "run" / "01-polish" / FINAL_OPTIMIZER)
    compressed = load(tmp_path / "run" / "02-mlp" / "compressed")
    kept = unchanged_parameters(parameter_values(load(tmp_path / "run" / "01-polish" / FINAL)), compressed)
    assert "transformer.h.1.mlp.c_fc.weight" in moments
    assert "transformer.h.0.attn.c_attn.weight" in kept
    new = {name for name, _ in compressed.named_parameters()} - kept
    assert new and all(name.startswith("transformer.h.1.mlp.c_fc.") for name in new)

    continuation = Continuation(2, 4, {name: moments[name] for name in kept})
    settings = config(tokens=24 * 8 * 2, warmup_fraction=0.5)
    trainer = Trainer(
        compressed, teacher, pattern_blocks(), settings, tmp_path / "probe", progress=False, continuation=continuation
    )
    parameters = dict(trainer.student.named_parameters())
    state = trainer.optimizer.state[parameters["transformer.h.0.attn.c_attn.weight"]]
    assert torch.equal(state["exp_avg"], moments["transformer.h.0.attn.c_attn.weight"]["exp_avg"])
    assert all(parameters[name] not in trainer.optimizer.state for name in new)
    lr = trainer._set_learning_rates()
    assert lr == settings.lr_at(2, 4)  # the run's schedule, not a new warm-up from zero
    rates = {group["fresh"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert rates[False] == lr and rates[True] == pytest.approx(lr / 2)  # new factors ramp over the warm-up


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Continuation(4, 4), "outside"),
        (lambda: Continuation(0, 4, {"x": {}}, restart=True), "cannot carry"),
        (lambda: Continuation(3, 4), "overrun"),
        (lambda: Continuation(0, 4, {"transformer.nope": {}}), "does not train"),
    ],
)
def test_a_continuation_that_does_not_fit_the_stage_is_refused(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        Trainer(
            tiny_model(),
            tiny_model(),
            pattern_blocks(),
            config(tokens=24 * 8 * 2),
            tmp_path,
            progress=False,
            continuation=make(),
        )
    assert not tmp_path.joinpath("checkpoint").exists()
