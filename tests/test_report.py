"""tools/report.py: the HTML report of a run, loaded in headless Chromium."""

import os
import shutil
import subprocess
import sys

import pytest

from configs import deep
from tools import report
from trainer import train
from trainer import workdir as workdir_lib

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def rendered(synthetic_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  config = deep.get_config("smoke")
  config.update(data_dir=synthetic_dir, num_epochs=2)
  train.train_and_evaluate(config, workdir)
  return workdir, report.report(workdir)


def test_report_writes_page_and_figures(rendered):
  workdir, index = rendered
  assert index == os.path.join(workdir, "report", "index.html")
  for name in ("learning_curves", "confusion_matrix", "per_class_accuracy", "samples", "throughput"):
    with open(os.path.join(workdir, "report", f"{name}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  page = open(index).read()
  assert "validation accuracy (export)" in page and "optimizer.learning_rate" in page and "split train" in page
  workdir_lib.check(workdir)  # a report inside the workdir does not stop the run from resuming


@pytest.mark.skipif(not BROWSER and not os.environ.get("CI"), reason="no Chromium here (apt-get install chromium)")
def test_report_loads_in_headless_chromium_without_console_errors(rendered):
  assert BROWSER, "CI must have Chromium (.ci/run installs it)"
  _, index = rendered
  result = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", "--dump-dom", f"file://{index}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  # The page's own script counts the images that loaded (naturalWidth > 0) once the window has loaded.
  assert 'data-images-loaded="5"' in result.stdout and 'data-images-total="5"' in result.stdout
  console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
  assert not console, console


def test_report_on_a_non_run_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "tools.report", f"--workdir={tmp_path}"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (f"report: error: {tmp_path}: no config.json; is this a "
                                                    "finished trainer workdir?")
