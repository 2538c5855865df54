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


def test_closed_output_pipe_is_not_a_traceback():
    import subprocess
    import sys

    code = "import sys; from fromface.cli.main import main; sys.exit(main(['models']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `fromface models | head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
