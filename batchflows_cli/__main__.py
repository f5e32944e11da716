from batchflows_cli import app

app()
