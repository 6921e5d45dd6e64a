"""``kiln serve`` beyond one eager run: exported files, ensembles, TTA, compile, workers."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from runners import run_kiln
from serving import Server
from training import train_digits_mlp

from kiln.algorithms.ensemble import load_ensemble
from kiln.algorithms.tta import TTA
from kiln.deploy.serve.server import load_backend
from kiln.train.checkpoint.weights import load_model


def _train(tmp: Path, seed: int) -> Path:
    return train_digits_mlp(tmp, f"name=s{seed}", f"seed={seed}", "data.split_seed=0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("serve-backends")
    return [_train(tmp, 0), _train(tmp, 1)]


X = torch.linspace(-1, 1, 3 * 64).reshape(3, 64)


def _probs(server: Server) -> torch.Tensor:
    status, body = server.predict(X.tolist())
    assert status == 200, body
    return torch.tensor([o["probabilities"] for o in body["outputs"]])


def _eager_probs(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(X).float().softmax(-1)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["exported", "onnx"])
def test_serving_an_exported_file_matches_eager(runs: list[Path], fmt: str) -> None:
    done = run_kiln("export", str(runs[0]), "--format", fmt)
    assert done.returncode == 0, done.stderr
    path = runs[0] / "export" / fmt / ("model.pt2" if fmt == "exported" else "model.onnx")
    s = Server(path, runs[0] / f"serve-{fmt}.log")
    try:
        want = _eager_probs(load_model(runs[0]))
        torch.testing.assert_close(_probs(s), want, atol=1e-5, rtol=0)
    finally:
        assert s.close() == 0


def test_ensemble_and_tta_backends_answer_like_their_modules(runs: list[Path]) -> None:
    both = load_backend(runs, tta="noise")
    assert both.kind == "ensemble of 2 + tta(noise)"
    want = TTA(load_ensemble(runs), ("noise",), task="classification").eval()
    with torch.inference_mode():
        torch.testing.assert_close(both.predict(X), want(X))
    with pytest.raises(ValueError, match="needs image inputs"):
        load_backend(runs[0], tta="flip")  # flat inputs


@pytest.mark.slow
def test_ensemble_served_over_http_is_the_mean_probability(runs: list[Path]) -> None:
    s = Server(runs, runs[0] / "serve-ensemble.log")
    try:
        members = [_eager_probs(load_model(r)) for r in runs]
        torch.testing.assert_close(_probs(s), (members[0] + members[1]) / 2, atol=1e-5, rtol=0)
    finally:
        assert s.close() == 0


@pytest.mark.slow
def test_workers_share_one_port_and_drain(runs: list[Path]) -> None:
    s = Server(runs[0], runs[0] / "serve-workers.log", "--workers", "2")
    try:
        want = _eager_probs(load_model(runs[0]))
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: _probs(s), range(64)))
        for got in results:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # New connections are spread over both processes (each /health names its process).
        pids = {json.loads(s.request("GET", "/health")[1])["pid"] for _ in range(40)}
        assert len(pids) == 2, pids
    finally:
        assert s.close() == 0


def test_workers_bad_value_is_a_clear_error(runs: list[Path]) -> None:
    done = run_kiln("serve", str(runs[0]), "--workers", "0")
    assert done.returncode != 0
    assert "--workers must be >= 1" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_compiled_backend_matches_eager(runs: list[Path]) -> None:
    backend = load_backend(runs[0], compile=True)
    assert backend.kind == "eager compiled"
    with torch.inference_mode():
        got = backend.predict(X)
        want = load_model(runs[0])(X)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
