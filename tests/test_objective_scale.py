"""benchmarks/objective_scale.py (DECISIONS 16): the power iteration against NumPy's
eigenvalues, and the command line as typed."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lns_testutil import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import objective_scale  # noqa: E402


def test_top_eigenvalue_matches_numpy_on_a_quadratic():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(12, 12)).astype(np.float32)
  a = m @ m.T  # PSD: power iteration finds the largest eigenvalue
  f = lambda t: 0.5 * jnp.vdot(t["x"], jnp.asarray(a) @ t["x"]) + jnp.sum(t["y"] ** 2)
  theta = {"x": jnp.zeros(12), "y": jnp.zeros(3)}  # y: curvature 2, below a's top
  lam = objective_scale.top_eigenvalue(f, theta, 200, jax.random.key(0))
  np.testing.assert_allclose(lam, np.linalg.eigvalsh(a.astype(np.float64)).max(), rtol=1e-3)


def test_cli_table_sum_is_n_times_mean_and_bad_flag(cli):
  r = subprocess.run([sys.executable, "benchmarks/objective_scale.py",
                      "--config=configs/fashion_mnist_r20.py:smoke", "--iters=3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [line.split("|")[1:-1] for line in r.stdout.splitlines()
          if line.startswith("| ") and not line.startswith("| layer")]
  assert rows
  for layer, n, _, lam_mean, _, lam_sum, *_ in rows:
    n = int(n.replace(",", ""))
    np.testing.assert_allclose(float(lam_sum), n * float(lam_mean), rtol=0.02, err_msg=layer)
  assert re.search(r"largest stable lr over the layers: mean \S+, sum \S+", r.stdout)
  assert "machine:" in r.stdout
  bad = cli.run("benchmarks/objective_scale.py", "--iters=0")
  assert bad["rc"] != 0 and bad["stderr"].strip().splitlines()[-1].startswith("error: --iters")
