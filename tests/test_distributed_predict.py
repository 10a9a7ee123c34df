"""One scene across the ranks of a torchrun job (2 CPU processes, gloo, 1 thread each): the same outputs as one
process, a lost rank fails the job with a clear message, and ``--resume`` with 1 or 2 processes computes only
the missing strips."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from cdmap.predict import predict_scene
from cdmap.predict.journal import Journal
from cdmap.predict.ranks import StripSpan, bands, rank_share, strip_spans
from cdmap.tiling import WindowGrid
from tests.conftest import synthetic_pair
from tests.helpers import assert_same_outputs, cdmap_env, tiny_checkpoint, torchrun_cmd

OPTS = ["--batch-size", "3", "--threshold", "0.526", "--quiet"]  # 0.526 splits this model's P(change) levels


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    before, after, _ = synthetic_pair(d, height=300, width=96, seed=5)
    ckpt = tiny_checkpoint(d / "tiny.pt")
    ref = predict_scene(before, after, d / "ref", ckpt, quiet=True, batch_size=3, threshold=0.526, device="cpu")
    return before, after, ckpt, ref


def _args(scene, out, *extra):
    before, after, ckpt, _ = scene
    return ["predict", before, after, "-o", out, "--model", ckpt, *OPTS, *extra]


def _run(cmd, **env):
    return subprocess.run(list(map(str, cmd)), env=cdmap_env(**env), capture_output=True, text=True, timeout=300)


def test_shares_are_contiguous_balanced_and_cover_every_strip():
    grid = WindowGrid(1000, 50, 64, 8)
    spans = strip_spans(grid)
    assert spans[0].row0 == 0 and spans[-1].row1 == 1000
    assert all(a.row1 == b.row0 for a, b in zip(spans, spans[1:], strict=False))
    for world in (1, 2, 3, 7, 40):
        shares = [rank_share(spans, r, world) for r in range(world)]
        assert [s for share in shares for s in share] == spans  # in order, each strip once
        assert all(len(bands(share)) <= 1 for share in shares)  # one band each
        rows = [sum(s.rows for s in share) for share in shares]
        assert all(abs(r - 1000 / world) <= max(s.rows for s in spans) for r in rows)
    holes = [s for s in spans if not 3 <= s.grid_row < 6]
    assert [[s.grid_row for s in b] for b in bands(holes)] == [[0, 1, 2], list(range(6, len(spans)))]
    assert bands([StripSpan(0, 0, 5)]) == [[StripSpan(0, 0, 5)]]


def test_two_ranks_give_the_single_process_outputs(tmp_path, scene):
    out = tmp_path / "out"
    proc = _run(torchrun_cmd(2, *_args(scene, out)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = scene[3]
    assert_same_outputs(out, ref.outdir)
    summary = json.loads((out / "run.json").read_text())
    # per-strip statistics too, not only pixels (their float sums may differ in the last bits with the order)
    assert summary["seam_ratio"] == pytest.approx(ref.summary["seam_ratio"], rel=1e-5)
    assert summary["overlap_disagreement"] == pytest.approx(ref.summary["overlap_disagreement"], rel=1e-5)
    ranks = summary["ranks"]
    assert ranks["world_size"] == 2 and [r["rank"] for r in ranks["per_rank"]] == [0, 1]
    assert all(r["strips"] > 0 and r["compute_s"] > 0 for r in ranks["per_rank"])
    assert sum(r["rows"] for r in ranks["per_rank"]) == 300
    assert ref.summary["ranks"] == {"world_size": 1, "per_rank": [ref.summary["ranks"]["per_rank"][0]]}

    # a refusal on rank 0 (outputs exist) stops both ranks with the same one-line error
    again = _run(torchrun_cmd(2, *_args(scene, out)))
    assert again.returncode != 0
    lines = [ln for ln in again.stderr.splitlines() if ln.startswith("cdmap: error:")]
    assert len(lines) == 2 and all("won't be overwritten" in ln for ln in lines), again.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_two_ranks(scene, out, kill_rank1_at: str):
    """Two ranks started by hand (no torchrun agent to tear the survivor down): rank 1 SIGKILLs itself."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = cdmap_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                        LOCAL_RANK=str(rank), CDMAP_FAULT_INJECT=f"{kill_rank1_at}@1")
        cmd = [sys.executable, "-m", "cdmap", *map(str, _args(scene, out, "--rank-timeout", "60"))]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=240), p.stderr.read()) for p in procs]  # type: ignore[union-attr]


@pytest.mark.parametrize("resume_world", [1, 2])
def test_lost_rank_fails_clearly_and_resume_computes_only_missing_strips(tmp_path, scene, resume_world):
    out = tmp_path / "out"
    (rc0, err0), (rc1, err1) = _spawn_two_ranks(scene, out, "strip:2")
    assert rc1 == -9, err1
    assert rc0 == 8, err0
    last = err0.strip().splitlines()[-1]
    assert last.startswith(f"cdmap: error: {out}: rank 0 of 2: another rank failed or stopped answering")
    assert "--resume" in last and "Traceback" not in err0
    assert not (out / "run.json").exists()
    journal = Journal.load(out / ".cdmap-partial")
    assert journal is not None
    n_all = len(strip_spans(WindowGrid(300, 96, 64, 8)))
    missing = n_all - len(journal.done)
    assert 0 < missing < n_all and (out / ".cdmap-partial" / "journal.rank1.jsonl").is_file()

    args = _args(scene, out, "--resume")
    cmd = torchrun_cmd(2, *args) if resume_world == 2 else [sys.executable, "-m", "cdmap", *args]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_outputs(out, scene[3].outdir)
    summary = json.loads((out / "run.json").read_text())
    assert summary["ranks"]["world_size"] == resume_world
    assert sum(r["strips"] for r in summary["ranks"]["per_rank"]) == missing
    assert summary["seam_ratio"] == pytest.approx(scene[3].summary["seam_ratio"], rel=1e-5)
    assert not (out / ".cdmap-partial").exists()
