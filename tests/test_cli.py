import json

from fromface.cli.main import main


def test_models_command_lists_registered_models(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"from_lresnet50e_ir", "mobilefacenet"} <= names
    paper = next(r for r in rows if r["name"] == "from_lresnet50e_ir")
    assert paper["input"] == "112x96" and paper["template"] == "sphereface112x96"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
