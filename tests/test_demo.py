import json

from kdlab.demo import STUDENTS, run_demo


def test_demo_trains_teacher_and_all_students_and_writes_the_table(tmp_path):
    lines = []
    kwargs = dict(teacher_epochs=2, student_epochs=2, num_samples=1000, extra_test=300, seeds=2, teacher_model="mlp-16-bn",
                  student_model="mlp-8-bn", progress=False)
    out = run_demo(tmp_path, log=lines.append, **kwargs)
    table = out["table"].splitlines()
    assert len(table) == 2 + 1 + len(STUDENTS)
    assert [s["label"] for s in out["summary"]] == [label for label, _, _ in STUDENTS]
    assert len(out["students"]) == 2 * len(STUDENTS) and {r["seed"] for r in out["students"]} == {0, 1}
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert len(saved["students"]) == 2 * len(STUDENTS) and saved["reading"] == out["reading"]
    text = (tmp_path / "demo_table.md").read_text()
    assert "| run |" in text and out["reading"] in text and out["reading"].startswith("Reading:")
    # the summary's numbers are the runs' numbers: mean over seeds, paired differences to CE
    ce = {r["seed"]: 100 * r["result"]["final"]["test_acc"] for r in out["students"] if r["label"] == "CE"}
    mse = {r["seed"]: 100 * r["result"]["final"]["test_acc"] for r in out["students"] if r["label"] == "MSE"}
    row = next(s for s in out["summary"] if s["label"] == "MSE")
    assert abs(row["acc_mean"] - sum(mse.values()) / 2) < 1e-9
    assert abs(row["vs_ce_mean"] - sum(mse[s] - ce[s] for s in ce) / 2) < 1e-9
    assert row["vs_ce_wins"] == sum(mse[s] > ce[s] for s in ce) and row["seeds"] == 2
    teacher_acc = 100 * out["teacher"]["final"]["test_acc"]
    ce_mean = sum(ce.values()) / 2
    if teacher_acc > ce_mean:
        assert abs(row["gap_closed"] - (row["acc_mean"] - ce_mean) / (teacher_acc - ce_mean)) < 1e-9
    # every KD student saw the same teacher
    teacher_dir = out["teacher"]["run_dir"]
    for r in out["students"]:
        assert r["result"]["final"]["test_agreement"] >= 0
    assert sum(1 for l in lines if l.startswith("[")) == 1 + 2 * len(STUDENTS)
    # a second call finds every run finished and trains nothing
    again = run_demo(tmp_path, log=lines.append, **kwargs)
    assert again["teacher"]["run_dir"] == teacher_dir
    assert sum("finished already" in l for l in lines) == 1 + 2 * len(STUDENTS)


def test_reading_names_the_gap_and_the_objectives_that_always_win():
    from kdlab.demo import reading, summarise

    teacher = {"final": {"test_acc": 0.90}}

    def run(acc):
        return {"final": {"test_acc": acc, "test_nll": 0.5, "test_logit_sum": 0.0, "test_logit_distance": 1.0,
                          "test_agreement": 0.9}, "train_time_s": 1.0}

    rows = [{"label": "CE", "seed": s, "result": run(a)} for s, a in enumerate([0.80, 0.81])]
    rows += [{"label": "KL τ=4", "seed": s, "result": run(a)} for s, a in enumerate([0.85, 0.86])]
    rows += [{"label": "MSE", "seed": s, "result": run(a)} for s, a in enumerate([0.79, 0.80])]
    summary = summarise(rows, teacher)
    kl = next(s for s in summary if s["label"] == "KL τ=4")
    assert abs(kl["gap_closed"] - 5 / 9.5) < 1e-9 and kl["vs_ce_wins"] == 2
    line = reading(summary, teacher)
    assert "9.5 points" in line and "KL τ=4 has the highest mean" in line and "every seed: KL τ=4" in line
    assert "worse than CE in every seed: MSE" in line
    assert "ahead of CE by +5.00 ± 0.00 points paired over 2 seeds: resolved" in line
    # a lead that changes sign between seeds names no winner
    rows[2:4] = [{"label": "KL τ=4", "seed": s, "result": run(a)} for s, a in enumerate([0.82, 0.80])]
    line = reading(summarise(rows, teacher), teacher)
    assert "KL τ=4 has the highest mean" in line and "not resolved, so no single best objective" in line
    # ... and says how large a lead these seeds could have seen: (2 + z_0.8)·SE of the paired differences
    diffs = [82 - 80, 80 - 81]  # KL τ=4 − CE, by seed
    se = abs(diffs[0] - diffs[1]) / 2
    assert f"would have resolved a lead of about {2.8416212335729143 * se:.2f} points or more" in line
