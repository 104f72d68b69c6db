import json

from kdlab.demo import STUDENTS, run_demo


def test_demo_trains_teacher_and_all_students_and_writes_the_table(tmp_path):
    lines = []
    out = run_demo(tmp_path, teacher_epochs=2, student_epochs=1, num_samples=1000, teacher_model="cnn1d-8",
                   student_model="cnn1d-4", progress=False, log=lines.append)
    table = out["table"].splitlines()
    assert len(table) == 2 + 1 + len(STUDENTS)
    assert [row["label"] for row in out["students"]] == [label for label, _, _ in STUDENTS]
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert len(saved["students"]) == len(STUDENTS)
    assert (tmp_path / "demo_table.md").read_text().startswith("| run |")
    # every KD student saw the same teacher; α = 0 students use it for evaluation only
    teacher_dir = out["teacher"]["run_dir"]
    for row in out["students"]:
        assert row["result"]["final"]["test_agreement"] >= 0
    assert sum(1 for l in lines if l.startswith("[")) == 1 + len(STUDENTS)
    # a second call finds every run finished and trains nothing
    again = run_demo(tmp_path, teacher_epochs=2, student_epochs=1, num_samples=1000, teacher_model="cnn1d-8",
                     student_model="cnn1d-4", progress=False, log=lines.append)
    assert again["teacher"]["run_dir"] == teacher_dir
    assert sum("finished already" in l for l in lines) == 1 + len(STUDENTS)
