"""`--log-format json`: the services' log lines as JSON objects (the end-to-end test reads a
real coordinator's and real nodes'); here, an exception's traceback and a library's warning."""

import json
import subprocess
import sys

PROGRAM = """
import logging, warnings
from fedtrain.logs import LogFormat, configure_logging
configure_logging(LogFormat.json, "node:n0")
log = logging.getLogger("fedtrain.node")
log.debug("below INFO: not written")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("round failed")
warnings.warn("a library's warning")
logging.getLogger("flwr").info("from Flower")
"""


def test_json_lines_carry_the_traceback_and_warnings_and_flower():
    proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=60, check=True)
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [(e["logger"], e["level"]) for e in lines] == [
        ("fedtrain.node", "ERROR"), ("py.warnings", "WARNING"), ("flwr", "INFO")]
    failed, warned, flower = lines
    assert failed["message"] == "round failed" and failed["party"] == "node:n0"
    assert failed["exception"].startswith("Traceback") and "ZeroDivisionError" in failed["exception"]
    assert "a library's warning" in warned["message"] and flower["message"] == "from Flower"
    assert failed["time"].endswith("+00:00")
