from jaxunlearn.cli import run

run()
