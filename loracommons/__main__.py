from loracommons.cli import app

app(prog_name="loracommons")
