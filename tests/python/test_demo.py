"""The fine-tune demo runs end to end on the real digits data."""

from qsparseprop import demo


def test_demo_runs_and_learns():
    rows = demo.run(epochs=1, pretrain_epochs=2, sparsity=0.9)
    names = [r["variant"] for r in rows]
    assert names == [
        "dense (unpruned)",
        "dense, masked (torch)",
        "sparse f32 (qsparseprop)",
        "sparse int8 (qsparseprop)",
    ]
    assert rows[0]["acc_after"] > 0.7  # 10 classes: chance is 0.1
    for r in rows[1:]:
        assert abs(r["sparsity"] - 0.9) < 0.01
        assert r["acc_after"] > 0.5
        assert r["epoch_s"] > 0
    table = demo.format_table(rows)
    assert "sparse int8" in table and "s/epoch" in table


def test_demo_cli(tmp_path, capsys):
    out = tmp_path / "rows.json"
    demo.main(["--epochs", "1", "--pretrain-epochs", "1", "--json", str(out)])
    assert "sparse f32 (qsparseprop)" in capsys.readouterr().out
    assert out.read_text().startswith("[")
