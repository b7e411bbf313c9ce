from conversion.cli.demo import main


def test_demo_runs_end_to_end_and_prints_what_it_did(tmp_path, capsys):
    main(["--output", str(tmp_path / "artifact"), "--variant", "e-wemoe"])
    printed = capsys.readouterr().out
    assert "(as `wemoe-convert` does)" in printed
    assert "(as `wemoe-tta` does)" in printed and "after TTA" in printed
    assert "Reloaded it with trust_remote_code (WEMoEForImageClassification, e-wemoe)" in printed
    assert (tmp_path / "artifact" / "modeling_wemoe.py").exists()
    assert printed.count(": ") >= 3  # top-3 "<task>: <label>" predictions
